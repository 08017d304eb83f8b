"""How search scales: flat (exact) vs HNSW as built by ``clipsearch.vectors``, on synthetic vectors.

Data: L2-normalised 512-d vectors drawn around 1,000 random centres (CLIP embeddings of a photo
collection are clustered, and uniform data would flatter neither index). Queries are fresh draws
from the same mixture. Recall@10 is measured against the flat index's exact answer.

    python benchmarks/search_scale.py --sizes 100000 1000000 --threads 2

Prints a Markdown table (results are recorded in ``benchmarks/search_scale.md``). 1M vectors need
~2 GB for the data plus as much again for each index: run it once, not in a loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from clipsearch import vectors
from clipsearch.vectors import VectorIndex


def clustered(n: int, d: int, rng: np.random.Generator, centres: np.ndarray, spread: float) -> np.ndarray:
    """``n`` normalised vectors around ``centres``, built in chunks to bound temporary memory."""
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(0, len(centres), m)] + spread * rng.standard_normal((m, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


def index_bytes(index: VectorIndex) -> int:
    """Size of the saved index file (what is memory-mapped on load)."""
    import os
    import tempfile

    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.index")
        faiss.write_index(index.index, path)
        return os.path.getsize(path)


def latencies_ms(index: VectorIndex, queries: np.ndarray, k: int) -> list[float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - t) * 1000)
    return times


def recall_at(got: np.ndarray, want: np.ndarray) -> float:
    k = want.shape[1]
    return float(np.mean([len(set(g) & set(w)) / k for g, w in zip(got, want, strict=True)]))


def run(n: int, d: int, n_queries: int, k: int, ef_values: list[int], seed: int, hnsw: bool) -> list[dict]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, d), dtype=np.float32) / np.sqrt(d)
    spread = 0.6 / np.sqrt(d)  # puts a point's nearest centre at cosine ~0.85, like CLIP photo clusters
    data = clustered(n, d, rng, centres, spread)
    queries = clustered(n_queries, d, rng, centres, spread)
    ids = np.arange(1, n + 1, dtype=np.int64)
    rows = []

    t = time.perf_counter()
    flat = VectorIndex.build(ids, data, kind="flat")
    build = time.perf_counter() - t
    _, exact = flat.search(queries, k)
    lat = latencies_ms(flat, queries, k)
    rows.append(
        {
            "n": n,
            "index": "flat",
            "build_s": build,
            "bytes_per_vector": index_bytes(flat) / n,
            "median_ms": statistics.median(lat),
            "p95_ms": float(np.percentile(lat, 95)),
            "recall@10": 1.0,
        }
    )
    del flat
    if not hnsw:
        return rows

    t = time.perf_counter()
    hnsw = VectorIndex.build(ids, data, kind="hnsw")
    build = time.perf_counter() - t
    per_vector = index_bytes(hnsw) / n
    for ef in ef_values:
        vectors.HNSW_EF_SEARCH = ef  # the search-time beam; the graph is unchanged
        _, got = hnsw.search(queries, k)
        lat = latencies_ms(hnsw, queries, k)
        rows.append(
            {
                "n": n,
                "index": f"hnsw M={vectors.HNSW_M} ef={ef}",
                "build_s": build,
                "bytes_per_vector": per_vector,
                "median_ms": statistics.median(lat),
                "p95_ms": float(np.percentile(lat, 95)),
                "recall@10": recall_at(got, exact),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: FAISS default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hnsw-max", type=int, default=10**9, help="skip the HNSW build above this many vectors")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        rows += run(n, args.dim, args.queries, args.k, args.ef, args.seed, n <= args.hnsw_max)
        print(f"# done n={n}", flush=True)
    print(
        f"\nd={args.dim}, {args.queries} queries one at a time, k={args.k}, threads={faiss.omp_get_max_threads()}\n"
    )
    print("| vectors | index | build (s) | bytes/vector | median query (ms) | p95 (ms) | recall@10 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['index']} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} | "
            f"{r['median_ms']:.2f} | {r['p95_ms']:.2f} | {r['recall@10']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
