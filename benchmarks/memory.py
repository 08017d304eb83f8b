"""Peak resident memory while indexing: does it stay flat as the collection grows?

    python benchmarks/memory.py [--sizes 250,500,1000,2000] [--megapixels 12] [--backends auto]
                                [--work DIR] [--keep]

For each size N, one fresh process loads ViT-B/32 (random weights: no downloads here) and indexes N
large photo-like JPEGs with the real indexer (``clipsearch.indexer.index_paths``, into a new
library: walk, read and hash, draft decode in the thread pool, the backend, SQLite, FAISS). Its peak
RSS is the child's own ``ru_maxrss`` as the kernel reports it to the parent (``os.wait4``).

The photos: a few distinct generated 12 MP bases; every file is a base's bytes with its own JPEG
comment segment (COM) after the start-of-image marker, so every file has a distinct hash and is read,
hashed *and decoded* (nothing is reused as a duplicate) while the pixels cost nothing to make. The
sizes are nested (the N=500 run indexes the 250 of the first run and 250 more), so the largest size
sets the disk use (~1.5 MB a photo: ~3 GB for 2000); the photos are deleted at the end unless
``--keep``. The ``auto`` backend is measured once before the children start (it is cached per model),
so the children measure the steady state of an index run; ``--first-run`` adds a row for a
machine that never saw the model (an empty ``CLIPSEARCH_HOME``: the run settles on its own photos)
and one for the one-time work the CLI then starts in the background (``python -m clipsearch.settle``:
ONNX export, quantisation, measurement, text export), each peak its own process's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import machine, random_model_dir, set_home  # noqa: E402  (the sibling benchmark)

CHILD = """
import json, sys, tempfile, time
from pathlib import Path
model_dir, backend, out = sys.argv[1], sys.argv[2], sys.argv[3]
folders = [Path(p) for p in sys.argv[4:]]
try:  # as `clipsearch index` opens it: the torch model is built only if a step needs it
    from clipsearch.checkpoints import open_bundle as load_bundle
except ImportError:  # an older checkout (--before runs): loaded up front
    from clipsearch.checkpoints import load_bundle
from clipsearch.indexer import index_paths
from clipsearch.store import Library

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

bundle = load_bundle(model_dir)
loaded = rss_mb()
start = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp, Library.open(Path(tmp) / "lib.db", create=True) as lib:
    report = index_paths(lib, bundle, folders, backend=backend)
