"""Whole-process query latency: ``clipsearch query`` and ``similar`` as a user types them, with and
without ``serve``.

    python benchmarks/query_latency.py [--sizes 1000,20000,100000] [--runs 5] [--work DIR] [--cli]
        [--baseline TREE PYTHON]

For each size a library of that many images with synthetic, L2-normalised 512-d vectors is built once
through the store API (``Library.add_image`` / ``put_embedding``) and its FAISS index saved by
``VectorIndex.for_library``, all under ``--work`` (default ``/tmp/clipsearch-bench``; later runs
reuse them: building the 100k library takes minutes). The model is a ViT-B/32 with random weights
(see ``benchmarks/backends.py``): its speed is a trained one's.

Each measurement is one fresh ``python -m clipsearch --db DB query TEXT --paths`` process, timed from
the parent (interpreter start included), wall and CPU (user+sys of the child, from
``RUSAGE_CHILDREN``; on a shared machine the CPU time is the better guide to an idle machine's wall
time, and the minimum wall the better guide to what the code can do):

- ``new text``: every run a text never queried before, so the text-feature cache cannot help: the
  tokenizer, ONNX Runtime and the text tower run;
- ``repeated text``: a text whose features are in the on-disk cache;
- ``similar``: ``clipsearch similar ID --paths``, photos like an indexed photo (its stored vector);
- ``... (serve)``: the same, while ``clipsearch serve`` runs for the library (started before, its
  start-up not timed): the query process only asks it (where that version's ``similar`` asks it);
- ``--model DIR (loads torch)`` (with ``--cli``): naming the model forces loading it in torch;
- ``the interpreter alone``: ``python -c`` printing one line, the floor under every query process.

``--baseline TREE PYTHON`` times another checkout side by side (a worktree of an older commit with
its own venv's python): each version sets up its own model, export and libraries with its own code
(under ``--work/<label>``, its own ``CLIPSEARCH_HOME``), and the runs interleave the two versions.
Each version's processes run in its own tree (``python -m`` puts the working folder first on
``sys.path``: run elsewhere, a baseline's interpreter would import this tree's code).

Runs go round-robin over the variants so machine noise hits them alike. The load average at the
start and the end is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import machine  # noqa: E402  (the sibling benchmark)


def build_library(db: Path, n: int, model_id: str, source: str, dim: int = 512) -> None:
    """``n`` images with random unit vectors, and the saved FAISS index (made once, then reused)."""
    import numpy as np

    from clipsearch.store import Library
    from clipsearch.vectors import VectorIndex

    if db.exists():  # built by an earlier run: bring its schema and FAISS index up to date
        with Library.open(db) as lib:
            VectorIndex.for_library(lib, model_id)
        return
    tmp = db.with_name(db.name + ".building")
    for stale in tmp.parent.glob(tmp.name + "*"):
        stale.unlink() if stale.is_file() else None
    rng = np.random.default_rng(n)
    lib = Library.open(tmp, create=True)
    lib.register_model(model_id, source, dim=dim)
    step = 10_000
    for start in range(0, n, step):
        vectors = rng.standard_normal((min(step, n - start), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with lib.transaction():
            for i, v in enumerate(vectors, start):
                image_id = lib.add_image(
                    f"/photos/{i // 1000:03d}/IMG_{i:06d}.jpg", size=1, mtime_ns=1, content_hash=f"{i:x}"
                )
                lib.put_embedding(image_id, model_id, v)
    lib.close()
    os.replace(tmp, db)  # the FAISS index is keyed by the database's name: build it under the final one
    lib = Library.open(db)
    VectorIndex.for_library(lib, model_id)
    lib.close()


def timed(cmd: list[str], env: dict, cwd: Path | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one child process.

    On a shared machine the wall time includes waiting for a core; the CPU time does not, and is
    close to the wall time the same process takes on an idle machine (its work is mostly one thread).
    """
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"{' '.join(cmd[:3])}... failed:\n{out.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


SETUP = """
import os, sys
from pathlib import Path
work, tree, sizes = Path(sys.argv[1]), Path(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
os.environ["CLIPSEARCH_HOME"] = str(work / "home")
sys.path.insert(0, str(tree / "benchmarks"))
from backends import random_model_dir
from query_latency import build_library
from clipsearch import fastquery
from clipsearch.checkpoints import load_bundle
model_dir = random_model_dir(work)
bundle = load_bundle(model_dir)
fastquery.ensure_text_encoder(bundle)
for n in sizes:
    build_library(work / f"query-{n}.db", n, bundle.model_id, str(model_dir))
print(model_dir)
"""


