"""How long ``clipsearch label`` takes on the torch-free text tower, against an older tree and torch.

    python benchmarks/label_speed.py --db LIB.db --home HOME --model-dir MODEL [--before TREE]
        [--runs 3] [--classes dog,cat --classes beach,city,mountains]

``LIB.db``: a library indexed with ``MODEL`` under ``CLIPSEARCH_HOME=HOME``, where the model has
settled (its torch-free text export exists). ``HOME`` is written to only as ``clipsearch label``
writes it: its per-model text cache, deleted before each "cold" run. Each run times, as whole
processes (wall, and CPU of the child), interleaved: for every tree (``--before``, e.g. a
``git worktree`` of the older commit, then this one) a ``label`` with an empty text cache ("cold":
every prompt through the numpy tower) and one right after ("warm": every prompt from the cache);
then this tree's ``label --model MODEL`` (the model in torch: the reference the figures compare
to). Prints medians as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from query_latency import timed  # noqa: E402  (the sibling benchmark)

HERE = Path(__file__).resolve().parents[1]


def label(tree: Path, home: Path, db: Path, classes: str, model: Path | None = None) -> tuple[float, float]:
    env = {**os.environ, "CLIPSEARCH_HOME": str(home), "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "clipsearch", "--db", str(db), "label", "--classes", classes]
    return timed(cmd + (["--model", str(model)] if model else []), env)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--before", type=Path, help="an older source tree to compare with")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--classes", action="append", help="comma-separated; repeatable")
    args = ap.parse_args(argv)
    caches = [d / "text-cache.sqlite" for d in args.home.glob("backends/*/")]  # one per model
    trees = ([("before", args.before)] if args.before else []) + [("after", HERE)]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.runs):
        for classes in args.classes or ["dog,cat"]:
            for name, tree in trees:
                for cache in caches:
                    cache.unlink(missing_ok=True)
                times.setdefault((classes, f"{name}, torch-free, cold cache"), []).append(
                    label(tree, args.home, args.db, classes)
                )
                times.setdefault((classes, f"{name}, torch-free, warm cache"), []).append(
                    label(tree, args.home, args.db, classes)
                )
            times.setdefault((classes, "--model (torch)"), []).append(
                label(HERE, args.home, args.db, classes, args.model_dir)
            )
            print(".", end="", file=sys.stderr, flush=True)
    print(f"\nload average now {os.getloadavg()[0]:.1f}; {args.runs} runs", file=sys.stderr)
    print("| classes | variant | wall median s | CPU median s | wall runs s |")
    print("|---|---|---:|---:|---|")
    for (classes, variant), runs in times.items():
        walls = ", ".join(f"{w:.1f}" for w, _ in runs)
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        print(f"| {classes} | {variant} | {wall:.2f} | {cpu:.2f} | {walls} |")


if __name__ == "__main__":
    main()
