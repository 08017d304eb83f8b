"""Which int8 image graph: CPU per image of ONNX Runtime graph variants, with fidelity on real photos.

    python benchmarks/int8_graph.py --fp32 FP32.onnx --folder /tmp/mixed [--rounds 5] [--threads 1]

``FP32.onnx`` is a model's image export (``$CLIPSEARCH_HOME/backends/<model>/image-fp32.onnx``, made
by ``benchmarks/rclip_compare.py``). The variants are quantised from it once into ``--work``:

- ``fp32``: the export itself (what rclip runs);
- ``int8 all``: dynamic quantisation of every MatMul and the patch Conv (per channel, 7 bit: the
  backend before this comparison);
- ``int8 MatMul``: the same for the MatMuls only; the patch embedding stays a float Conv;
- ``int8 static``: static quantisation (QOperator, activations calibrated by min/max on 16 of the
  photos), MatMuls only.

Each round runs every variant once on the same batch, in turn (a machine shared with other jobs
slows them alike); the figure is the round with the least CPU (the least disturbed one), in CPU
milliseconds per image, the session's load time beside it. Fidelity: cosine of each photo's
embedding to the fp32 graph's on the reference pipeline's pixels (full decode), worst photo.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def reference_pixels(folder: Path, size: int) -> np.ndarray:
    """``[N, 3, S, S]``: every photo of ``folder`` through the reference pipeline (Pillow's full decode)."""
    from unittest import mock

    from clipsearch import pngvips
    from clipsearch.imageio import open_image
    from clipsearch.transform import PreprocessConfig, image_transform

    t = image_transform(PreprocessConfig(size))
    out = []
    for p in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        with mock.patch.object(pngvips, "decode", lambda data, im, shrink=1: None):
            out.append(t.array(open_image(io.BytesIO(p.read_bytes()))))
    return np.stack(out)


def session(path: Path, threads: int):
    from clipsearch.backends import ort_session

    return ort_session(path, threads, spin=False)


def run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def variants(fp32: Path, work: Path, calibration: np.ndarray) -> dict[str, Path]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from clipsearch.backends import _quiet_root_logger

    work.mkdir(parents=True, exist_ok=True)
    out = {"fp32": fp32}
    common = {"weight_type": QuantType.QInt8, "per_channel": True, "reduce_range": True}
    for name, ops in (("int8 all", None), ("int8 MatMul", ["MatMul"])):
        target = work / f"{name.replace(' ', '-')}.onnx"
        if not target.is_file():
            with _quiet_root_logger():
                quantize_dynamic(str(fp32), str(target), op_types_to_quantize=ops, **common)
        out[name] = target
    target = work / "int8-static.onnx"
    if not target.is_file():
        input_name = session(fp32, 1).get_inputs()[0].name

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter(
                    [{input_name: calibration[i : i + 4]} for i in range(0, len(calibration), 4)]
                )

            def get_next(self):
                return next(self.batches, None)

        with _quiet_root_logger():
            quantize_static(
                str(fp32),
                str(target),
                Reader(),
                quant_format=QuantFormat.QOperator,
                op_types_to_quantize=["MatMul"],
                activation_type=QuantType.QUInt8,
                calibrate_method=CalibrationMethod.MinMax,
                **common,
            )
    out["int8 static"] = target
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", type=Path, required=True, help="the model's fp32 image export")
    ap.add_argument("--folder", type=Path, required=True, help="real photos (benchmarks/mixed_formats.py)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/int8-graph"))
    args = ap.parse_args()

    from backends import machine

    pixels = reference_pixels(args.folder, args.size)
    paths = variants(args.fp32, args.work, pixels[::6][:16])
    sessions, load_s = {}, {}
    for name, path in paths.items():
        start = time.perf_counter()
        sessions[name] = session(path, args.threads)
        load_s[name] = time.perf_counter() - start
    reference = np.concatenate([run(sessions["fp32"], pixels[i : i + 16]) for i in range(0, len(pixels), 16)])
    worst = {}
    for name, sess in sessions.items():
        out = np.concatenate([run(sess, pixels[i : i + 16]) for i in range(0, len(pixels), 16)])
        worst[name] = float(cosines(out, reference).min())
    batch = pixels[: args.batch]
    cpu: dict[str, list[float]] = {name: [] for name in sessions}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, sess in sessions.items():
            start = time.process_time()
            run(sess, batch)
            cpu[name].append((time.process_time() - start) / len(batch) * 1000)
    loads.append(os.getloadavg()[0])
    print(machine())
    print(
        f"{len(pixels)} photos of {args.folder}, {args.size} px, batch {len(batch)}, {args.threads} intra-op "
        f"thread(s), least-CPU round of {args.rounds}; load average {loads[0]:.1f} -> {loads[1]:.1f}\n"
    )
    print("| graph | CPU ms per image | vs int8 all | session load s | file MB | worst cosine to fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    base = min(cpu["int8 all"])
    for name in sessions:
        best = min(cpu[name])
        print(
            f"| {name} | {best:.1f} | {base / best:.2f}x | {load_s[name]:.2f} | "
            f"{paths[name].stat().st_size / 1e6:.0f} | {worst[name]:.5f} |"
        )


if __name__ == "__main__":
    main()
