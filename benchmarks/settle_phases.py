"""Peak memory of each step of a model's one-time work (``clipsearch.settle``), in one process.

    CLIPSEARCH_HOME=$(mktemp -d) python benchmarks/settle_phases.py MODEL

Runs ``settle.settle(bundle, reload=...)`` as the background child does (text export, model freed
and reloaded, reference and torch-int8 on the calibration batch, image export, model freed, ONNX
measurements, quantiser child) and prints, at every log line of clipsearch and around the steps named
below, the process's peak RSS since the previous line and its RSS now. The peak is reset after each
line by writing ``5`` to ``/proc/self/clear_refs`` (Linux): so each figure is that step's own peak.
The quantiser runs in a child process; its own peak is in its log line. Use an empty
``CLIPSEARCH_HOME``: with a verdict present nothing is measured.
"""

from __future__ import annotations

import functools
import logging
import sys
import time

START = time.perf_counter()


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))


def mark(label: str) -> None:
    """Print the peak since the last mark and the RSS now, then reset the peak."""
    print(
        f"[{time.perf_counter() - START:6.1f} s] {label[:110]:<70} peak {_status_mb('VmHWM'):6.0f} MB, "
        f"now {_status_mb('VmRSS'):6.0f} MB",
        flush=True,
    )
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Marks(logging.Handler):
    def emit(self, record):
        mark(record.getMessage())


def _around(module, name: str) -> None:
    fn = getattr(module, name)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        mark(f"before {name}")
        try:
            return fn(*args, **kwargs)
        finally:
            mark(f"after {name}")

    setattr(module, name, wrapped)


def main() -> int:
    logging.basicConfig(level=logging.INFO, handlers=[_Marks()])
    from clipsearch import backends, settle
    from clipsearch.checkpoints import load_bundle

    for name in ("export_onnx", "calibration_batch"):
        _around(backends, name)
    backends.sleeping_openmp_threads()  # as python -m clipsearch.settle does
    mark("imports")
    source = sys.argv[1]
    bundle = load_bundle(source)
    mark("model loaded")
    settle.settle(bundle, reload=lambda: load_bundle(source).model)
    mark("end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
