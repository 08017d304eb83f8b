"""End-to-end indexing speed on large photo-like JPEGs: the fast pipeline vs a plain baseline, same run.

    python benchmarks/index_speed.py [--n 40] [--megapixels 12] [--runs 2] [--work DIR]

Photos: ``--n`` JPEGs of ``--megapixels`` (4:3), generated once under ``--work`` from smooth gradients,
soft shapes and sensor noise so they compress like camera photos (~3-5 MB each at 12 MP).

- **baseline** (what a plain script does): one process, PIL full decode, the model's eval transform,
  our ViT-B/32 in PyTorch fp32, batches of 32;
- **fast**: JPEG draft decoding (the decoder downscales by 2/4/8 while the shorter side stays >= the
  model's input size) in a thread pool that keeps decoding while the model runs, and the image encoder
  ``clipsearch.backends.make_image_encoder(bundle, "auto")`` (fastest backend measured faithful).

Both read the files from disk, embed and L2-normalise; images/s is end to end over all photos (median
of ``--runs``, alternating). Fidelity: cosine of draft-decode to full-decode embeddings (same fp32 model),
and of the fast pipeline's embeddings to the baseline's, worst photo. The model has random weights
(no downloads here); throughput is a trained model's, and the fidelity check is on the same weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import machine, random_model_dir, set_home  # noqa: E402  (the sibling benchmark)


def make_photos(directory: Path, n: int, megapixels: float, seed: int = 0) -> list[Path]:
    """``n`` photo-like JPEGs of about ``megapixels`` (made once, then reused)."""
    from PIL import Image

    from clipsearch.backends import synthetic_photo

    width = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    height = width * 3 // 4
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = directory / f"IMG_{i:04d}.jpg"
        out.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng(seed + i)
        # shapes at a quarter of the size (smooth anyway), then full-size grain so it compresses like a photo
        small = Image.fromarray(synthetic_photo(rng, width // 4, height // 4)).resize(
            (width, height), Image.BICUBIC
        )
        pixels = np.asarray(small, dtype=np.int16) + rng.integers(-5, 6, (height, width, 3), dtype=np.int16)
        tmp = path.with_suffix(".tmp")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=92)
        os.replace(tmp, path)
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def baseline(bundle, paths: list[Path], batch_size: int = 32) -> np.ndarray:
    """PIL full decode + eval transform + torch fp32, one batch at a time, one process."""
    import torch
    from PIL import Image

    preprocess = bundle.preprocess
    out = []
    for start in range(0, len(paths), batch_size):
        tensors = []
        for p in paths[start : start + batch_size]:
            with Image.open(p) as im:
                tensors.append(preprocess(im.convert("RGB")))
        with torch.inference_mode():
            out.append(bundle.model.encode_image(torch.stack(tensors)).numpy())  # [B, D]
    return _normalise(np.concatenate(out))


def fast(bundle, encoder, paths: list[Path], batch_size: int = 32, workers: int | None = None) -> np.ndarray:
    """Draft decode in a thread pool, kept ahead of the encoder by a bounded window."""
    from collections import deque

    import torch

    from clipsearch.imageio import open_image

    preprocess = bundle.preprocess
    size = bundle.preprocess_cfg.image_size

    def load(p):
        return preprocess(open_image(p, draft_size=size))

    workers = workers or os.cpu_count() or 1
    out, batch = [], []
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending = deque()
        todo = iter(paths)
        for p in todo:  # at most two batches decoded ahead: memory stays bounded on any collection
            pending.append(pool.submit(load, p))
            if len(pending) >= 2 * batch_size + workers:
                batch.append(pending.popleft().result())
                if len(batch) == batch_size:
                    out.append(encoder(torch.stack(batch)))
                    batch = []
        while pending:
            batch.append(pending.popleft().result())
            if len(batch) == batch_size:
                out.append(encoder(torch.stack(batch)))
                batch = []
        if batch:
            out.append(encoder(torch.stack(batch)))
    return _normalise(np.concatenate(out))


def decode_seconds(paths: list[Path], size: int) -> tuple[float, float]:
    """Seconds per photo, one thread: full decode vs draft decode (to RGB, no resize)."""
    from PIL import Image

    from clipsearch.imageio import open_image

    sample = paths[:8]
    start = time.perf_counter()
    for p in sample:
        with Image.open(p) as im:
            im.convert("RGB")
    full = (time.perf_counter() - start) / len(sample)
    start = time.perf_counter()
    for p in sample:
        open_image(p, draft_size=size)
    draft = (time.perf_counter() - start) / len(sample)
    return full, draft


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--megapixels", type=float, default=12.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    args = ap.parse_args(argv)
    set_home(args.work)

    import torch

    from clipsearch import backends
    from clipsearch.checkpoints import load_bundle
    from clipsearch.imageio import open_image

    paths = make_photos(args.work / f"photos-{args.megapixels:g}mp", args.n, args.megapixels)
    mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
    bundle = load_bundle(random_model_dir(args.work))
    encoder = backends.make_image_encoder(bundle, args.backend)
    size = bundle.preprocess_cfg.image_size

    # fidelity of draft decoding alone: same fp32 model, full vs draft pixels
    sample = paths[:8]
    with torch.inference_mode():
        full_px = torch.stack([bundle.preprocess(open_image(p)) for p in sample])
        draft_px = torch.stack([bundle.preprocess(open_image(p, draft_size=size)) for p in sample])
        draft_cos = backends.cosine_rows(
            bundle.model.encode_image(draft_px).numpy(), bundle.model.encode_image(full_px).numpy()
        )
    # model-free check too (random weights can be insensitive): the model's input pixels themselves
    pixel_cos = backends.cosine_rows(draft_px.flatten(1).numpy(), full_px.flatten(1).numpy())
    pixel_rms = float((draft_px - full_px).pow(2).mean().sqrt())  # in normalised units (std = 1)

    times = {"baseline": [], "fast": []}
    results = {}
    for _ in range(args.runs):
        for name in times:
            start = time.perf_counter()
            results[name] = baseline(bundle, paths) if name == "baseline" else fast(bundle, encoder, paths)
            times[name].append(time.perf_counter() - start)
    e2e_cos = backends.cosine_rows(results["fast"], results["baseline"])
    full_s, draft_s = decode_seconds(paths, size)

    ips = {k: len(paths) / statistics.median(v) for k, v in times.items()}
    print(
        f"# {len(paths)} JPEGs of {args.megapixels:g} MP ({mb:.1f} MB each), ViT-B/32, batch 32, median of {args.runs}"
    )
    print(f"# {machine()}")
    print("| pipeline | images/s | vs baseline | vs rclip (~10/s) |")
    print("|---|---:|---:|---:|")
    print(
        f"| baseline: PIL full decode + torch fp32, 1 process | {ips['baseline']:.2f} | 1.00x | {ips['baseline'] / 10:.2f}x |"
    )
    print(
        f"| fast: draft decode x {os.cpu_count()} threads + {encoder.name} | {ips['fast']:.2f} | "
        f"{ips['fast'] / ips['baseline']:.2f}x | {ips['fast'] / 10:.2f}x |"
    )
    print()
    print(
        f"decode, one thread: full {full_s * 1000:.0f} ms/photo, draft {draft_s * 1000:.0f} ms/photo ({full_s / draft_s:.1f}x)"
    )
    print(
        f"fidelity: draft vs full decode (fp32 model) worst cosine {draft_cos.min():.5f}, mean {draft_cos.mean():.5f}"
    )
    print(
        f"input pixels: draft vs full decode worst cosine {pixel_cos.min():.5f}, RMS difference "
        f"{pixel_rms:.4f} (normalised units; 1/255 of a channel is ~0.015)"
    )
    print(f"fidelity: fast pipeline vs baseline embeddings worst cosine {e2e_cos.min():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
