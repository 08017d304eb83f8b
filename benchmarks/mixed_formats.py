"""A mixed-format photo folder (JPEG, PNG with and without alpha, WebP, HEIC), and decode speed on it.

The folder (``make_folder``): real photographs from Debian's wallpaper packages, 2-4 MP each, every
source used in turn (each round a tighter crop, so no two files share content) and the formats in
turn, so every format gets a mix of pictures. Recipe, no network but Debian's archive::

    mkdir -p /tmp/wallpapers && cd /tmp/wallpapers
    apt-get update && apt-get download gnome-backgrounds plasma-workspace-wallpapers ukui-wallpapers lomiri-wallpapers
    for f in *.deb; do dpkg -x "$f" root; done
    python benchmarks/mixed_formats.py make --sources /tmp/wallpapers/root --out /tmp/mixed --n 130

Without ``--sources`` (or with too few pictures there) the folder is filled with photo-like synthetic
images instead (``clipsearch.backends.synthetic_photo``), which compress and decode differently:
say which one a figure used.

The decode benchmark (``python benchmarks/mixed_formats.py decode --folder /tmp/mixed``) times, per
format, what an index run does to a photo before the model (decode, orientation, alpha, the eval
transform) the old way (full decode) and the new way (``open_image(draft_size=S)``: JPEG DCT scaling,
libwebp's scaler, box reduction after decoding), alternating the two per file, and reports the
cosine between the two pipelines' pixel tensors. The whole-process comparison with rclip on the
same folder is ``benchmarks/rclip_compare.py --folder``.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

# The formats in turn; HEIC once in ten (phones' format, but slow to encode here: ~10 s a photo).
FORMATS = ("jpg", "png", "alpha.png", "webp", "heic", "jpg", "png", "alpha.png", "webp", "jpg")
MIN_PIXELS = 1_500_000  # sources smaller than this are skipped: the set is of camera-sized photos
MAX_PIXELS = 4_000_000  # and larger ones are scaled down to about this (the "2-4 MP")


def source_images(root: Path) -> list[Path]:
    """Pictures of at least MIN_PIXELS under ``root``, one per distinct name stem (a wallpaper
    package ships the same picture at several resolutions: the largest is kept)."""
    from PIL import Image

    best: dict[str, tuple[int, Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp") or not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                pixels = im.size[0] * im.size[1]
        except OSError:
            continue
        if pixels < MIN_PIXELS:
            continue
        in_kde_layout = path.parent.name == "images" and path.parent.parent.name == "contents"
        key = (
            str(path.parents[2]) if in_kde_layout else str(path.with_suffix(""))
        )  # NAME/contents/images/WxH.jpg
        if key not in best or pixels > best[key][0]:
            best[key] = (pixels, path)
    return [p for _, p in sorted(best.values(), key=lambda t: str(t[1]))]


def _alpha(size, seed: int) -> np.ndarray:
    """A soft vignette with a transparent corner: what a cut-out or a rounded screenshot has."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((xx - w / 2) / w, (yy - h / 2) / h)
    a = np.clip(1.25 - 1.5 * r, 0, 1) * 255
    a[: h // 6, : w // 6] = 0
    return a.astype(np.uint8)


def _write(img, path: Path, fmt: str, seed: int) -> Path:
    from PIL import Image

    rgb = img.convert("RGB")
    if fmt == "jpg":
        rgb.save(path, "JPEG", quality=90)
    elif fmt == "png":
        rgb.save(path, "PNG", compress_level=6)
    elif fmt == "alpha.png":
        rgba = rgb.copy()
        rgba.putalpha(Image.fromarray(_alpha(rgb.size, seed)))
        rgba.save(path, "PNG", compress_level=6)
    elif fmt == "webp":
        rgb.save(path, "WEBP", quality=85)
    elif fmt == "heic":
        import pillow_heif

        pillow_heif.register_heif_opener()
        rgb.save(path, "HEIF", quality=85)
    return path


def make_folder(out: Path, n: int, sources: Path | None = None, seed: int = 0, workers: int = 1) -> dict:
    """Write ``n`` photos to ``out`` (made once: an existing complete folder is kept); returns counts.

    ``workers`` > 1 writes them in that many processes (HEIC encodes take seconds each); each file's
    content depends only on its number and ``seed``, so the folder is the same either way."""
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(existing) >= n:
        return _describe(existing[:n])
    pictures = source_images(sources) if sources else []
    kind = "wallpapers" if len(pictures) >= 8 else "synthetic"
    todo = [i for i in range(n) if not (out / f"photo_{i:04d}.{FORMATS[i % len(FORMATS)]}").is_file()]
    if workers > 1 and len(todo) > 1:  # an interrupted run resumes: finished files are kept
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawned, not forked: the caller may hold threads (PyTorch's, CUDA's) that a fork would copy mid-lock
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=spawn) as pool:
            list(pool.map(_make_one, todo, [out] * len(todo), [pictures] * len(todo), [seed] * len(todo)))
    else:
        for i in todo:
            _make_one(i, out, pictures, seed)
    (out / ".source").write_text(kind + "\n")
    return _describe(sorted(p for p in out.iterdir() if p.is_file() and not p.name.startswith(".")))


