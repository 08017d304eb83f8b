"""Peak resident memory while indexing: does it stay flat as the collection grows?

    python benchmarks/memory.py [--sizes 48,192] [--megapixels 2] [--work DIR]

For each size, one fresh process indexes that many photo-like JPEGs and reports its peak RSS
(``ru_maxrss``) and the RSS after loading the model, twice: with the library's indexer
(``clipsearch.indexer.index_paths``, torch fp32, into a new library), and with the fast pipeline of
``benchmarks/index_speed.py`` (draft decoding in threads + the ``auto`` backend). The photos are
distinct files (different bytes, so nothing is deduplicated) made from a few generated bases.
Streaming means the peak is the same for 48 photos and for 4x as many.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import machine, random_model_dir, set_home  # noqa: E402  (the sibling benchmark)

CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[4])
from pathlib import Path
mode, folder, model_dir = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
n = int(sys.argv[5])
from clipsearch.checkpoints import load_bundle
bundle = load_bundle(model_dir)
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
loaded = rss_mb()
paths = sorted(folder.glob("*.jpg"))[:n]
start = time.perf_counter()
if mode == "indexer":
    import tempfile
    from clipsearch.indexer import index_paths
    from clipsearch.store import Library
    work = Path(tempfile.mkdtemp())
    with Library.open(work / "lib.db", create=True) as lib:
        report = index_paths(lib, bundle, paths)
    done = report.embedded
else:
    from clipsearch.backends import make_image_encoder
    from index_speed import fast
    done = len(fast(bundle, make_image_encoder(bundle, "auto"), paths))
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"loaded_mb": loaded, "peak_mb": peak, "images": done, "seconds": elapsed}))
"""


def make_distinct_photos(directory: Path, n: int, megapixels: float, bases: int = 6) -> None:
    """``n`` JPEGs: a few generated bases, each copy with its own noise patch (distinct bytes)."""
    from PIL import Image

    from clipsearch.backends import synthetic_photo

    directory.mkdir(parents=True, exist_ok=True)
    width = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    height = width * 3 // 4
    base_images = None
    for i in range(n):
        path = directory / f"IMG_{i:05d}.jpg"
        if path.exists():
            continue
        if base_images is None:
            base_images = [synthetic_photo(np.random.default_rng(b), width, height) for b in range(bases)]
        rng = np.random.default_rng(1000 + i)
        pixels = base_images[i % bases].copy()
        y, x = int(rng.integers(0, height - 64)), int(rng.integers(0, width - 64))
        pixels[y : y + 64, x : x + 64] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        tmp = path.with_suffix(".tmp")
        Image.fromarray(pixels).save(tmp, "JPEG", quality=90)
        os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="48,192")
    ap.add_argument("--megapixels", type=float, default=2.0)
    ap.add_argument("--modes", default="indexer,fast")
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    args = ap.parse_args(argv)
    set_home(args.work)

    sizes = [int(s) for s in args.sizes.split(",")]
    folder = args.work / f"photos-distinct-{args.megapixels:g}mp"
    make_distinct_photos(folder, max(sizes), args.megapixels)
    model_dir = random_model_dir(args.work)
    here = str(Path(__file__).resolve().parent)
    rows = []
    for mode in args.modes.split(","):
        for n in sizes:
            cmd = [sys.executable, "-c", CHILD, mode, str(folder), str(model_dir), here, str(n)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=os.environ.copy())
            if out.returncode != 0:
                raise SystemExit(f"{mode} {n} failed:\n{out.stderr[-2000:]}")
            rows.append((mode, n, json.loads(out.stdout.strip().splitlines()[-1])))

    print(f"# peak RSS while indexing {args.megapixels:g} MP JPEGs, ViT-B/32 (random weights), batch 32")
    print(f"# {machine()}")
    print("| pipeline | photos | RSS after model load MB | peak RSS MB | images/s |")
    print("|---|---:|---:|---:|---:|")
    for mode, n, r in rows:
        ips = r["images"] / r["seconds"] if r["seconds"] else float("nan")
        print(f"| {mode} | {n} | {r['loaded_mb']:.0f} | {r['peak_mb']:.0f} | {ips:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
