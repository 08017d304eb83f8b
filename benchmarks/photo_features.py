"""Latency of `similar`, filtered queries and the duplicates scan on a large library, as whole processes.

    python benchmarks/photo_features.py [--n 100000] [--runs 5] [--work DIR]

A library of ``--n`` photos is built once through the store API under ``--work`` (default
``/tmp/clipsearch-bench``; later runs reuse it): 512-d unit vectors around 2,000 cluster centres
(photo-like: a tuned IVF index answers in a few cells), 1% of them planted near-duplicates of an
earlier photo (cosine >= 0.98), and metadata from ``Library.set_metadata``: dates over 2015-2025,
one of eight cameras, a GPS position near one of 20 cities for 70% of them, JPEG/HEIF/DNG. The
model is a ViT-B/32 with random weights (``benchmarks/backends.py``), its text tower exported for
the torch-free query path, as ``index`` leaves it.

Each measurement is one fresh ``python -m clipsearch --db DB ...`` process timed from the parent
(wall and CPU of the child, as ``benchmarks/query_latency.py`` does); runs go round-robin over the
variants. The duplicates scan is also timed in-process (``find_duplicates`` only), with the recall
of the planted pairs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import machine, random_model_dir, set_home  # noqa: E402  (sibling benchmarks)
from query_latency import timed  # noqa: E402

CAMERAS = [
    ("Canon", "Canon EOS R5"),
    ("Canon", "Canon EOS 5D Mark IV"),
    ("NIKON CORPORATION", "NIKON D850"),
    ("SONY", "ILCE-7M3"),
    ("Apple", "iPhone 13"),
    ("Apple", "iPhone 15 Pro"),
    ("FUJIFILM", "X-T4"),
    ("Google", "Pixel 8"),
]
CITIES = [(48.8566, 2.3522), (51.5074, -0.1278), (40.7128, -74.006), (35.6762, 139.6503), (52.52, 13.405)]
CITIES += [
    (41.9028, 12.4964),
    (40.4168, -3.7038),
    (55.7558, 37.6173),
    (-33.8688, 151.2093),
    (37.7749, -122.4194),
]
CITIES += [
    (19.4326, -99.1332),
    (-23.5505, -46.6333),
    (1.3521, 103.8198),
    (25.2048, 55.2708),
    (59.3293, 18.0686),
]
CITIES += [(45.4642, 9.19), (50.0755, 14.4378), (47.4979, 19.0402), (38.7223, -9.1393), (60.1699, 24.9384)]


def build_library(db: Path, n: int, model_id: str, source: str, dim: int = 512) -> list[tuple[int, int]]:
    """The library (made once), and the planted near-duplicate pairs ``(original id, copy id)``."""
    import numpy as np

    from clipsearch.metadata import METADATA_VERSION, PhotoMetadata
    from clipsearch.store import Library
    from clipsearch.vectors import VectorIndex

    pairs_file = db.with_name(db.name + ".pairs.npy")
    if db.exists() and pairs_file.exists():
        with Library.open(db) as lib:
            VectorIndex.for_library(lib, model_id)
        return [tuple(p) for p in np.load(pairs_file).tolist()]
    tmp = db.with_name(db.name + ".building")
    for stale in tmp.parent.glob(tmp.name + "*"):
        stale.unlink() if stale.is_file() else None
    rng = np.random.default_rng(n)
    centres = rng.standard_normal((2000, dim)).astype(np.float32)
    lib = Library.open(tmp, create=True)
    lib.register_model(model_id, source, dim=dim)
    planted: list[tuple[int, int]] = []
    kept: dict[int, np.ndarray] = {}
    step = 5_000
    for start in range(0, n, step):
        count = min(step, n - start)
        vectors = centres[rng.integers(0, len(centres), count)] + 0.45 * rng.standard_normal((count, dim))
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        with lib.transaction():
            for k, v in enumerate(vectors):
                i = start + k
                copy_of = None
                if kept and rng.random() < 0.01:  # a resized/recompressed copy of an earlier photo
                    copy_of = int(rng.choice(list(kept)))
                    v = kept[copy_of] + 0.012 * rng.standard_normal(dim).astype(np.float32)
                    v /= np.linalg.norm(v)
                image_id = lib.add_image(
                    f"/photos/{i // 1000:03d}/IMG_{i:06d}.jpg",
                    size=2_000_000,
                    mtime_ns=1,
                    content_hash=f"{i:x}",
                )
                lib.put_embedding(image_id, model_id, v)
                if copy_of is not None:
                    planted.append((copy_of, image_id))
                elif len(kept) < 5000:
                    kept[image_id] = v
                make, model = CAMERAS[int(rng.integers(0, len(CAMERAS)))]
                year, month, day = (
                    int(rng.integers(2015, 2026)),
                    int(rng.integers(1, 13)),
                    int(rng.integers(1, 29)),
                )
                lat = lon = None
                if rng.random() < 0.7:
                    lat, lon = CITIES[int(rng.integers(0, len(CITIES)))]
                    lat, lon = lat + rng.normal(0, 0.2), lon + rng.normal(0, 0.2)
                kind = ("jpeg", "heif", "dng")[int(rng.integers(0, 3))]
                meta = PhotoMetadata(
                    taken_at=f"{year}-{month:02d}-{day:02d}T12:00:00",
                    make=make,
                    model=model,
                    lat=lat,
                    lon=lon,
                    width=4000,
                    height=3000,
                    file_type=kind,
                )
                lib.set_metadata(image_id, meta, METADATA_VERSION)
    lib.close()
    os.replace(tmp, db)
    with Library.open(db) as lib:
        VectorIndex.for_library(lib, model_id)
    np.save(pairs_file, np.array(planted, dtype=np.int64))
    return planted


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    args = ap.parse_args(argv)
    set_home(args.work)

    import numpy as np

    from clipsearch import fastquery
    from clipsearch.checkpoints import load_bundle
    from clipsearch.duplicates import DEFAULT_THRESHOLD, find_duplicates
    from clipsearch.store import Library

    model_dir = random_model_dir(args.work)
    bundle = load_bundle(model_dir)
    fastquery.ensure_text_encoder(bundle)
    env = dict(os.environ)
    db = args.work / f"photos-{args.n}.db"
    start = time.perf_counter()
    planted = build_library(db, args.n, bundle.model_id, str(model_dir))
    built = time.perf_counter() - start
    rng = np.random.default_rng(0)
    cli = [sys.executable, "-m", "clipsearch", "--db", str(db)]
    variants = {
        "similar ID (stored embedding)": lambda i: [
            *cli,
            "similar",
            str(int(rng.integers(1, args.n))),
            "--paths",
        ],
        "query TEXT (no filter)": lambda i: [*cli, "query", "a dog on a beach", "--paths"],
        "query TEXT --camera canon --after 2020": lambda i: [
            *cli,
            "query",
            "a dog on a beach",
            "--camera",
            "canon",
            "--after",
            "2020",
            "--paths",
        ],
        "query TEXT --near Paris --within 25": lambda i: [
            *cli,
            "query",
            "a dog on a beach",
            "--near",
            "48.8566,2.3522",
            "--within",
            "25",
            "--paths",
        ],
        "query TEXT --type dng --before 2018": lambda i: [
            *cli,
            "query",
            "a dog on a beach",
            "--type",
            "dng",
            "--before",
            "2018",
            "--paths",
        ],
        "(the interpreter alone: python -c)": lambda i: [sys.executable, "-c", "print(1)"],
    }
    load_before = os.getloadavg()
    timed(variants["query TEXT (no filter)"](0), env)  # warms the text cache and the page cache
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for i in range(args.runs):
        for name, make in variants.items():
            times[name].append(timed(make(i), env))
    scans = []
    with Library.open(db, readonly=True) as lib:
        for _ in range(max(1, args.runs // 2)):
            t0 = time.perf_counter()
            groups = find_duplicates(lib, bundle.model_id, DEFAULT_THRESHOLD)
            scans.append(time.perf_counter() - t0)
    grouped = {}
    for n, g in enumerate(groups):
        for p in g.photos:
            grouped[p.id] = n
    found = sum(1 for a, b in planted if a in grouped and grouped.get(a) == grouped.get(b))
    whole = [timed([*cli, "duplicates", "--json"], env) for _ in range(max(1, args.runs // 2))]

    print(f"# whole processes on a {args.n:,}-photo library, {args.runs} runs (ViT-B/32 text tower, top 20)")
    print(f"# {machine()}")
    load_after = os.getloadavg()
    print(
        f"# load average (1/5/15 min): start {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"end {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}"
    )
    print("| command | wall median s | wall min s | CPU median s | CPU min s |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        walls, cpus = [w for w, _ in ts], [c for _, c in ts]
        print(
            f"| {name} | {statistics.median(walls):.3f} | {min(walls):.3f} | "
            f"{statistics.median(cpus):.3f} | {min(cpus):.3f} |"
        )
    walls, cpus = [w for w, _ in whole], [c for _, c in whole]
    print(
        f"| duplicates --json (whole process) | {statistics.median(walls):.2f} | {min(walls):.2f} | "
        f"{statistics.median(cpus):.2f} | {min(cpus):.2f} |"
    )
    print(
        f"\nduplicates scan in-process (find_duplicates, threshold {DEFAULT_THRESHOLD}): median "
        f"{statistics.median(scans):.2f} s, min {min(scans):.2f} s; {len(groups)} groups; planted pairs found "
        f"{found}/{len(planted)} ({found / max(1, len(planted)):.3f})"
    )
    print(f"library + index built in {built:.0f} s (once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