class Version:
    """One checkout of clipsearch and the interpreter that runs it (its venv), with its own work
    folder: home (exports, caches, daemon sockets), model and libraries are never shared."""

    def __init__(self, label: str, python: str, tree: Path, work: Path):
        self.label, self.python, self.tree, self.work = label, python, tree, work / label
        self.env = {**os.environ, "CLIPSEARCH_HOME": str(self.work / "home")}

    def setup(self, sizes: list[int]) -> Path:
        """Model, text export and libraries, made by this version's own code (reused when present)."""
        self.work.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(
            [self.python, "-c", SETUP, str(self.work), str(self.tree), ",".join(map(str, sizes))],
            env=self.env,
            capture_output=True,
            text=True,
            cwd=self.tree,
        )
        if out.returncode != 0:
            raise SystemExit(f"setting up {self.label} failed:\n{out.stderr[-3000:]}")
        return Path(out.stdout.strip().splitlines()[-1])

    def query(self, n: int, text: str, *extra: str) -> list[str]:
        db = self.work / f"query-{n}.db"
        return [self.python, "-m", "clipsearch", "--db", str(db), "query", text, "--paths", *extra]

    def similar(self, n: int) -> list[str]:
        db = self.work / f"query-{n}.db"
        return [self.python, "-m", "clipsearch", "--db", str(db), "similar", str(n // 2), "--paths"]

    def time(self, cmd: list[str]) -> tuple[float, float]:
        return timed(cmd, self.env, cwd=self.tree)


class Daemon:
    """``clipsearch serve`` of one version for one library, in the background; ready once it says so."""

    def __init__(self, version: Version, n: int):
        db = version.work / f"query-{n}.db"
        self.proc = subprocess.Popen(
            [version.python, "-m", "clipsearch", "--db", str(db), "serve"],
            env=version.env,
            stderr=subprocess.PIPE,
            text=True,
            cwd=version.tree,
        )
        for line in self.proc.stderr:  # "Serving <library> on <socket>" once it listens
            if line.startswith("Serving"):
                break
        else:
            raise SystemExit(f"clipsearch serve of {version.label} for {db} did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,20000,100000")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--cli", action="store_true", help="also time `clipsearch query --model DIR` (loads torch)"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    ap.add_argument(
        "--only",
        action="append",
        metavar="QUERY",
        help="time only this query variant, e.g. 'similar (serve)'",
    )
    ap.add_argument(
        "--baseline",
        nargs=2,
        metavar=("TREE", "PYTHON"),
        help="also time another checkout (e.g. a worktree of an older commit) run by PYTHON (its venv), "
        "interleaved with this one",
    )
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parent.parent
    versions = [Version("this tree", sys.executable, here, args.work)]
    if args.baseline:
        tree, python = args.baseline
        versions.append(Version(f"baseline {Path(tree).name}", python, Path(tree).resolve(), args.work))
    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()
    model_dirs = {}
    for v in versions:
        start = time.perf_counter()
        model_dirs[v.label] = v.setup(sizes)
        print(f"# {v.label}: set up in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    rows = []
    for n in sizes:

        def new_text(v, n=n):
            return v.query(n, f"a photo number {n} {time.time_ns()}")

        def repeated_text(v, n=n):
            return v.query(n, "a dog on a beach")

        def similar(v, n=n):
            return v.similar(n)

        variants = {"new text": new_text, "repeated text": repeated_text, "similar": similar}
        served = {
            "new text (serve)": new_text,
            "repeated text (serve)": repeated_text,
            "similar (serve)": similar,
        }
        if args.only:
            variants = {k: f for k, f in variants.items() if k in args.only}
            served = {k: f for k, f in served.items() if k in args.only}
        if args.cli:
            variants["--model DIR (loads torch)"] = lambda v, n=n: v.query(
                n, "a dog on a beach", "--model", str(model_dirs[v.label])
            )
        for v in versions:
            v.time(repeated_text(v))  # fills the cache, warms the page cache
            v.time(similar(v))
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        floor = [sys.executable, "-c", "print(1)"]
        for _ in range(args.runs):
            times.setdefault(("", "(the interpreter alone: python -c)"), []).append(timed(floor, os.environ))
            for name, make in variants.items():
                for v in versions:
                    times.setdefault((v.label, name), []).append(v.time(make(v)))
        daemons = [Daemon(v, n) for v in versions] if served else []
        try:
            for _ in range(args.runs if served else 0):
                for name, make in served.items():
                    for v in versions:
                        times.setdefault((v.label, name), []).append(v.time(make(v)))
        finally:
            for d in daemons:
                d.stop()
        for (label, name), ts in times.items():
            walls = [w for w, _ in ts]
            cpus = [c for _, c in ts]
            rows.append(
                (n, label, name, statistics.median(walls), min(walls), statistics.median(cpus), min(cpus))
            )

    print(
        f"# whole-process `clipsearch query TEXT --paths` / `similar ID --paths`, {args.runs} runs "
        "(ViT-B/32 text tower, top 20), the versions interleaved run by run"
    )
    print(f"# {machine()}")
    load_after = os.getloadavg()
    print(
        f"# load average (1/5/15 min): start {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"end {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}"
    )
    print("| images | version | query | wall median s | wall min s | CPU median s | CPU min s |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for n, label, name, med, lo, cpu, cpu_lo in sorted(rows, key=lambda r: (r[0], r[2], r[1])):
        print(f"| {n:,} | {label} | {name} | {med:.3f} | {lo:.3f} | {cpu:.3f} | {cpu_lo:.3f} |")
    if len(versions) == 2:
        print()
        print(
            f"| images | query | wall median ratio {versions[0].label} / {versions[1].label} | CPU median ratio |"
        )
        print("|---:|---|---:|---:|")
        by = {(r[0], r[1], r[2]): r for r in rows}
        for n in sizes:
            for name in [*variants, *served]:
                a, b = by[(n, versions[0].label, name)], by[(n, versions[1].label, name)]
                print(f"| {n:,} | {name} | {a[3] / b[3]:.2f} | {a[5] / b[5]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
