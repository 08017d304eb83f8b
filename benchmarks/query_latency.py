"""Whole-process text query latency: the torch-free fast path vs today's ``clipsearch query``.

    python benchmarks/query_latency.py [--sizes 1000,100000] [--runs 5] [--work DIR]

For each size a library of that many images with synthetic, L2-normalised 512-d vectors is built once
through the store API (``Library.add_image`` / ``put_embedding``) and its FAISS index saved by
``VectorIndex.for_library`` (flat below 50k vectors, HNSW above), all under ``--work``. The model is
a ViT-B/32 with random weights (see ``benchmarks/backends.py``): its speed is a trained one's.

Each measurement is one fresh process, timed from the parent (interpreter start included), wall
and CPU (user+sys, from ``RUSAGE_CHILDREN``; on a shared machine the CPU time is the better guide
to an idle machine's wall time):

- ``clipsearch query, new text``: the command, which takes the torch-free path of
  ``clipsearch.fastquery`` for text queries with the library's model; every run a text never seen,
  so the text-feature cache cannot help;
- ``clipsearch query, repeated text``: a text whose features are in the on-disk cache;
- ``fastquery alone``: the same work as a bare script (no click/rich), new text;
- ``clipsearch query --model DIR`` (with ``--cli``): naming the model forces loading it in torch.

Runs go round-robin over the variants so machine noise hits them alike; the table shows the median.
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

FAST = """
import sys
from clipsearch import fastquery
from clipsearch.search import Query
from clipsearch.store import Library
lib = Library.open(sys.argv[1], readonly=True)
hits = fastquery.search(lib, lib.default_model_id(), Query.build(sys.argv[2]), top=20)
sys.stdout.write("".join(f"{h.path}\\n" for h in hits))
assert "torch" not in sys.modules
"""


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
        with lib.transaction() as c:
            for i, v in enumerate(vectors, start):
                image_id = lib.add_image(
                    c, f"/photos/{i // 1000:03d}/IMG_{i:06d}.jpg", size=1, mtime_ns=1, content_hash=f"{i:x}"
                )
                lib.put_embedding(c, image_id, model_id, v)
    lib.close()
    os.replace(tmp, db)  # the FAISS index is keyed by the database's name: build it under the final one
    lib = Library.open(db)
    VectorIndex.for_library(lib, model_id)
    lib.close()


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one child process.

    On a shared machine the wall time includes waiting for a core; the CPU time does not, and is
    close to the wall time the same process takes on an idle machine (its work is mostly one thread).
    """
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"{' '.join(cmd[:3])}... failed:\n{out.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,100000")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--cli", action="store_true", help="also time the current `clipsearch query` (loads torch)"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    args = ap.parse_args(argv)
    set_home(args.work)

    from clipsearch import fastquery
    from clipsearch.checkpoints import load_bundle

    model_dir = random_model_dir(args.work)
    bundle = load_bundle(model_dir)
    fastquery.ensure_text_encoder(bundle)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        db = args.work / f"query-{n}.db"
        start = time.perf_counter()
        build_library(db, n, bundle.model_id, str(model_dir))
        built = time.perf_counter() - start
        cli = [sys.executable, "-m", "clipsearch", "--db", str(db), "query", "--paths"]
        variants = {
            "clipsearch query, new text": lambda i, n=n, cli=cli: [
                *cli,
                f"a photo number {n} {i} {time.time_ns()}",
            ],
            "clipsearch query, repeated text": lambda i, cli=cli: [*cli, "a dog on a beach"],
            "fastquery alone (python -c), new text": lambda i, n=n, db=db: [
                sys.executable,
                "-c",
                FAST,
                str(db),
                f"a picture number {n} {i} {time.time_ns()}",
            ],
        }
        if args.cli:
            variants["clipsearch query --model DIR (loads torch)"] = lambda i, cli=cli: [
                *cli,
                "a dog on a beach",
                "--model",
                str(model_dir),
            ]
        timed(variants["clipsearch query, repeated text"](0), env)  # fills the cache, warms the page cache
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for i in range(args.runs):
            for name, make in variants.items():
                times[name].append(timed(make(i), env))
        for name, ts in times.items():
            walls = [w for w, _ in ts]
            rows.append((n, name, statistics.median(walls), min(walls), statistics.median(c for _, c in ts)))
        rows.append((n, "(library + index built in)", built, built, built))

    print(f"# whole-process query latency, median of {args.runs} (ViT-B/32 text tower, top 20)")
    print(f"# {machine()}")
    print("| images | variant | wall median s | wall min s | CPU median s |")
    print("|---:|---|---:|---:|---:|")
    for n, name, med, lo, cpu in rows:
        if name.startswith("("):
            print(f"| {n:,} | {name} | {med:.1f} (once) | | |")
        else:
            print(f"| {n:,} | {name} | {med:.3f} | {lo:.3f} | {cpu:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
