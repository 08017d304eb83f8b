"""End-to-end indexing speed on large photo-like JPEGs: the real indexer vs a plain baseline, same run.

    python benchmarks/index_speed.py [--n 40] [--megapixels 12] [--runs 2] [--backend auto]
                                     [--also torch-fp32,onnx-int8] [--work DIR]

Photos: ``--n`` JPEGs of ``--megapixels`` (4:3), generated once under ``--work`` from smooth gradients,
soft shapes and sensor noise so they compress like camera photos (~2.3 MB each at 12 MP).

- **baseline** (what a plain script does): one process, PIL full decode, the model's eval transform,
  our ViT-B/32 in PyTorch fp32, batches of 32, L2-normalised;
- **indexer**: ``clipsearch.indexer.index_paths`` into a fresh temporary library, end to end: walk,
  read and hash every file, JPEG draft decoding in its thread pool ahead of the model, the ``--backend``
  image encoder (``auto``: fastest measured faithful), SQLite commits per batch, the FAISS index;
- ``--also NAME,...``: the indexer again with each backend forced, for the per-backend detail;
- ``--spin-ab``: the indexer again with ONNX Runtime's threads busy-waiting between operators (its
  default; the library turns it off for image batches), to show what that setting is worth.

They alternate, one run each per round, so load on the machine hits them alike; images/s is the
median round. The ``auto`` measurement (once per model and machine) is done before timing and
reported apart. Fidelity: each indexer run's stored embeddings against the baseline's, worst photo;
and draft vs full decode with the same fp32 model. The model has random weights (no downloads
here); throughput is a trained model's, and the fidelity check is on the same weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
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


def indexer(
    bundle, paths: list[Path], work: Path, backend: str, spin: bool = False
) -> tuple[np.ndarray, str]:
    """``index_paths`` into a fresh library: (embeddings in ``paths`` order, the backend it used)."""
    import contextlib
    import tempfile
    from unittest import mock

    from clipsearch import backends
    from clipsearch.indexer import index_paths
    from clipsearch.store import Library

    real_session = backends.ort_session
    spinning = mock.patch.object(
        backends, "ort_session", lambda path, threads=None, **kw: real_session(path, threads, spin=True)
    )
    with (
        spinning if spin else contextlib.nullcontext(),
        tempfile.TemporaryDirectory(dir=work, prefix="index-speed-") as tmp,
    ):
        with Library.open(Path(tmp) / "lib.db", create=True) as lib:
            report = index_paths(lib, bundle, paths, backend=backend)
            if report.embedded != len(paths):
                raise SystemExit(f"the indexer embedded {report.embedded} of {len(paths)}: {report.failed}")
            _, stored, vectors = lib.embeddings(bundle.model_id)
    row = {Path(p): i for i, p in enumerate(stored)}
    return vectors[[row[p] for p in paths]], report.backend


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
    ap.add_argument("--backend", default="auto", help="the indexer's backend (auto, or a name to force)")
    ap.add_argument("--also", default="", help="comma-separated backends: more indexer runs, each forced")
    ap.add_argument("--spin-ab", action="store_true", help="also the indexer with ONNX Runtime spinning")
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    args = ap.parse_args(argv)
    set_home(args.work)

    import torch

    from clipsearch import backends
    from clipsearch.checkpoints import load_bundle
    from clipsearch.imageio import open_image

    load_start = os.getloadavg()[0]
    paths = make_photos(args.work / f"photos-{args.megapixels:g}mp", args.n, args.megapixels)
    mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
    bundle = load_bundle(random_model_dir(args.work))
    size = bundle.preprocess_cfg.image_size
    start = time.perf_counter()
    measured = backends.needs_measuring(bundle)
    auto_name = backends.make_image_encoder(bundle, "auto").name  # the one-time measurement, untimed
    first_use = time.perf_counter() - start

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

    pipelines = {"baseline": None, f"indexer {args.backend}": args.backend}
    for name in filter(None, args.also.split(",")):
        pipelines[f"indexer {name}"] = name
    if args.spin_ab:
        pipelines[f"indexer {args.backend}, ORT spinning"] = args.backend
    times: dict[str, list[float]] = {k: [] for k in pipelines}
    results: dict[str, np.ndarray] = {}
    used: dict[str, str] = {}
    for _ in range(args.runs):
        for label, backend in pipelines.items():
            start = time.perf_counter()
            if backend is None:
                results[label] = baseline(bundle, paths)
            else:
                spin = label.endswith("ORT spinning")
                results[label], used[label] = indexer(bundle, paths, args.work, backend, spin)
            times[label].append(time.perf_counter() - start)
    full_s, draft_s = decode_seconds(paths, size)
    load_end = os.getloadavg()[0]

    ips = {k: len(paths) / statistics.median(v) for k, v in times.items()}
    print(
        f"# {len(paths)} JPEGs of {args.megapixels:g} MP ({mb:.1f} MB each), ViT-B/32, batch 32, "
        f"median of {args.runs}, alternating"
    )
    print(f"# {machine()}; load average {load_start:.1f} before, {load_end:.1f} after")
    print("| pipeline | backend | images/s | vs baseline | worst cosine to baseline |")
    print("|---|---|---:|---:|---:|")
    for label in pipelines:
        backend = "torch-fp32, full decode" if label == "baseline" else used[label]
        cos = backends.cosine_rows(results[label], results["baseline"]).min()
        print(f"| {label} | {backend} | {ips[label]:.2f} | {ips[label] / ips['baseline']:.2f}x | {cos:.5f} |")
    print()
    print(
        f"auto chose {auto_name}; "
        + (
            f"measuring took {first_use:.0f} s (once per model and machine, not timed above)"
            if measured
            else "from the cached verdict"
        )
    )
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
