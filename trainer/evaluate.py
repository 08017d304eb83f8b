"""Evaluation as the CLIP paper does it: zero-shot classification, image<->text retrieval, linear probe.

- Zero-shot: class names become text classifiers through prompt templates (``clipsearch.zeroshot``);
  a folder-per-class set may carry a ``templates.txt`` (one template with ``{}`` per line) to use
  instead of the paper's ensemble.
- Retrieval: recall@1/5/10 both ways over held-out (image, caption) pairs, plus their CLIP loss.
- Linear probe: multinomial logistic regression on frozen, normalised image features, fitted with
  full-batch L-BFGS, its L2 strength chosen on a validation split (the paper's protocol, no sklearn).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipsearch.errors import ClipsearchError
from trainer.data import IMAGE_EXTS, DataError


@dataclass
class LabelledImages:
    paths: list[Path]
    labels: list[int]
    classnames: list[str]
    templates: list[str] | None = None


def read_class_folders(root) -> LabelledImages:
    """Images in ``root/<class>/``; the class name is the folder name with ``_`` read as a space."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of class folders")
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for i, d in enumerate(classes):
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() in IMAGE_EXTS:
                paths.append(p)
                labels.append(i)
    if len(classes) < 2 or not paths:
        raise DataError(f"{root}: need at least 2 class folders with images")
    templates = None
    tfile = root / "templates.txt"
    if tfile.is_file():
        templates = [t for t in tfile.read_text(encoding="utf-8").splitlines() if "{}" in t]
    return LabelledImages(paths, labels, [d.name.replace("_", " ") for d in classes], templates or None)


def read_class_csv(
    path, img_key: str = "filepath", label_key: str = "label", sep: str = ","
) -> LabelledImages:
    """Labelled images from a CSV (image path and class name columns; paths relative to the CSV)."""
    from trainer.data import read_csv

    pairs = read_csv(path, img_key, label_key, sep)
    names = sorted({c for _, c in pairs})
    index = {c: i for i, c in enumerate(names)}
    return LabelledImages([p for p, _ in pairs], [index[c] for _, c in pairs], names)


def read_labelled(source, img_key="filepath", label_key="label", sep=",") -> LabelledImages:
    p = Path(source)
    return read_class_folders(p) if p.is_dir() else read_class_csv(p, img_key, label_key, sep)


# ---------------------------------------------------------------------------------------------------
# Features


@torch.no_grad()
def image_features(model, preprocess_cfg, paths, device="cpu", batch_size=64):
    """``(features [N, D] L2-normalised, kept indices, skipped Counter)`` with the eval transform."""
    from clipsearch.imageio import open_image
    from clipsearch.transform import image_transform

    transform = image_transform(preprocess_cfg, train=False)
    feats, kept, skipped = [], [], Counter()
    chunk, chunk_idx = [], []

    def flush():
        if chunk:
            x = torch.stack(chunk).to(device)
            feats.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
            kept.extend(chunk_idx)
            chunk.clear()
            chunk_idx.clear()

    for i, p in enumerate(paths):
        try:
            chunk.append(transform(open_image(p)))
            chunk_idx.append(i)
        except (ClipsearchError, OSError, ValueError) as e:
            skipped[getattr(e, "reason", "unreadable")] += 1
        if len(chunk) == batch_size:
            flush()
    flush()
    if not feats:
        raise DataError("none of the evaluation images could be read")
    return torch.cat(feats), kept, skipped