def _make_one(i: int, out: Path, pictures: list[Path], seed: int) -> None:
    """Photo number ``i``: a crop of a real picture when there are enough of them, else synthetic."""
    from PIL import Image

    fmt = FORMATS[i % len(FORMATS)]
    if len(pictures) >= 8:
        src = pictures[i % len(pictures)]
        im = Image.open(src)
        im.load()
        w, h = im.size
        # a different crop each time a picture comes round again: distinct content
        trim = 0.05 * (i // len(pictures))
        im = im.crop((int(w * trim), int(h * trim), w - int(w * trim / 2), h - int(h * trim / 2)))
    else:
        from clipsearch.backends import synthetic_photo

        w, h = (2400, 1600) if i % 3 else (1600, 2400)
        small = Image.fromarray(synthetic_photo(np.random.default_rng([seed, i]), w // 4, h // 4))
        im = small.resize((w, h), Image.BICUBIC)
    w, h = im.size
    scale = (MAX_PIXELS / (w * h)) ** 0.5
    if scale < 1:
        im = im.convert("RGB").resize((round(w * scale), round(h * scale)), Image.LANCZOS)
    tmp = out / f".part_{i:04d}.{fmt}"  # written whole, then renamed: a folder never holds half a file
    _write(im, tmp, fmt, i)
    tmp.rename(out / f"photo_{i:04d}.{fmt}")


def _fmt_of(path: Path) -> str:
    return path.name.split(".", 1)[1]


def _describe(paths) -> dict:
    counts: dict[str, int] = defaultdict(int)
    for p in paths:
        counts[_fmt_of(p)] += 1
    return dict(counts)


def decode_benchmark(folder: Path, size: int, repeats: int) -> None:
    """What the indexer does to each file before the model, the old way and the new, per format.

    old: Pillow's full decode and the eval transform (the reference pipeline), and the metadata as
    Pillow's ``getexif()`` reads it (which decodes a PNG's pixels); new: ``open_image(draft_size=S)``
    (reduced decodes, libvips for PNG) and ``metadata.read_metadata``. Both ways alternate on every
    file; CPU time of the process (libvips and libheif decode in threads of their own) and wall time.
    """
    from unittest import mock

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from backends import machine

    from clipsearch import pngvips
    from clipsearch.imageio import _identify, open_image
    from clipsearch.metadata import read_metadata
    from clipsearch.transform import PreprocessConfig, image_transform

    t = image_transform(PreprocessConfig(size))
    pixels = getattr(t, "array", t)  # numpy where the transform has it (what the indexer runs)

    def old(data: bytes):
        with mock.patch.object(pngvips, "decode", lambda data, im, shrink=1: None):
            x = pixels(open_image(io.BytesIO(data)))
        _identify(io.BytesIO(data), "old", None).getexif()
        return x

    def new(data: bytes, path: Path):
        x = pixels(open_image(io.BytesIO(data), draft_size=size))
        read_metadata(io.BytesIO(data), path)
        return x

    paths = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    new(paths[0].read_bytes(), paths[0])  # imports and library loads out of the timings
    old(paths[0].read_bytes())
    cpu: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"old": [], "new": []})
    wall: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"old": [], "new": []})
    cosines: dict[str, list[float]] = defaultdict(list)
    load = os.getloadavg()[0]
    for path in paths:
        data = path.read_bytes()
        fmt = _fmt_of(path)
        for _ in range(repeats):
            for way in ("old", "new"):
                c, w = time.process_time(), time.perf_counter()
                x = old(data) if way == "old" else new(data, path)
                cpu[fmt][way].append(time.process_time() - c)
                wall[fmt][way].append(time.perf_counter() - w)
                if way == "old":
                    ref = x
        a, b = np.asarray(ref, np.float64).ravel(), np.asarray(x, np.float64).ravel()
        cosines[fmt].append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    print(machine())
    print(
        f"\n{len(paths)} files in {folder} ({(folder / '.source').read_text().strip() if (folder / '.source').exists() else '?'}), "
        f"model input {size} px, median of {repeats} per file, one caller thread; load average "
        f"{load:.1f} -> {os.getloadavg()[0]:.1f}; libvips for PNG: {pngvips.available()}\n"
    )
    print(
        "| format | files | old CPU ms | new CPU ms | CPU saved | old wall ms | new wall ms | worst pixel cosine |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for fmt in sorted(cpu):
        oc, nc = (statistics.median(cpu[fmt][k]) * 1000 for k in ("old", "new"))
        ow, nw = (statistics.median(wall[fmt][k]) * 1000 for k in ("old", "new"))
        print(
            f"| {fmt} | {len(cosines[fmt])} | {oc:.1f} | {nc:.1f} | {oc / nc:.2f}x | {ow:.1f} | {nw:.1f} | "
            f"{min(cosines[fmt]):.5f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write the mixed-format folder")
    mk.add_argument("--out", type=Path, required=True)
    mk.add_argument("--n", type=int, default=130)
    mk.add_argument("--sources", type=Path, help="a folder with real photos (the wallpaper packages' files)")
    mk.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing files")
    dec = sub.add_parser("decode", help="time old and new preprocessing per format")
    dec.add_argument("--folder", type=Path, required=True)
    dec.add_argument("--size", type=int, default=224)
    dec.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.cmd == "make":
        print(make_folder(args.out, args.n, args.sources, workers=args.workers))
    else:
        decode_benchmark(args.folder, args.size, args.repeats)


if __name__ == "__main__":
    main()
