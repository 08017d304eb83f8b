"""benchmarks/gpu_check.py runs its CPU half end to end, so the GPU check cannot rot between GPU runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _openclip_trainer_importable() -> bool:
    done = subprocess.run([sys.executable, "-c", "import open_clip_train.main"], capture_output=True)
    return done.returncode == 0


def test_the_cpu_half_of_the_gpu_check(tmp_path):
    out = tmp_path / "cpu_check.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--out", str(out),
         "--work", str(tmp_path / "work")],
        capture_output=True, errors="replace", timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    md = out.read_text()
    assert "6/6 stages passed" in md
    # One step against fp32: fp32 with accumulation + checkpointing, and bf16 autocast, within bounds.
    assert "| fp32 |" in md and "| amp_bf16 |" in md and "**no**" not in md
    # Training: both trainers in bf16 autocast, each in its own process, every step logged.
    assert re.search(r"\| amp_bf16 \| clipsearch-train \| [\d.]+ \| \d+ MiB \| 4 \|", md), md
    if _openclip_trainer_importable():
        assert re.search(r"\| amp_bf16 \| open_clip_train \| [\d.]+ \| \d+ MiB \| 4 \|", md), md
    elif os.environ.get("CI"):
        pytest.fail(
            "open_clip_train (open-clip-torch with webdataset, pandas, fsspec) must be importable in CI"
        )
    assert "zeroshot_top1" in md and "text_to_image_R@1" in md
    assert "images/s" in md and "5 hits" in md
    # A user's index and searches: the first run, the settle it started, the later run, four searches,
    # and both libraries' vectors against the reference pipeline.
    # (the tiny model's verdict is whichever ONNX graph measured faster: int8 or fp32)
    assert "failed ['cut.jpg'], backend torch-int8" in md, md
    verdict = re.search(r"done; verdict: (onnx-\w+) \(verdict.json\) \|", md)
    assert verdict and f"failed ['cut.jpg'], backend {verdict.group(1)}," in md, md
    assert "first: caf\ufffd.jpg" in md, md
    assert md.count("over 11 of 11 photos") == 2, md


def test_the_fp16_step_with_its_loss_scaler_against_fp32(monkeypatch):
    """The GPU half's `amp` comparison (fp16 autocast, scaled then unscaled gradients), run on the CPU."""
    import importlib.util

    import torch

    from clipsearch.configs import get_config
    from clipsearch.model import build_model
    from trainer.data import Batch

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    torch.manual_seed(0)
    model = build_model(get_config("demo-vit")).train()
    batch = Batch(torch.randn(8, 3, 32, 32), torch.randint(1, 5000, (8, 16)), {})
    cpu = torch.device("cpu")
    ref_loss, ref = gpu_check.step_gradients(model, [batch], "fp32", cpu, 1, False)
    loss, grad = gpu_check.step_gradients(model, [batch], "amp", cpu, 2, True)
    b_loss, b_cos, b_rel = gpu_check.BOUNDS["amp"]
    assert abs(loss - ref_loss) / ref_loss <= b_loss
    assert torch.nn.functional.cosine_similarity(grad, ref, dim=0) >= b_cos
    assert (grad - ref).norm() / ref.norm() <= b_rel  # unscaled: 2**16 times too large otherwise