elapsed = time.perf_counter() - start
hwm = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
Path(out).write_text(json.dumps({
    "loaded_mb": loaded, "torch": "torch" in sys.modules, "hwm_mb": hwm, "images": report.embedded, "failed": len(report.failed),
    "duplicates": report.duplicates, "seconds": elapsed, "backend": report.backend,
}))
"""


def _with_comment(jpeg: bytes, text: str) -> bytes:
    """``jpeg`` with a COM segment right after SOI: other bytes, same pixels."""
    assert jpeg[:2] == b"\xff\xd8", "not a JPEG"
    body = text.encode("ascii")
    return jpeg[:2] + b"\xff\xfe" + (len(body) + 2).to_bytes(2, "big") + body + jpeg[2:]


def make_unique_photos(root: Path, sizes: list[int], megapixels: float, bases: int = 8) -> list[Path]:
    """Nested folders ``part-K`` whose union up to K holds ``sizes[K]`` distinct JPEG files."""
    import io

    from PIL import Image

    from clipsearch.backends import synthetic_photo

    width = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    height = width * 3 // 4
    base_bytes = []
    for b in range(bases):
        rng = np.random.default_rng(b)
        small = Image.fromarray(synthetic_photo(rng, width // 4, height // 4)).resize(
            (width, height), Image.BICUBIC
        )
        grain = rng.integers(-4, 5, (height, width, 3), dtype=np.int16)
        pixels = np.clip(np.asarray(small, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=85)
        base_bytes.append(buf.getvalue())
    folders, made = [], 0
    for k, n in enumerate(sizes):
        folder = root / f"part-{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(made, n):
            (folder / f"IMG_{i:05d}.jpg").write_bytes(_with_comment(base_bytes[i % bases], f"copy {i}"))
        made = max(made, n)
        folders.append(folder)
    return folders


def peak_of_child(cmd: list[str], env: dict | None = None, unnice: bool = False) -> tuple[float, str]:
    """Run ``cmd``; return (its peak RSS in MB from the kernel's rusage for it, its stderr).

    The kernel's figure for a child is the largest of its own peak and those of the children it
    waited for (``clipsearch.settle``'s quantiser process): the one-time work's peak, all included.

    ``unnice``: set the child back to normal priority once it started (``clipsearch.settle`` nices
    itself to 19, which on a busy machine stretches this benchmark by many minutes; memory is the same).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    if unnice:
        import threading

        def back_to_normal():
            for _ in range(20):
                time.sleep(0.5)
                try:
                    os.setpriority(os.PRIO_PROCESS, proc.pid, 0)
                except OSError:  # gone already, or not allowed: it keeps the lowest priority
                    return

        threading.Thread(target=back_to_normal, daemon=True).start()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return usage.ru_maxrss / 1024, err.decode(errors="replace")  # Linux reports kilobytes


def prepare(args, sizes: list[int]) -> dict:
    """In a process of its own (see main): the model file, the cached auto verdict, the photos."""
    from clipsearch import backends
    from clipsearch.checkpoints import load_bundle

    model_dir = random_model_dir(args.work)
    bundle = load_bundle(model_dir)
    for name in args.backends.split(","):
        if name == "auto" and backends.needs_measuring(bundle):
            backends.make_image_encoder(bundle, "auto")  # once per model: cached for the children
    photo_root = args.work / f"photos-unique-{args.megapixels:g}mp"
    folders = make_unique_photos(photo_root, sizes, args.megapixels)
    return {
        "model_dir": str(model_dir),
        "photo_root": str(photo_root),
        "folders": [str(f) for f in folders],
        "disk_gb": sum(p.stat().st_size for p in photo_root.rglob("*.jpg")) / 1e9,
        "machine": machine(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="250,500,1000,2000")
    ap.add_argument("--megapixels", type=float, default=12.0)
    ap.add_argument("--backends", default="auto", help="comma-separated: a row per size for each")
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated photos for the next run")
    ap.add_argument(
        "--first-run",
        action="store_true",
        help="two more rows: the smallest size with an empty CLIPSEARCH_HOME (settles on its photos), then "
        "the background settle that exports and measures, as a process of its own",
    )
    ap.add_argument(
        "--tree",
        type=Path,
        help="measure the clipsearch of another checkout (put first on PYTHONPATH of every child; give "
        "it its own --work): before/after side by side",
    )
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tree is not None:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(args.tree.resolve()), os.environ.get("PYTHONPATH", "")]
        )
    set_home(args.work)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if args.prepare:
        print(json.dumps(prepare(args, sizes)))
        return 0

    # This process stays small (no torch, no pixels): on Linux a child's ru_maxrss starts from its
    # parent's peak at fork, so a big parent would hide the children's own peaks.
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    prep_cmd = [
        sys.executable,
        __file__,
        "--prepare",
        "--sizes",
        args.sizes,
        "--megapixels",
        str(args.megapixels),
    ]
    prep_cmd += ["--backends", args.backends, "--work", str(args.work)]
    prep = json.loads(subprocess.run(prep_cmd, check=True, capture_output=True, text=True).stdout)
    rows = []
    try:
        for name in args.backends.split(","):
            for k, n in enumerate(sizes):
                with tempfile.NamedTemporaryFile(suffix=".json") as out:
                    cmd = [sys.executable, "-c", CHILD, prep["model_dir"], name, out.name]
                    cmd += prep["folders"][: k + 1]
                    peak, _ = peak_of_child(cmd)
                    result = json.loads(Path(out.name).read_text())
                if result["images"] != n or result["duplicates"]:
                    raise SystemExit(f"expected {n} photos embedded, got {result}")
                rows.append((name, n, peak, result))
        if args.first_run:
            # A machine that never saw this model: the run exports, quantises and measures first.
            with tempfile.TemporaryDirectory(dir=args.work) as home, tempfile.NamedTemporaryFile() as out:
                cmd = [sys.executable, "-c", CHILD, prep["model_dir"], "auto", out.name, prep["folders"][0]]
                peak, _ = peak_of_child(cmd, env={**os.environ, "CLIPSEARCH_HOME": home})
                result = json.loads(Path(out.name).read_text())
                rows.append(("auto, first run", sizes[0], peak, result))
                # then the one-time work the CLI starts after it (clipsearch.settle), as its own process
                start = time.perf_counter()
                settle_cmd = [sys.executable, "-m", "clipsearch.settle", prep["model_dir"]]
                settle_peak, settle_log = peak_of_child(
                    settle_cmd, env={**os.environ, "CLIPSEARCH_HOME": home}, unnice=True
                )
                settled = {"backend": "settle", "seconds": time.perf_counter() - start, "images": 0}
                # their own peaks, from the settle's log (the rusage figure above is the larger of the
                # two, and the quantiser's own would also count the settle's memory at the fork)
                own = re.search(r"peak memory of this process (\d+) MB", settle_log)
                quantiser = re.search(r"quantised .* \(its peak memory (\d+) MB\)", settle_log)
                if own and quantiser:
                    settled["own_mb"], settled["quantiser_mb"] = int(own.group(1)), int(quantiser.group(1))
                rows.append(
                    ("settle", 0, settle_peak, {**settled, "loaded_mb": float("nan"), "hwm_mb": float("nan")})
                )
    finally:
        if not args.keep:
            shutil.rmtree(prep["photo_root"], ignore_errors=True)
    load_end = os.getloadavg()[0]

    print(
        f"# peak RSS while indexing {args.megapixels:g} MP JPEGs (distinct files, each decoded), ViT-B/32 "
        f"(random weights), batch 32; photos on disk {prep['disk_gb']:.1f} GB"
    )
    print(f"# {prep['machine']}; load average {load_start:.1f} before, {load_end:.1f} after")
    print(f"# clipsearch from {args.tree or 'this checkout'}")
    print(
        "| backend | photos | RSS after model open MB | torch imported | peak RSS MB (rusage) | peak (VmHWM) MB | images/s |"
    )
    print("|---|---:|---:|---|---:|---:|---:|")
    for name, n, peak, r in rows:
        ips = r["images"] / r["seconds"] if r["seconds"] else float("nan")
        label = name if name == r["backend"] else f"{name} ({r['backend']})"
        if name == "auto, first run":
            label = f"auto ({r['backend']}), first run: settles on its photos, exports nothing"
        if name == "settle":
            label = f"then `python -m clipsearch.settle` (exports, quantises, measures: {r['seconds']:.0f} s; background)"
            if "own_mb" in r:
                label += f": itself {r['own_mb']} MB, its quantiser child {r['quantiser_mb']} MB"
        imported = {True: "yes", False: "no"}.get(r.get("torch"), "yes")  # settle always does
        print(
            f"| {label} | {n} | {r['loaded_mb']:.0f} | {imported} | {peak:.0f} | {r['hwm_mb']:.0f} | {ips:.1f} |"
        )
    print(f"\n({time.perf_counter() - started:.0f} s in all, photos made and deleted included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
