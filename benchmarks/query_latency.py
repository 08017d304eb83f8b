"""Whole-process text query latency: ``clipsearch query`` as a user types it, with and without ``serve``.

    python benchmarks/query_latency.py [--sizes 1000,100000] [--runs 5] [--work DIR] [--cli]

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
- ``... (serve)``: the same, while ``clipsearch serve`` runs for the library (started before, its
  start-up not timed): the query process only asks it;
- ``--model DIR (loads torch)`` (with ``--cli``): naming the model forces loading it in torch;
- ``the interpreter alone``: ``python -c`` printing one line, the floor under every query process.

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
from backends import machine, random_model_dir, set_home  # noqa: E402  (the sibling benchmark)


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


class Daemon:
    """``clipsearch serve`` for one library, in the background while the ``serve`` variants run."""

    def __init__(self, db: Path, env: dict):
        from clipsearch import serve
        from clipsearch.search import Query

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clipsearch", "--db", str(db), "serve"],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300
        while serve.ask(db, Query.build("warm up"), {"top": 1}) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"clipsearch serve for {db} did not start")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,100000")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--cli", action="store_true", help="also time `clipsearch query --model DIR` (loads torch)"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    args = ap.parse_args(argv)
    set_home(args.work)

    from clipsearch import fastquery
    from clipsearch.checkpoints import load_bundle

    model_dir = random_model_dir(args.work)
    bundle = load_bundle(model_dir)
    fastquery.ensure_text_encoder(bundle)
    env = dict(os.environ)
    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()
    rows = []
    for n in sizes:
        db = args.work / f"query-{n}.db"
        start = time.perf_counter()
        build_library(db, n, bundle.model_id, str(model_dir))
        built = time.perf_counter() - start
        cli = [sys.executable, "-m", "clipsearch", "--db", str(db), "query", "--paths"]

        def new_text(i, n=n, cli=cli):
            return [*cli, f"a photo number {n} {i} {time.time_ns()}"]

        def repeated_text(i, cli=cli):
            return [*cli, "a dog on a beach"]

        variants = {
            "new text": new_text,
            "repeated text": repeated_text,
            "(the interpreter alone: python -c)": lambda i: [sys.executable, "-c", "print(1)"],
        }
        if args.cli:
            variants["--model DIR (loads torch)"] = lambda i, cli=cli: [
                *repeated_text(i),
                "--model",
                str(model_dir),
            ]
        timed(repeated_text(0), env)  # fills the cache, warms the page cache
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for i in range(args.runs):
            for name, make in variants.items():
                times[name].append(timed(make(i), env))
        daemon = Daemon(db, env)
        try:
            served = {"new text (serve)": new_text, "repeated text (serve)": repeated_text}
            times.update({k: [] for k in served})
            for i in range(args.runs):
                for name, make in served.items():
                    times[name].append(timed(make(args.runs + i), env))
        finally:
            daemon.stop()
        for name, ts in times.items():
            walls = [w for w, _ in ts]
            cpus = [c for _, c in ts]
            rows.append((n, name, statistics.median(walls), min(walls), statistics.median(cpus), min(cpus)))
        rows.append((n, "(library + index built in)", built, built, built, built))

    print(f"# whole-process `clipsearch query TEXT --paths`, {args.runs} runs (ViT-B/32 text tower, top 20)")
    print(f"# {machine()}")
    load_after = os.getloadavg()
    print(
        f"# load average (1/5/15 min): start {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"end {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}"
    )
    print("| images | query | wall median s | wall min s | CPU median s | CPU min s |")
    print("|---:|---|---:|---:|---:|---:|")
    for n, name, med, lo, cpu, cpu_lo in rows:
        if name.startswith("(library"):
            print(f"| {n:,} | {name} | {med:.1f} (once) | | | |")
        else:
            print(f"| {n:,} | {name} | {med:.3f} | {lo:.3f} | {cpu:.3f} | {cpu_lo:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
