"""`clipsearch web` latency as a browser meets it: start, first search, warm search, 100 thumbnails.

    python benchmarks/web_latency.py [--size 100000] [--runs 15] [--photos 100] [--work DIR]

Two libraries, built once under ``--work`` (default ``/tmp/clipsearch-bench``) and reused:

- ``query-N.db``: N images with synthetic 512-d vectors, as ``benchmarks/query_latency.py`` builds
  it (same file, shared), the ViT-B/32 text tower with random weights (a trained one's cost);
- ``web-thumbs.db``: ``--photos`` real 6 MP JPEGs on disk (3000x2000, ~1-2 MB each), with synthetic
  vectors, for the thumbnail page.

Each run starts a fresh ``python -m clipsearch --db DB web --port 0`` process and times, from the
parent, over HTTP on loopback (the whole response read: the page's HTML, as a browser gets it):

- ``ready``: process start until it printed its address (library opened, encoder and index warm);
- ``first search``: the first ``GET /?q=TEXT`` after that;
- ``warm search, new text``: later searches with a text never asked before (the text tower runs);
- ``warm search, repeated text``: a text whose features are cached;
- ``thumbnail page of 100, cold``: 100 ``GET /thumb/ID`` over 6 connections at once (a browser's
  per-host limit) with an empty thumbnail cache (each photo decoded, scaled, written);
- ``thumbnail page of 100, warm``: the same again, from the cache.

Medians and minimums over the runs; the load average is printed beside them (a shared machine).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import machine, random_model_dir, set_home  # noqa: E402  (sibling benchmarks)
from query_latency import build_library  # noqa: E402

CONNECTIONS = 6  # Chromium's and Firefox's parallel connections per host


def build_photo_library(db: Path, folder: Path, n: int, model_id: str, source: str) -> None:
    """``n`` real 6 MP JPEGs in ``folder`` with random unit vectors in ``db`` (made once)."""
    import numpy as np
    from PIL import Image

    from clipsearch.store import Library
    from clipsearch.vectors import VectorIndex

    if db.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)  # a smooth picture, photo-like bytes
    lib = Library.open(db, create=True)
    lib.register_model(model_id, source, dim=512)
    with lib.transaction():
        for i in range(n):
            path = folder / f"IMG_{i:04d}.jpg"
            if not path.exists():
                tint = rng.integers(0, 255, 3, dtype=np.uint8)
                img = Image.fromarray((small // 2 + tint // 2).astype(np.uint8)).resize(
                    (3000, 2000), Image.BICUBIC
                )
                img.save(path, quality=92)
            image_id = lib.add_image(path, size=path.stat().st_size, mtime_ns=1, content_hash=f"bench{i:06d}")
            v = rng.standard_normal(512).astype(np.float32)
            lib.put_embedding(image_id, model_id, v / np.linalg.norm(v))
    VectorIndex.for_library(lib, model_id)
    lib.close()


class Server:
    def __init__(self, db: Path):
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clipsearch", "--db", str(db), "web", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        self.ready = time.perf_counter() - self.start
        match = re.search(r"at (http://\S+) ", line)
        if match is None:
            raise SystemExit(f"the server did not start: {line!r} {self.proc.stderr.read()}")
        parts = urlsplit(match.group(1))
        self.host, self.port = parts.hostname, parts.port

    def get(self, path: str, conn=None) -> float:
        own = conn is None
        conn = conn or http.client.HTTPConnection(self.host, self.port, timeout=120)
        t = time.perf_counter()
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        elapsed = time.perf_counter() - t
        if r.status != 200:
            raise SystemExit(f"GET {path}: {r.status}")
        if own:
            conn.close()
        return elapsed

    def thumbnail_page(self, ids: list[int]) -> float:
        """Wall time to fetch every thumbnail over CONNECTIONS keep-alive connections."""
        chunks = [ids[i::CONNECTIONS] for i in range(CONNECTIONS)]

        def fetch(chunk):
            conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            for i in chunk:
                self.get(f"/thumb/{i}", conn)
            conn.close()

        t = time.perf_counter()
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            list(pool.map(fetch, chunks))
        return time.perf_counter() - t

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=30)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=100_000, help="images in the search library")
    ap.add_argument("--runs", type=int, default=15, help="server starts (each: first + warm searches)")
    ap.add_argument("--warm", type=int, default=5, help="warm searches of each kind per server start")
    ap.add_argument("--photos", type=int, default=100, help="real photos for the thumbnail page")
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    args = ap.parse_args(argv)
    set_home(args.work)
    home = Path(os.environ["CLIPSEARCH_HOME"])

    from clipsearch import fastquery
    from clipsearch.checkpoints import load_bundle
    from clipsearch.store import Library

    model_dir = random_model_dir(args.work)
    bundle = load_bundle(model_dir)
    fastquery.ensure_text_encoder(bundle)
    search_db = args.work / f"query-{args.size}.db"
    build_library(search_db, args.size, bundle.model_id, str(model_dir))
    thumbs_db = args.work / "web-thumbs.db"
    build_photo_library(thumbs_db, args.work / "web-photos", args.photos, bundle.model_id, str(model_dir))
    with Library.open(thumbs_db) as lib:
        ids = [r.id for r in lib.images()][: args.photos]

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {k: [] for k in ("ready", "first", "new", "repeated", "cold", "warm")}
    for run in range(args.runs):
        server = Server(search_db)
        try:
            times["ready"].append(server.ready)
            times["first"].append(server.get("/?q=" + quote(f"a first search {run} {time.time_ns()}")))
            server.get("/?q=repeated+text")
            for i in range(args.warm):
                times["new"].append(server.get("/?q=" + quote(f"a new text {run} {i} {time.time_ns()}")))
                times["repeated"].append(server.get("/?q=repeated+text"))
        finally:
            server.stop()
    for _ in range(max(3, args.runs // 3)):
        shutil.rmtree(home / "thumbnails", ignore_errors=True)
        server = Server(thumbs_db)
        try:
            times["cold"].append(server.thumbnail_page(ids))
            times["warm"].append(server.thumbnail_page(ids))
        finally:
            server.stop()
    load_after = os.getloadavg()

    names = {
        "ready": "ready (start until the address is printed)",
        "first": "first search after start",
        "new": "warm search, new text",
        "repeated": "warm search, repeated text",
        "cold": f"thumbnail page of {len(ids)}, cold (made now)",
        "warm": f"thumbnail page of {len(ids)}, warm (cached)",
    }
    print(machine())
    print(f"search library: {args.size:,} images; load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print("| measure | runs | median s | min s |")
    print("|---|---:|---:|---:|")
    for key, label in names.items():
        v = times[key]
        print(f"| {label} | {len(v)} | {statistics.median(v):.3f} | {min(v):.3f} |")


if __name__ == "__main__":
    main()
