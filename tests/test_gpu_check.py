"""benchmarks/gpu_check.py runs its CPU half end to end, so the GPU check cannot rot between GPU runs."""

import os
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
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    md = out.read_text()
    assert "5/5 stages passed" in md
    # One step against fp32: fp32 with accumulation + checkpointing, and bf16 autocast, within bounds.
    assert "| fp32 |" in md and "| amp_bf16 |" in md and "**no**" not in md
    for precision in ("fp32", "amp_bf16"):
        assert f"| {precision} | clipsearch-train |" in md
    if _openclip_trainer_importable():
        assert "| fp32 | open_clip_train |" in md and "| amp_bf16 | open_clip_train |" in md
    elif os.environ.get("CI"):
        pytest.fail(
            "open_clip_train (open-clip-torch with webdataset, pandas, fsspec) must be importable in CI"
        )
    assert "zeroshot_top1" in md and "text_to_image_R@1" in md
    assert "images/s" in md and "5 hits" in md
