"""A PNG of the training curves (loss, temperature, evaluation metrics) from metrics.jsonl."""

from __future__ import annotations

import json
import logging
from pathlib import Path

EMPTY_EVAL_HINT = "no evaluation in this run:\npass --zeroshot-data DIR (folder per class)\nand/or --val-data FILE (held-out pairs)"
EVAL_KEYS = ("zeroshot_top1", "image_to_text_R@1", "text_to_image_R@1", "val_loss", "linear_probe_top1")

log = logging.getLogger(__name__)


def read_metrics(path) -> list[dict]:
    """The rows of metrics.jsonl; a line that is not a JSON object (cut short by a crash or a full disk
    while it was appended) is left out with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = "unreadable"
        if isinstance(row, dict):
            rows.append(row)
        elif row is not None:
            log.warning("%s:%d: not a JSON object, left out", path, n)
    return rows


def plot_metrics(metrics_path, png_path) -> Path | None:
    """Write the plot; returns its path, or None when there is nothing to plot yet."""
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k in r for k in EVAL_KEYS)]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], lw=1)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[1].plot(steps, [r["temperature"] for r in train], lw=1, label="exp(t)")
    axes[1].set(title="logit scale (1 / temperature)", xlabel="step")
    for key in EVAL_KEYS:
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            axes[2].plot(*zip(*pts, strict=True), marker="o", label=key)
    axes[2].set(title="evaluation", xlabel="step")
    if evals:
        axes[2].legend(fontsize=8)
    else:
        axes[2].text(
            0.5, 0.5, EMPTY_EVAL_HINT, ha="center", va="center", fontsize=9, transform=axes[2].transAxes
        )
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return png_path
