"""How search scales: flat (exact), IVF and HNSW as built by ``clipsearch.vectors``, on synthetic vectors.

Data: L2-normalised 512-d vectors. ``clustered`` (default) draws them around 1,000 random centres
(CLIP embeddings of a photo collection are clustered; a point's nearest centre sits at cosine
~0.85); ``uniform`` draws them uniformly on the sphere, the hard case for any partitioning index
(no structure: a query's neighbours are spread over many cells). Queries are fresh draws from the
same distribution. Recall@10 is measured against the exact (flat) answer for every query; latency is
per query, issued one at a time (p50/p99; flat is timed on fewer queries, it is slow and exact).

    python benchmarks/search_scale.py --sizes 100000 1000000 --kinds flat ivf --threads 2

Prints a Markdown table (results are recorded in ``benchmarks/search_scale.md``). 1M vectors need
~2 GB for the data plus as much again for each index held at once (flat is freed before IVF).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from clipsearch import vectors
from clipsearch.vectors import VectorIndex

# One query at a time gains nothing from OpenMP, and on a loaded 2-core box two threads cost
# ~20 ms of barrier waiting per query (measured): single queries are timed on one thread.
SEARCH_THREADS = 1


def make_data(
    n: int, d: int, rng: np.random.Generator, centres: np.ndarray | None, spread: float, basis=None
) -> np.ndarray:
    """``n`` normalised vectors (around ``centres``, on a low-rank ``basis``, or uniform), in chunks."""
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = rng.standard_normal((m, d), dtype=np.float32)
        if centres is not None:
            x = centres[rng.integers(0, len(centres), m)] + spread * x
        elif basis is not None:
            z = rng.standard_normal((m, len(basis)), dtype=np.float32)
            x = z @ basis + spread * x
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


def saved_size_and_open_ms(index: VectorIndex) -> tuple[int, float]:
    """Size of the saved index files, and the time to open them as an in-step open does (mapped;
    ivfpq: its codes read, its exact store mapped)."""
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.index")
        faiss.write_index(index.index, path)
        size = os.path.getsize(path)
        if index.exact is not None:
            faiss.write_index(index.exact, path + ".vectors")
            size += os.path.getsize(path + ".vectors")
        t = time.perf_counter()
        faiss.read_index(path, vectors._read_flags(index.kind))
        if index.exact is not None:
            faiss.read_index(path + ".vectors", vectors._read_flags("flat"))
        return size, (time.perf_counter() - t) * 1000


def latencies_ms(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[list[float], list[float]]:
    """Per query, issued one at a time: wall-clock ms and the calling thread's CPU ms. FAISS runs
    single queries on this thread here (``SEARCH_THREADS`` 1), so CPU time is the wall time a query
    takes on a core of its own: what a quiet machine shows, where this box's load only adds waiting."""
    import faiss

    build_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(SEARCH_THREADS)
    wall, cpu = [], []
    for q in queries:
        t, c = time.perf_counter(), time.thread_time()
        index.search(q[None], k)
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.thread_time() - c) * 1000)
    faiss.omp_set_num_threads(build_threads)
    return wall, cpu


def recall_tie_aware(scores: np.ndarray, kth: np.ndarray) -> float:
    """Mean recall@k: a result counts when its score reaches the exact ``k``-th score ``kth`` [Q]
    (every kind here returns exact inner products: flat, IVF-flat, HNSW-flat, ivfpq's re-rank)."""
    k = scores.shape[1]
    return float(np.mean(np.minimum((scores >= kth[:, None] - 1e-5).sum(axis=1), k) / k))


