"""Model-only image throughput per inference backend, with fidelity (cosine to torch-fp32).

    python benchmarks/backends.py [--arch ViT-B-32-quickgelu] [--batch 32] [--runs 3] [--work DIR]

A ViT-B/32 with random weights (no downloads here) is saved once under ``--work`` as a clipsearch
model file; the exports and the ``auto`` verdict go to ``--work/home`` (``$CLIPSEARCH_HOME``). The
backends run round-robin, one batch each per round, so machine noise hits them alike; the table
gives the median images/s over the rounds and the worst image's cosine to fp32 on photo-like images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def random_model_dir(work: Path, arch: str = "ViT-B-32-quickgelu", seed: int = 0) -> Path:
    """A clipsearch model file with random weights for ``arch`` (made once, then reused)."""
    directory = work / f"model-{arch}-seed{seed}"
    if not (directory / "clipsearch_model.json").is_file():
        import torch

        from clipsearch.checkpoints import save_model
        from clipsearch.configs import get_config
        from clipsearch.model import build_model
        from clipsearch.tokenizer import Tokenizer
        from clipsearch.transform import PreprocessConfig

        torch.manual_seed(seed)
        cfg = get_config(arch)
        model = build_model(cfg)
        save_model(directory, model, PreprocessConfig(cfg["vision_cfg"]["image_size"]), Tokenizer())
    return directory


def set_home(work: Path) -> None:
    os.environ.setdefault("CLIPSEARCH_HOME", str(work / "home"))


def machine() -> str:
    """CPU model, cores and library versions, for the results file."""
    import platform

    import onnxruntime
    import torch

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {platform.python_implementation()} {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), onnxruntime "
        f"{onnxruntime.__version__}, load average {load:.1f} at start"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32-quickgelu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="rounds timed per backend (median reported)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backends", default="torch-fp32,torch-bf16,torch-int8,onnx-fp32,onnx-int8")
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    args = ap.parse_args(argv)
    set_home(args.work)

    import numpy as np
    import torch

    from clipsearch import backends
    from clipsearch.checkpoints import load_bundle

    bundle = load_bundle(random_model_dir(args.work, args.arch))
    batch = backends.calibration_batch(bundle, n=args.batch, seed=1)  # [B, 3, H, W]
    names = args.backends.split(",")
    encoders, build_s = {}, {}
    for name in names:
        start = time.perf_counter()
        encoders[name] = backends.make_image_encoder(bundle, name, threads=args.threads)
        build_s[name] = time.perf_counter() - start
    with torch.inference_mode():
        reference = bundle.model.encode_image(batch).numpy()
    fidelity = {
        n: float(backends.cosine_rows(e(batch), reference).min()) for n, e in encoders.items()
    }  # + warm-up
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.runs):
        for name, enc in encoders.items():
            start = time.perf_counter()
            enc(batch)
            times[name].append(time.perf_counter() - start)
    auto, _ = backends.choose_backend(bundle, threads=args.threads)

    print(f"# {args.arch}, random weights, batch {args.batch}, median of {args.runs} rounds")
    print(f"# {machine()}")
    print(
        f"| backend | images/s | vs torch-fp32 | worst cosine to fp32 | faithful (>= {backends.MIN_COSINE}) | first use s |"
    )
    print("|---|---:|---:|---:|:-:|---:|")
    base = args.batch / statistics.median(times["torch-fp32"]) if "torch-fp32" in times else None
    for name in names:
        ips = args.batch / statistics.median(times[name])
        rel = f"{ips / base:.2f}x" if base else "-"
        ok = "yes" if fidelity[name] >= backends.MIN_COSINE else "NO"
        print(f"| {name} | {ips:.1f} | {rel} | {fidelity[name]:.5f} | {ok} | {build_s[name]:.1f} |")
    print(f"\nauto picks: {auto} (bf16 hardware: {backends.cpu_has_fast_bf16()})")
    np.set_printoptions(precision=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