@torch.no_grad()
def text_features(model, tokenizer, texts, device="cpu", batch_size=256) -> torch.Tensor:
    """``[N, D]`` L2-normalised text features."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i : i + batch_size])).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------
# The three evaluations


def zeroshot(model, tokenizer, preprocess_cfg, data: LabelledImages, device="cpu", templates=None) -> dict:
    """Top-1/top-5 accuracy of the zero-shot classifier built from the class names; chance beside it."""
    from clipsearch.zeroshot import DEFAULT_TEMPLATES, build_classifier

    templates = templates or data.templates or DEFAULT_TEMPLATES
    model.eval()
    with torch.no_grad():
        classifier = build_classifier(model, tokenizer, data.classnames, templates).float().cpu()  # [D, C]
    feats, kept, skipped = image_features(model, preprocess_cfg, data.paths, device)
    labels = torch.tensor([data.labels[i] for i in kept])
    logits = feats @ classifier  # [N, C]
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    return {
        "zeroshot_top1": (topk[:, 0] == labels).float().mean().item(),
        "zeroshot_top5": (topk == labels[:, None]).any(1).float().mean().item(),
        "zeroshot_chance": 1.0 / len(data.classnames),
        "zeroshot_n": len(kept),
        "zeroshot_skipped": sum(skipped.values()),
    }


def recall_at_k(sims: torch.Tensor, name: str, ks=(1, 5, 10)) -> dict:
    """Fraction of rows of ``sims [N, N]`` whose diagonal entry ranks within the top k of the row.

    Ties count against the query (a candidate scoring the same as the true one is ranked above it).
    """
    truth = sims.diagonal()[:, None]  # [N, 1]
    rank = (sims > truth).sum(1) + (sims == truth).sum(1) - 1  # candidates at least as good, minus itself
    return {f"{name}_R@{k}": (rank < k).float().mean().item() for k in ks}


def retrieval(model, tokenizer, preprocess_cfg, pairs, device="cpu") -> dict:
    """Recall@1/5/10 image->text and text->image over (image, caption) pairs, and their CLIP loss."""
    from clipsearch.loss import contrastive_loss

    model.eval()
    img, kept, _ = image_features(model, preprocess_cfg, [p for p, _ in pairs], device)
    txt = text_features(model, tokenizer, [pairs[i][1] for i in kept], device)
    sims = img @ txt.T  # [N, N]; pair i is the diagonal
    out = {**recall_at_k(sims, "image_to_text"), **recall_at_k(sims.T, "text_to_image")}
    scale = model.logit_scale.exp().float().cpu() if hasattr(model, "logit_scale") else torch.tensor(100.0)
    out["val_loss"] = contrastive_loss(img, txt, scale).item()
    out["val_n"] = len(kept)
    return out


def _fit_logistic(x, y, n_classes, l2, max_iter=200):
    """Multinomial logistic regression with an L2 penalty, full-batch L-BFGS; returns (W, b)."""
    torch.manual_seed(0)
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(train_x, train_y, test_x, test_y, l2_grid=None, val_fraction=0.25, seed=0) -> dict:
    """Accuracy on ``test`` of a logistic regression on frozen features, L2 picked on a validation split.

    As the paper: sweep the L2 strength on a held-out part of the training set, then refit on all of it.
    """
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    l2_grid = l2_grid if l2_grid is not None else [10.0**e for e in range(-6, 1)]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_y), generator=g)
    n_val = max(1, int(len(order) * val_fraction))
    val, fit = order[:n_val], order[n_val:]
    scores = []
    for l2 in l2_grid:
        w, b = _fit_logistic(train_x[fit], train_y[fit], n_classes, l2)
        scores.append(((train_x[val] @ w + b).argmax(1) == train_y[val]).float().mean().item())
    best = l2_grid[max(range(len(l2_grid)), key=lambda i: (scores[i], -i))]
    w, b = _fit_logistic(train_x, train_y, n_classes, best)
    acc = ((test_x @ w + b).argmax(1) == test_y).float().mean().item()
    return {"linear_probe_top1": acc, "linear_probe_l2": best, "linear_probe_val_top1": max(scores)}


def linear_probe_images(
    model, preprocess_cfg, train: LabelledImages, test: LabelledImages | None = None, device="cpu", seed=0
) -> dict:
    """Linear probe on image sets; without ``test``, a seeded 30% of ``train`` is held out."""
    x, kept, _ = image_features(model, preprocess_cfg, train.paths, device)
    y = torch.tensor([train.labels[i] for i in kept])
    if test is None:
        g = torch.Generator().manual_seed(seed + 1)
        order = torch.randperm(len(y), generator=g)
        n_test = max(1, int(math.ceil(len(y) * 0.3)))
        tx, ty, x, y = x[order[:n_test]], y[order[:n_test]], x[order[n_test:]], y[order[n_test:]]
    else:
        tx, tkept, _ = image_features(model, preprocess_cfg, test.paths, device)
        ty = torch.tensor([test.labels[i] for i in tkept])
    return linear_probe(x, y, tx, ty, seed=seed)


def during_training(
    model,
    tokenizer,
    preprocess_cfg,
    device,
    zeroshot_data,
    val_data,
    *,
    img_key="filepath",
    caption_key="title",
    separator=None,
) -> dict:
    """The evaluations the trainer runs at epoch ends (whichever data were given)."""
    out = {}
    was_training = model.training
    try:
        if zeroshot_data:
            out.update(zeroshot(model, tokenizer, preprocess_cfg, read_labelled(zeroshot_data), device))
        if val_data:
            from trainer.data import read_csv, read_jsonl

            reader = read_jsonl if str(val_data).endswith((".jsonl", ".json")) else read_csv
            if reader is read_csv:
                pairs = read_csv(val_data, img_key, caption_key, separator)
            else:
                pairs = reader(val_data, img_key, caption_key)
            out.update(retrieval(model, tokenizer, preprocess_cfg, pairs, device))
    finally:
        model.train(was_training)
    return out