def row(n, data, name, build, saved, lat, recall, **extra) -> dict:
    lat, cpu = lat
    return {
        "n": n,
        "data": data,
        "index": name,
        "build_s": build,
        "bytes_per_vector": saved[0] / n,
        "open_ms": saved[1],
        "p50_ms": float(np.percentile(lat, 50)),
        "cpu_p50_ms": float(np.percentile(cpu, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "recall@10": recall,
        **extra,
    }


def peak_memory(n: int, args) -> None:
    """``--peak-memory``: the process's peak RSS (GB) after making the data, and after building
    ``args.kinds[0]`` from it as ``VectorIndex.build`` does in an index run (no ground truth)."""
    import resource

    rng = np.random.default_rng(args.seed)
    d = args.dim
    basis = (
        rng.standard_normal((args.rank, d), dtype=np.float32) / np.sqrt(d) if args.data == "lowrank" else None
    )
    centres = (
        rng.standard_normal((1000, d), dtype=np.float32) / np.sqrt(d) if args.data == "clustered" else None
    )
    data = make_data(n, d, rng, centres, args.spread / np.sqrt(d), basis)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB -> GB
    t = time.perf_counter()
    index = VectorIndex.build(np.arange(1, n + 1, dtype=np.int64), data, kind=args.kinds[0])
    build = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(
        f"n={n:,} {args.data}: built {index.kind} in {build:.0f} s; peak RSS {before:.2f} GB with the data "
        f"({data.nbytes / 1e9:.2f} GB), {after:.2f} GB after the build (+{after - before:.2f} GB)"
    )


def run(n: int, args) -> list[dict]:
    d, k = args.dim, args.k
    rng = np.random.default_rng(args.seed)
    centres = basis = None
    spread = args.spread / np.sqrt(d)
    if args.data == "clustered":
        centres = rng.standard_normal((1000, d), dtype=np.float32) / np.sqrt(d)
    elif args.data == "lowrank":
        # A continuous low-dimensional manifold (CLIP embeddings have an intrinsic dimension of
        # a few dozen) without clusters to fall into: harder for IVF than the mixture.
        basis = rng.standard_normal((args.rank, d), dtype=np.float32) / np.sqrt(d)
    data = make_data(n, d, rng, centres, spread, basis)
    queries = make_data(args.queries, d, rng, centres, spread, basis)
    ids = np.arange(1, n + 1, dtype=np.int64)
    rows = []

    t = time.perf_counter()
    flat = VectorIndex.build(ids, data, kind="flat")
    build = time.perf_counter() - t
    exact_scores, _ = flat.search(queries, k)  # batched: the ground truth for every query
    kth = exact_scores[:, k - 1]
    if "flat" in args.kinds:
        lat = latencies_ms(flat, queries[: args.flat_queries], k)
        rows.append(row(n, args.data, "flat", build, saved_size_and_open_ms(flat), lat, 1.0))
        print(f"# n={n} flat done", flush=True)
    del flat

    if "ivf" in args.kinds:
        t = time.perf_counter()
        ivf = VectorIndex.build(ids, data, kind="ivf")
        build = time.perf_counter() - t
        saved = saved_size_and_open_ms(ivf)
        nlist, default = ivf.index.nlist, ivf.index.nprobe
        for nprobe in sorted(set(args.nprobe) | {default}):
            if nprobe > nlist:
                continue
            ivf.index.nprobe = nprobe
            scores, _ = ivf.search(queries, k)
            lat = latencies_ms(ivf, queries, k)
            mark = " (default)" if nprobe == default else ""
            rows.append(
                row(
                    n,
                    args.data,
                    f"ivf nlist={nlist} nprobe={nprobe}{mark}",
                    build,
                    saved,
                    lat,
                    recall_tie_aware(scores, kth),
                )
            )
        print(f"# n={n} ivf done (build {build:.0f} s)", flush=True)
        del ivf

    if "ivfpq" in args.kinds:
        rows += ivfpq_rows(n, args, ids, data, queries, kth)
    if "auto" in args.kinds:
        rows += ivfpq_rows(n, args, ids, data, queries, kth, kind="auto")

    if "hnsw" in args.kinds and n <= args.hnsw_max:
        vectors.HNSW_M = args.hnsw_m
        vectors.HNSW_EF_CONSTRUCTION = args.ef_construction
        t = time.perf_counter()
        hnsw = VectorIndex.build(ids, data, kind="hnsw")
        build = time.perf_counter() - t
        saved = saved_size_and_open_ms(hnsw)
        tuned = hnsw.ef_search  # chosen by the build's tuning (build time includes it)
        for ef in sorted(set(args.ef) | {tuned}):
            hnsw.ef_search = ef  # the search-time beam; the graph is unchanged
            scores, _ = hnsw.search(queries, k)
            lat = latencies_ms(hnsw, queries, k)
            mark = " (tuned)" if ef == tuned else ""
            rows.append(
                row(
                    n,
                    args.data,
                    f"hnsw M={vectors.HNSW_M} efC={vectors.HNSW_EF_CONSTRUCTION} ef={ef}{mark}",
                    build,
                    saved,
                    lat,
                    recall_tie_aware(scores, kth),
                )
            )
        print(f"# n={n} hnsw done (build {build:.0f} s)", flush=True)
    return rows


def ivfpq_rows(
    n: int, args, ids, data: np.ndarray, queries: np.ndarray, kth: np.ndarray, kind: str = "ivfpq"
) -> list[dict]:
    """``ivfpq`` as ``VectorIndex.build`` makes it (IVF fast-scan PQ codes, exact re-rank of the
    shortlist, (nprobe, re-rank) tuned at build), then a sweep of nprobe × re-rank depth. With
    ``kind`` auto: what auto builds at this size (IVF-flat or ivfpq), at its tuned setting."""
    t = time.perf_counter()
    index = VectorIndex.build(ids, data, kind=kind)
    build = time.perf_counter() - t
    saved = saved_size_and_open_ms(index)
    nlist = getattr(index.index, "nlist", 0)
    if index.kind != "ivfpq":
        scores, _ = index.search(queries, args.k)
        name = f"auto: {index.kind}" + (
            f" nlist={nlist} nprobe={index.index.nprobe} (tuned)" if nlist else ""
        )
        lat = latencies_ms(index, queries, args.k)
        print(f"# n={n} auto built {index.kind} (build {build:.0f} s)", flush=True)
        return [row(n, args.data, name, build, saved, lat, recall_tie_aware(scores, kth))]
    tuned = (index.index.nprobe, index.rerank)
    rows = []
    sweep = {(p, r) for p in args.nprobe for r in args.rerank if p <= nlist and kind != "auto"} | {tuned}
    for nprobe, rerank in sorted(sweep):
        index.index.nprobe, index.rerank = nprobe, rerank
        scores, _ = index.search(queries, args.k)
        lat = latencies_ms(index, queries, args.k)
        mark = " (tuned)" if (nprobe, rerank) == tuned else ""
        name = f"ivfpq nlist={nlist} PQ{vectors.pq_codes(data.shape[1])}x4fs nprobe={nprobe} rerank={rerank}{mark}"
        name = f"auto: {name}" if kind == "auto" else name
        rows.append(row(n, args.data, name, build, saved, lat, recall_tie_aware(scores, kth)))
    print(f"# n={n} ivfpq done (build {build:.0f} s, tuned nprobe/rerank {tuned})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument(
        "--kinds", nargs="+", default=["flat", "ivf"], choices=["flat", "ivf", "ivfpq", "auto", "hnsw"]
    )
    ap.add_argument("--data", default="clustered", choices=["clustered", "lowrank", "uniform"])
    ap.add_argument("--rank", type=int, default=32, help="intrinsic dimension of --data lowrank")
    ap.add_argument(
        "--spread", type=float, default=0.6, help="cluster spread: nearest-centre cosine ~1/sqrt(1+spread²)"
    )
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument(
        "--flat-queries", type=int, default=30, help="queries timed on the (slow, exact) flat index"
    )
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 64], help="IVF nprobe values to sweep")
    ap.add_argument(
        "--rerank", type=int, nargs="+", default=[200, 400], help="ivfpq re-rank depths to sweep (at k=10)"
    )
    ap.add_argument("--ef", type=int, nargs="+", default=[64, 128], help="HNSW efSearch values to sweep")
    ap.add_argument("--hnsw-m", type=int, default=vectors.HNSW_M, help="HNSW graph degree M")
    ap.add_argument(
        "--ef-construction", type=int, default=vectors.HNSW_EF_CONSTRUCTION, help="HNSW build beam"
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="FAISS OpenMP threads for builds (0: FAISS default)"
    )
    ap.add_argument(
        "--search-threads", type=int, default=1, help="FAISS OpenMP threads while timing single queries"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--hnsw-max", type=int, default=100_000, help="skip the HNSW build above this many vectors"
    )
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument(
        "--peak-memory", action="store_true", help="only build the first --kinds and report the peak RSS"
    )
    args = ap.parse_args()
    import logging

    import faiss

    logging.basicConfig(format="# %(message)s")  # the builds' tuning and auto's choice, as --verbose shows
    logging.getLogger("clipsearch.vectors").setLevel(logging.INFO)

    global SEARCH_THREADS
    SEARCH_THREADS = args.search_threads
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if args.peak_memory:
        for n in args.sizes:
            peak_memory(n, args)
        return
    load_before = os.getloadavg()
    rows = []
    for n in args.sizes:
        rows += run(n, args)
    load_after = os.getloadavg()
    print(
        f"\nd={args.dim}, {args.data} data (spread {args.spread}), {args.queries} queries one at a time (flat: {args.flat_queries}), "
        f"k={args.k}, build threads={faiss.omp_get_max_threads()}, search threads={SEARCH_THREADS}, load average {load_before[0]:.1f} -> {load_after[0]:.1f}\n"
    )
    print(
        "| vectors | data | index | build (s) | bytes/vector | open (ms) | p50 (ms) | p99 (ms) | CPU p50 (ms) | recall@10 |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['data']} | {r['index']} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} | {r['open_ms']:.1f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_p50_ms']:.2f} | {r['recall@10']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
