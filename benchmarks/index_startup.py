"""What a settled index run pays before its first photo: PyTorch or not, side by side with another checkout.

    python benchmarks/index_startup.py [--before TREE] [--runs 5] [--model DIR] [--work DIR]

Each clipsearch (this checkout, and ``--before``'s put first on ``PYTHONPATH``) gets its own home and
settles the model there once (``CLIPSEARCH_BACKGROUND=0``: verdict and exports written before the
timed runs). Then, alternating, each indexes the same 4 new photos into a new library, as a whole
process: the wall time, whether ``torch`` was imported (``-X importtime``), and the backend it used.
The model is the test suite's tiny one unless ``--model`` names another, so the difference is mostly
the import of PyTorch and the model's construction.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def run(tree: Path | None, home: Path, args: list[str]) -> tuple[float, bool, str]:
    env = {**os.environ, "CLIPSEARCH_HOME": str(home), "CLIPSEARCH_BACKGROUND": "0"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "clipsearch", *args],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    torch = any(line.rstrip().endswith("| torch") for line in out.stderr.splitlines())
    backend = next(
        (line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if "backend" in line), "?"
    )
    return wall, torch, backend


def main() -> None:
    from e2e_helpers import make_tiny_model, write_photo

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="another checkout's root, timed beside this one")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench/index-startup"))
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model = args.model or make_tiny_model(args.work / "model")
    for k in range(4):
        write_photo(args.work / "first" / f"a{k}.jpg", k)
        write_photo(args.work / "new" / f"b{k}.jpg", 100 + k)
    trees = {"this checkout": None} | (
        {f"before ({args.before})": args.before.resolve()} if args.before else {}
    )
    times: dict[str, list[tuple[float, bool, str]]] = {name: [] for name in trees}
    for name, tree in trees.items():  # settle once per version, in its own home
        home = args.work / f"home-{len(times[name])}-{abs(hash(name))}"
        run(
            tree,
            home,
            ["--db", str(args.work / "settle.db"), "index", str(args.work / "first"), "--model", str(model)],
        )
        trees[name] = (tree, home)
    for r in range(args.runs):
        for name, (tree, home) in trees.items():
            db = args.work / f"lib-{r}-{abs(hash(name))}.db"
            times[name].append(
                run(tree, home, ["--db", str(db), "index", str(args.work / "new"), "--model", str(model)])
            )
    print(f"load average {os.getloadavg()[0]:.1f} at the end; median of {args.runs}, whole processes\n")
    print("| clipsearch | index of 4 new photos, s (median) | torch imported | backend |")
    print("|---|---:|---|---|")
    medians = {}
    for name, rows in times.items():
        medians[name] = statistics.median(w for w, _, _ in rows)
        imported = sorted({t for _, t, _ in rows})
        print(
            f"| {name} | {medians[name]:.2f} | {', '.join('yes' if t else 'no' for t in imported)} | {rows[-1][2]} |"
        )
    if len(medians) == 2:
        mine, before = medians.values()
        print(f"\nthis checkout / before: {mine / before:.2f}")


if __name__ == "__main__":
    main()
