"""The int8 copy of an exported image tower, made by ONNX Runtime's quantiser in a process of its own.

ONNX Runtime's dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``: int8 weights,
one scale per output channel, 7-bit range, the MatMuls only; see ``backends._INT8_OPTIONS``) loads the fp32 model,
infers its shapes into a second copy and builds the quantised one: about three times the weights at
once, ~1.1 GB for ViT-B/32's image tower. :func:`quantise` runs it as ``python -m clipsearch.quantise
SOURCE TARGET``, a short-lived child that imports neither PyTorch nor the model, so that working set
never adds to a process holding them (the background settle, or an index run measuring in the
foreground): each process of a model's first run stays under its own peak (``benchmarks/memory.md``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from clipsearch.atomic import atomic_path
from clipsearch.backends import BackendError

log = logging.getLogger(__name__)


class QuantiseError(BackendError):
    """The quantiser process failed or died; the export it read is left as it was."""


def quantise(source: Path, target: Path, options: dict) -> Path:
    """Write the int8 quantisation of the ONNX model ``source`` to ``target`` atomically, in a child
    process. ``options``: ``per_channel``, ``reduce_range`` and ``op_types_to_quantize`` for
    ``quantize_dynamic``. Raises
    :class:`QuantiseError` (with the child's last line of error) when it fails or is killed; then
    ``target`` is untouched and no temporary file is left."""
    flags = [f"--{k.replace('_', '-')}" for k in ("per_channel", "reduce_range") if options.get(k)]
    if options.get("op_types_to_quantize"):
        flags += ["--op-types", ",".join(options["op_types_to_quantize"])]
    unknown = set(options) - {"per_channel", "reduce_range", "op_types_to_quantize"}
    if unknown:
        raise ValueError(f"unknown quantisation options: {sorted(unknown)}")
    with atomic_path(target) as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "clipsearch.quantise", str(source), str(tmp), *flags],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            raise QuantiseError(
                f"quantising {source.name} failed ({_exit_reason(proc.returncode)})"
                + (f": {lines[-1][:200]}" if lines else "")
            )
        if Path(tmp).stat().st_size == 0:
            raise QuantiseError(f"quantising {source.name} wrote nothing")
    peak = proc.stdout.split()[-1] if proc.stdout.strip() else "?"
    log.info(
        "quantised %s to int8 (%s) in a child process (its peak memory %s MB)", source.name, target.name, peak
    )
    return target


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def main(argv: list[str] | None = None) -> int:
    """``python -m clipsearch.quantise SOURCE TARGET [--per-channel] [--reduce-range] [--op-types A,B]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m clipsearch.quantise", description=main.__doc__)
    ap.add_argument("source", type=Path)
    ap.add_argument("target", type=Path)
    ap.add_argument("--per-channel", action="store_true")
    ap.add_argument("--reduce-range", action="store_true")
    ap.add_argument("--op-types", help="comma-separated operator types to quantise (default: all it can)")
    args = ap.parse_args(argv)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # the quantiser's advice on the root logger
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(args.source),
            str(args.target),
            weight_type=QuantType.QInt8,
            per_channel=args.per_channel,
            reduce_range=args.reduce_range,
            op_types_to_quantize=args.op_types.split(",") if args.op_types else None,
        )
    # its own peak, for the parent's log: the kernel's figure for a child (wait4, RUSAGE_CHILDREN)
    # also counts the parent's memory at the fork
    with open("/proc/self/status") as f:
        hwm = next((line.split()[1] for line in f if line.startswith("VmHWM:")), None)
    if hwm is not None:
        sys.stdout.write(f"peak_mb {int(hwm) // 1024}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
