"""Decode + CLIP preprocessing time for 12-megapixel photos: full decode vs JPEG draft decode.

    python benchmarks/decode.py                 # 3 JPEGs + a PNG + a WebP, 4000x3000, 5 runs each
    python benchmarks/decode.py --repeats 9 --size 336

Prints one row per file: median milliseconds to open + decode + transform to a [3, S, S] tensor,
with and without ``draft_size=S`` (JPEG only; other formats ignore it), and how far apart the two
tensors are (mean absolute difference in normalised units; one 8-bit level is about 0.015).
Results are recorded in benchmarks/decode.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipsearch.imageio import open_image
from clipsearch.transform import PreprocessConfig, image_transform


def photo_like(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth colour waves, sharp-edged blocks and sensor-like noise: JPEG sizes like a real photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    waves = (
        np.stack([np.sin(x / (150 + 40 * seed)), np.cos(y / 110.0), np.sin((x + y) / 90.0)], -1) * 90 + 127
    )
    blocks = ((x // 128 + y // 128) % 2)[..., None] * 60
    noise = rng.normal(0, 4, waves.shape).astype(np.float32)
    return np.clip(waves + blocks + noise, 0, 255).astype(np.uint8)


def make_files(directory: Path, w: int, h: int) -> list[Path]:
    files = []
    for i in range(3):
        p = directory / f"photo{i}.jpg"
        Image.fromarray(photo_like(w, h, i)).save(p, quality=90)
        files.append(p)
    arr = photo_like(w, h, 7)
    for fmt, ext, kwargs in (("PNG", ".png", {"compress_level": 6}), ("WEBP", ".webp", {"quality": 90})):
        p = directory / f"photo{ext}"
        Image.fromarray(arr).save(p, format=fmt, **kwargs)
        files.append(p)
    return files


def median_ms(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4000)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--size", type=int, default=224, help="the model's input side, pixels")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (the indexer decodes one image per worker)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    transform = image_transform(PreprocessConfig(args.size))
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp), args.width, args.height)
        print(
            f"{args.width}x{args.height} -> {args.size}x{args.size}, median of {args.repeats}, torch threads {args.threads}"
        )
        print(
            f"{'file':<12} {'MB':>6} {'full ms':>9} {'draft ms':>9} {'speed-up':>9} {'decoded at':>11} {'mean |diff|':>12}"
        )
        for p in files:
            full_ms, full = median_ms(lambda p=p: transform(open_image(p)), args.repeats)
            draft_ms, draft = median_ms(
                lambda p=p: transform(open_image(p, draft_size=args.size)), args.repeats
            )
            decoded = open_image(p, draft_size=args.size).size
            diff = (full - draft).abs().mean().item()
            mb = p.stat().st_size / 1e6
            print(
                f"{p.name:<12} {mb:>6.2f} {full_ms:>9.1f} {draft_ms:>9.1f} {full_ms / draft_ms:>8.1f}x "
                f"{decoded[0]:>5}x{decoded[1]:<5} {diff:>12.4f}"
            )


if __name__ == "__main__":
    main()
