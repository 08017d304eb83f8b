"""What finding a model's identity costs a process, torch-free versus loading the model.

    python benchmarks/model_identity.py [--runs 7] [--work DIR]

A command whose exports exist needs only the model's id, preprocessing and tokenizer config
(``clipsearch.identity.identify``); before it had to load the model (``load_bundle``), importing
torch. Each measurement is one fresh ``python -c`` process on a ViT-B/32 model folder with random
weights (``benchmarks/backends.py``; made once under ``--work``), timed from the parent, interpreter
start included; the file hash is cached (as it is for a user after the first run). Variants go
round-robin so machine noise hits them alike; medians and the ratio are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import machine, random_model_dir, set_home  # noqa: E402  (the sibling benchmark)

VARIANTS = {
    "identify (no torch)": "from clipsearch.identity import identify; identify({src!r})",
    "load_bundle (torch)": "from clipsearch.checkpoints import load_bundle; load_bundle({src!r})",
    "the interpreter alone": "print(1)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    args = ap.parse_args()
    set_home(args.work)
    src = str(random_model_dir(args.work))
    subprocess.run([sys.executable, "-c", VARIANTS["identify (no torch)"].format(src=src)], check=True)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    load = os.getloadavg()[0]
    for _ in range(args.runs):
        for name, code in VARIANTS.items():
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", code.format(src=src)], check=True, stdout=subprocess.DEVNULL
            )
            times[name].append(time.perf_counter() - start)
    print(machine())
    print(f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}; {args.runs} runs each; model {src}")
    base = statistics.median(times["load_bundle (torch)"])
    print(f"{'variant':24} {'median s':>9} {'min s':>7} {'vs load_bundle':>15}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:24} {med:9.3f} {min(ts):7.3f} {med / base:14.2f}x")


if __name__ == "__main__":
    main()
