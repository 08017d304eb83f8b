"""A model's first index on a new machine: this checkout against another one, side by side.

    python benchmarks/first_run.py --before OLD_CHECKOUT [--folder /tmp/mixed] [--runs 3]
                                   [--model DIR] [--work /tmp/first-run-ab]

Each run is a whole ``clipsearch index FOLDER --model MODEL`` process in a new ``CLIPSEARCH_HOME``
(no verdict, no exports: the run settles on its own photos, ``backends.SettlingEncoder``), the two
checkouts alternating and taking turns to go first. The background settle the CLI starts after the
index is left out (``settle.after_index`` is replaced by a no-op in the timed process): it runs
after the user's command returned, and would compete with the next run here. Wall time, CPU time and
peak RSS come from ``wait4`` for the index process itself. ``rclip_compare.py --first-run`` times
the same first run against rclip, with the settle waited for between runs.

``OLD_CHECKOUT``: e.g. ``git archive <commit> | tar -x -C /tmp/old``. The model defaults to
``rclip_compare.py``'s ViT-B/32 at 256 px (``--work`` of that script); the folder to the
mixed-format set of ``mixed_formats.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import machine  # noqa: E402  (the sibling benchmark)

# Runs the CLI of the checkout given first, with the background settle skipped.
CHILD = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from clipsearch import settle; "
    "settle.after_index = lambda bundle, source: 'skipped by benchmarks/first_run.py'; "
    "from clipsearch.cli import main; main()"
)


def first_index(tree: Path, folder: Path, model: Path, work: Path, label: str) -> dict:
    """One first index of ``folder`` by the clipsearch in ``tree``: wall/CPU s, peak MB, backend."""
    home = work / f"home-{label}"
    shutil.rmtree(home, ignore_errors=True)
    db = work / f"{label}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(f"{db}.faiss", ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # as a user's shell has it
    env["CLIPSEARCH_HOME"] = str(home)
    cmd = [sys.executable, "-c", CHILD, str(tree), "--db", str(db), "index", str(folder)]
    cmd += ["--model", str(model), "--json"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"{label} failed:\n{err.read().decode(errors='replace')[-2000:]}")
        out.seek(0)
        report = json.loads(out.read())
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "peak_mb": usage.ru_maxrss / 1024,
        "backend": report["backend"],
        "new": report["new"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="the other checkout (its repository root)")
    ap.add_argument("--folder", type=Path, default=Path("/tmp/mixed"))
    ap.add_argument("--model", type=Path, default=Path("/tmp/decode-bench/model-ViT-B-32-256-seed0"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/first-run-ab"))
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    trees = {"this checkout": Path(__file__).resolve().parents[1], "before": args.before.resolve()}
    rows: dict[str, list[dict]] = {k: [] for k in trees}
    loads = []
    print(machine())
    for run in range(args.runs):
        loads.append(os.getloadavg()[0])
        order = list(trees) if run % 2 == 0 else list(trees)[::-1]
        for i, label in enumerate(order):
            r = first_index(trees[label], args.folder, args.model, args.work, f"{run}-{i}")
            rows[label].append(r)
            print(
                f"run {run} {label}: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, peak {r['peak_mb']:.0f} MB, "
                f"{r['new']} photos on {r['backend']}",
                flush=True,
            )
    loads.append(os.getloadavg()[0])
    print(f"\nload average (1 min) before each round and at the end: {', '.join(f'{x:.1f}' for x in loads)}")
    print("| clipsearch | first index s (median) | CPU s (median) | peak RSS MB (median) | backend |")
    print("|---|---:|---:|---:|---|")
    for label, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "peak_mb")}
        print(
            f"| {label} | {med['wall']:.1f} | {med['cpu']:.1f} | {med['peak_mb']:.0f} | "
            f"{', '.join(sorted({r['backend'] for r in rs}))} |"
        )
    ratios = [n["wall"] / b["wall"] for n, b in zip(rows["this checkout"], rows["before"], strict=True)]
    cpu = [n["cpu"] / b["cpu"] for n, b in zip(rows["this checkout"], rows["before"], strict=True)]
    print(
        f"\nthis checkout / before, per round: wall {', '.join(f'{x:.2f}' for x in ratios)}; "
        f"CPU {', '.join(f'{x:.2f}' for x in cpu)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
