"""``clipsearch-train demo``: the whole story on a CPU without internet, in a few minutes.

Generate the synthetic shapes set, train a small CLIP on it, save it as a clipsearch model, index the
held-out images into a photo library, run a text query and label them through the library API, and
report zero-shot accuracy against chance.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

DEMO_MODEL = "demo-vit"
BATCH_SIZE = 64
LR = 2e-3  # high for CLIP, right for a tiny model and a few hundred steps


def _seconds_per_step(batch_size: int, seed: int) -> float:
    """Time a few optimiser steps of the demo model on random data (the data loading cost is added)."""
    from clipsearch.configs import get_config
    from clipsearch.loss import ClipLoss
    from clipsearch.model import build_model

    cfg = get_config(DEMO_MODEL)
    torch.manual_seed(seed)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    images = torch.randn(batch_size, 3, size, size)
    texts = torch.randint(1, 1000, (batch_size, ctx))
    loss_fn = ClipLoss()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss = loss_fn(*model(images, texts))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return min(times[1:]) * 1.5  # decoding and augmenting the batch costs about half as much again


def run_demo(
    out,
    minutes: float = 3.0,
    n: int = 2000,
    seed: int = 0,
    reporter=None,
    echo=lambda s: None,
    epochs: int | None = None,
) -> dict:
    """Run the demo in ``out``; returns the zero-shot metrics plus the query's top hits and labels.

    ``epochs`` overrides the number of epochs that ``minutes`` would otherwise pick.
    """
    from clipsearch import indexer, search, zeroshot
    from clipsearch.checkpoints import load_bundle
    from clipsearch.encoders import ModelEncoder
    from clipsearch.store import Library
    from trainer import evaluate, train
    from trainer.synthetic import generate

    out = Path(out)
    echo(f"generating {n} captioned shape images in {out / 'data'}")
    data = generate(out / "data", n=n, seed=seed)
    n_train = sum(1 for _ in open(data.train_csv, encoding="utf-8")) - 1
    batch_size = min(BATCH_SIZE, n_train)
    steps_per_epoch = n_train // batch_size
    if epochs is None:
        per_step = _seconds_per_step(batch_size, seed)
        epochs = max(1, math.floor(minutes * 60 / (per_step * steps_per_epoch)))
    echo(f"training {DEMO_MODEL} for {epochs} epochs of {steps_per_epoch} steps (batch {batch_size})")
    argv = [
        "--train-data", str(data.train_csv), "--val-data", str(data.val_csv),
        "--zeroshot-data", str(data.zeroshot_dir), "--zeroshot-frequency", str(math.ceil(epochs / 4)),
        "--model", DEMO_MODEL, "--batch-size", str(batch_size), "--epochs", str(epochs),
        "--lr", str(LR), "--wd", "0.1", "--warmup", str(min(50, steps_per_epoch * epochs // 10)),
        "--seed", str(seed), "--output", str(out / "run"), "--device", "cpu",
    ]  # fmt: skip
    model_dir = train.run(train.build_parser().parse_args(argv), reporter)

    bundle = load_bundle(str(model_dir))
    zs = evaluate.read_class_folders(data.zeroshot_dir)
    metrics = evaluate.zeroshot(bundle.model, bundle.tokenizer, bundle.preprocess_cfg, zs)
    library = Library.open(out / "library.db", create=True)
    try:
        report = indexer.index_paths(library, bundle, [data.zeroshot_dir])
        echo(f"indexed {report.embedded} held-out images into {out / 'library.db'}")
        query = "a red circle"
        hits = search.search(library, ModelEncoder(bundle), search.Query.build(text=query), top=5)
        echo(f"query {query!r}: " + ", ".join(f"{h.path.parent.name}/{h.path.name}" for h in hits))
        labels = zeroshot.label_images(library, bundle, data.classnames, templates=zs.templates)
    finally:
        library.close()
    # The library's labels against the folder each image sits in (its true class).
    right = sum(r.label == r.path.parent.name.replace("_", " ") for r in labels)
    metrics.update(
        {
            "model_dir": str(model_dir),
            "query": query,
            "hits": [str(h.path) for h in hits],
            "hits_matching_query": sum(h.path.parent.name == "red_circle" for h in hits),
            "label_accuracy": right / max(1, len(labels)),
            "labelled": len(labels),
        }
    )
    return metrics
