"""Evaluation as the CLIP paper does it: zero-shot classification, image<->text retrieval, linear probe.

- Zero-shot: class names become text classifiers through prompt templates (``clipsearch.zeroshot``);
  a folder-per-class set may carry a ``templates.txt`` (one template with ``{}`` per line) to use
  instead of the paper's ensemble.
- Retrieval: recall@1/5/10 both ways over held-out (image, caption) rows, where an image may have
  several captions (Flickr30k and COCO have five): image->text is a hit when any of the image's
  captions is in the top k; text->image ranks the distinct images, not the rows. Plus the CLIP loss
  over one caption per image.
- Linear probe: multinomial logistic regression on the frozen image features before the projection
  (the output of ``visual.ln_post`` where the tower has one), fitted with full-batch L-BFGS; its inverse
  regularisation C is searched over 1e-6..1e6 on a validation split and refined around the best (the
  paper's protocol, without sklearn), then refitted on all the training images. Few-shot probes use k
  images per class (k = 1, 2, 4, 8, 16).

No function here takes a device: each reads the model's (``trainer.placement.model_device``) and
puts its inputs there, so a model on a GPU is evaluated on that GPU.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipsearch.errors import ClipsearchError
from trainer.data import IMAGE_EXTS, DataError
from trainer.placement import model_device

log = logging.getLogger(__name__)


@dataclass
class LabelledImages:
    paths: list[Path]
    labels: list[int]
    classnames: list[str]
    templates: list[str] | None = None


def read_class_folders(root, classnames=None, templates=None) -> LabelledImages:
    """Images in ``root/<class>/``, with the class names and prompt templates to classify them by.

    Class names: from ``classnames`` (a mapping file, see :func:`read_classname_file`), else a
    ``classnames.txt``/``classnames.json`` in ``root``, else ImageNet's names when every folder is an
    ImageNet-1k synset ID (``n01440764`` -> ``tench``, from the file shipped in
    ``trainer/zeroshot_sets/``), else the folder name with ``_`` read as a space. Templates: the
    ``templates`` file, else a ``templates.txt`` in ``root`` (one template with ``{}`` per line), else
    None (the caller's default).
    """
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
    folders = [d.name for d in classes]
    names = class_names(folders, classnames or _beside(root, "classnames.txt", "classnames.json"))
    tfile = templates or _beside(root, "templates.txt")
    return LabelledImages(paths, labels, names, read_templates(tfile) if tfile else None)


def _beside(root: Path, *names: str) -> Path | None:
    return next((root / n for n in names if (root / n).is_file()), None)


SYNSET = re.compile(r"n\d{8}")
IMAGENET_CLASSNAMES = Path(__file__).parent / "zeroshot_sets" / "imagenet.tsv"


def read_templates(path) -> list[str]:
    """Prompt templates from a file: one per line, ``{}`` where the class name goes."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the templates ({e})") from e
    templates = [t.strip() for t in lines if "{}" in t]
    if not templates:
        raise DataError(f"{path}: no template with {{}} in it (one per line, e.g. 'a photo of a {{}}.')")
    return templates


def read_classname_file(path) -> dict[str, str] | list[str]:
    """A class-name mapping: folder name -> class name (a dict), or names in folder order (a list).

    Accepted: text lines ``FOLDER NAME`` (whitespace after the folder name; the name ends at the
    first comma, so ImageNet's ``LOC_synset_mapping.txt`` line ``n01440764 tench, Tinca tinca`` gives
    ``tench``); JSON ``{"FOLDER": "name"}``, Keras' ``{"0": ["n01440764", "tench"], ...}``, or a list
    of names in sorted folder order.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the class names ({e})") from e
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e})") from e
        if isinstance(data, list) and all(isinstance(n, str) for n in data):
            return data
        if isinstance(data, dict):
            if all(isinstance(v, str) for v in data.values()):
                return dict(data)
            if all(isinstance(v, list) and len(v) == 2 for v in data.values()):
                return {str(folder): str(name) for folder, name in data.values()}
        raise DataError(
            f'{path}: expected {{"folder": "name"}}, {{"0": ["folder", "name"]}} or ["name", ...]'
        )
    mapping = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(None, 1)
        if len(parts) < 2:
            raise DataError(f"{path}, line {n}: expected 'FOLDER NAME', got {line.strip()!r}")
        mapping[parts[0]] = parts[1].split(",")[0].strip()
    if not mapping:
        raise DataError(f"{path}: no 'FOLDER NAME' lines")
    return mapping


def class_names(folders: list[str], mapping_file=None) -> list[str]:
    """The class name of each folder (see :func:`read_class_folders` for the order of sources)."""
    if mapping_file is not None:
        mapping = read_classname_file(mapping_file)
        if isinstance(mapping, list):
            if len(mapping) != len(folders):
                raise DataError(f"{mapping_file}: {len(mapping)} names for {len(folders)} class folders")
            log.info("class names: %s (in folder order)", mapping_file)
            return list(mapping)
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise DataError(
                f"{mapping_file} has no name for {len(missing)} class folder(s), e.g. {missing[0]!r}"
            )
        log.info("class names: %s", mapping_file)
        return [mapping[f] for f in folders]
    if all(SYNSET.fullmatch(f) for f in folders):
        imagenet = read_classname_file(IMAGENET_CLASSNAMES)
        if all(f in imagenet for f in folders):
            log.info("class names: ImageNet's, for %d synset folders (%s)", len(folders), IMAGENET_CLASSNAMES)
            return [imagenet[f] for f in folders]
        log.warning(
            "class folders are WordNet IDs not all in ImageNet-1k: classifying by the IDs themselves; "
            "give a mapping file (--zeroshot-classnames) for real names"
        )
    return [f.replace("_", " ") for f in folders]


def read_class_csv(
    path, img_key: str = "filepath", label_key: str = "label", sep: str = ","
) -> LabelledImages:
    """Labelled images from a CSV (image path and class name columns; paths relative to the CSV)."""
    from trainer.data import read_csv

    pairs = read_csv(path, img_key, label_key, sep)
    names = sorted({c for _, c in pairs})
    if len(names) < 2:  # as for class folders: one class is always "right"
        raise DataError(f"{path}: need at least 2 classes in column {label_key!r}, found {len(names)}")
    index = {c: i for i, c in enumerate(names)}
    return LabelledImages([p for p, _ in pairs], [index[c] for _, c in pairs], names)


def read_labelled(
    source, img_key="filepath", label_key="label", sep=",", classnames=None, templates=None
) -> LabelledImages:
    """A folder-per-class set (:func:`read_class_folders`) or a labelled CSV (:func:`read_class_csv`)."""
    p = Path(source)
    if p.is_dir():
        return read_class_folders(p, classnames, templates)
    data = read_class_csv(p, img_key, label_key, sep)
    if classnames:
        data.classnames = class_names(data.classnames, classnames)
    if templates:
        data.templates = read_templates(templates)
    return data


# ---------------------------------------------------------------------------------------------------
# Features


@torch.no_grad()
def image_features(model, preprocess_cfg, paths, batch_size=64, encode=None):
    """``(features [N, D] L2-normalised, kept indices, skipped Counter)`` with the eval transform.

    ``encode`` maps a batch on the model's device to features (default ``model.encode_image``, then
    L2-normalised); the result is on the CPU in fp32.
    """
    from clipsearch.imageio import open_image
    from clipsearch.transform import image_transform

    transform = image_transform(preprocess_cfg, train=False)
    device = model_device(model)
    if encode is None:

        def encode(x):
            return F.normalize(model.encode_image(x).float(), dim=-1)

    feats, kept, skipped = [], [], Counter()
    chunk, chunk_idx = [], []

    def flush():
        if chunk:
            x = torch.stack(chunk).to(device)  # [b, 3, H, W]
            feats.append(encode(x).float().cpu())
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
def text_features(model, tokenizer, texts, batch_size=256) -> torch.Tensor:
    """``[N, D]`` L2-normalised text features (fp32, on the CPU)."""
    device = model_device(model)
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i : i + batch_size])).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------
# The three evaluations


def zeroshot(
    model, tokenizer, preprocess_cfg, data: LabelledImages, templates=None, *, encode_images=None
) -> dict:
    """Top-1/top-5 accuracy of the zero-shot classifier built from the class names; chance beside it.

    ``encode_images(model, preprocess_cfg, paths)``: :func:`image_features` by default (a caller
    scoring several sets of the same images passes one that remembers them).
    """
    from clipsearch.zeroshot import DEFAULT_TEMPLATES, build_classifier

    templates = templates or data.templates or DEFAULT_TEMPLATES
    model.eval()
    with torch.no_grad():
        classifier = build_classifier(
            model, tokenizer, data.classnames, templates, device=model_device(model)
        )
        classifier = classifier.float().cpu()  # [D, C]
    feats, kept, skipped = (encode_images or image_features)(model, preprocess_cfg, data.paths)
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


def recall_at_k(sims: torch.Tensor, truth: torch.Tensor, name: str, ks=(1, 5, 10)) -> dict:
    """Recall@k of queries (rows of ``sims [Q, C]``) whose relevant candidates are ``truth [Q, C]`` (bool).

    A query's rank is the number of irrelevant candidates scoring at least as high as its best relevant
    one (ties count against the query); it is a hit at k when that rank is below k.
    """
    best = sims.masked_fill(~truth, float("-inf")).max(1, keepdim=True).values  # [Q, 1]
    rank = ((sims >= best) & ~truth).sum(1)  # [Q]
    return {f"{name}_R@{k}": (rank < k).float().mean().item() for k in ks}


def group_captions(pairs) -> tuple[list, list[str], list[int]]:
    """``(images, captions, image_of_caption)`` from (image, caption) rows; an image keeps its first place."""
    index: dict = {}
    images, captions, owner = [], [], []
    for image, caption in pairs:
        if image not in index:
            index[image] = len(images)
            images.append(image)
        captions.append(caption)
        owner.append(index[image])
    return images, captions, owner


def retrieval(model, tokenizer, preprocess_cfg, pairs, *, encode_images=None) -> dict:
    """Recall@1/5/10 image->text and text->image over (image, caption) rows, and the CLIP loss.

    Rows sharing an image are that image's captions. A caption is relevant to every image that has the
    same text among its captions (identical texts have identical features: a caption shared by several
    images, or repeated, must not lose to its own copies). Images that cannot be read are dropped with
    their captions (counted in ``val_skipped``). ``encode_images``: as in :func:`zeroshot`.
    """
    from clipsearch.loss import contrastive_loss

    model.eval()
    images, captions, owner = group_captions(pairs)
    img, kept, skipped = (encode_images or image_features)(model, preprocess_cfg, images)  # [I, D]
    row_of = {image_index: row for row, image_index in enumerate(kept)}
    rows = [(row_of[o], c) for o, c in zip(owner, captions, strict=True) if o in row_of]
    txt = text_features(model, tokenizer, [c for _, c in rows])  # [T, D]
    text_owner = torch.tensor([r for r, _ in rows])  # [T]
    text_id = {c: k for k, c in enumerate(dict.fromkeys(c for _, c in rows))}
    ids = torch.tensor([text_id[c] for _, c in rows], dtype=torch.long)  # [T]
    has_text = torch.zeros(len(kept), len(text_id), dtype=torch.bool)
    has_text[text_owner, ids] = True
    truth = has_text[:, ids]  # [I, T]: the image has this caption's text
    sims = img @ txt.T  # [I, T]
    out = {
        **recall_at_k(sims, truth, "image_to_text"),
        **recall_at_k(sims.T, truth.T, "text_to_image"),
    }
    first = [text_owner.tolist().index(i) for i in range(len(kept))]  # each image's first caption
    scale = model.logit_scale.exp().float().cpu() if hasattr(model, "logit_scale") else torch.tensor(100.0)
    out["val_loss"] = contrastive_loss(img, txt[first], scale).item()
    out["val_n"] = len(kept)
    out["val_captions"] = len(rows)
    out["val_skipped"] = sum(skipped.values())
    return out


def _fit_logistic(x, y, n_classes, c, max_iter=1000):
    """Multinomial logistic regression as sklearn's ``LogisticRegression(C=c)``, full-batch L-BFGS.

    Minimises ``c * sum(cross-entropy) + |W|^2 / 2`` (the bias unpenalised), divided by ``c * n`` so the
    loss keeps a scale L-BFGS' tolerances suit. Returns ``(W [D, C], b [C])``.
    """
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")
    l2 = 1.0 / (2.0 * c * len(y))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(x, y, wb) -> float:
    w, b = wb
    return ((x @ w + b).argmax(1) == y).float().mean().item()


def search_c(fit_x, fit_y, val_x, val_y, n_classes, refine_steps=4) -> tuple[float, float]:
    """The paper's C search: a coarse sweep of 1e-6..1e6 (one point per decade), then a bisection in
    log space between the best C and its better neighbour. Returns ``(C, validation accuracy)``; ties go
    to the smaller C (the stronger regularisation)."""
    cache: dict[float, float] = {}

    def score(log_c: float) -> float:
        if log_c not in cache:
            cache[log_c] = _accuracy(val_x, val_y, _fit_logistic(fit_x, fit_y, n_classes, 10.0**log_c))
        return cache[log_c]

    grid = [float(e) for e in range(-6, 7)]
    best = max(grid, key=lambda e: (score(e), -e))
    step = 1.0
    for _ in range(refine_steps):  # halve the interval around the best each time
        step /= 2
        candidates = [e for e in (best - step, best + step) if -6 <= e <= 6]
        best = max([best, *candidates], key=lambda e: (score(e), -e))
    return 10.0**best, score(best)


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, int(n * fraction))
    return order[:k], order[k:]


def linear_probe(train_x, train_y, test_x, test_y, val_fraction=0.2, seed=0, shots=(1, 2, 4, 8, 16)) -> dict:
    """Accuracy on ``test`` of a logistic regression on frozen features, C searched on a validation split.

    As the paper: search C on a held-out part of the training set, then refit on all of it. Few-shot
    (``linear_probe_<k>shot``): k seeded training images per class, fitted with the C found above (too
    few images to search their own); a k is skipped when some class has fewer than k images.
    """
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    val, fit = _split(len(train_y), val_fraction, seed)
    c, val_acc = search_c(train_x[fit], train_y[fit], train_x[val], train_y[val], n_classes)
    out = {
        "linear_probe_top1": _accuracy(test_x, test_y, _fit_logistic(train_x, train_y, n_classes, c)),
        "linear_probe_C": c,
        "linear_probe_val_top1": val_acc,
    }
    g = torch.Generator().manual_seed(seed + 2)
    per_class = [torch.nonzero(train_y == k).flatten() for k in range(n_classes)]
    present = [idx for idx in per_class if len(idx)]
    for k in shots:
        if any(len(idx) < k for idx in present):
            continue
        pick = torch.cat([idx[torch.randperm(len(idx), generator=g)[:k]] for idx in present])
        wb = _fit_logistic(train_x[pick], train_y[pick], n_classes, c)
        out[f"linear_probe_{k}shot"] = _accuracy(test_x, test_y, wb)
    return out


@torch.no_grad()
def pre_projection_features(model, preprocess_cfg, paths):
    """Image features before the image tower's projection (the paper's linear-probe features).

    For a vision transformer, the output of ``visual.ln_post`` (the normalised class token); for a tower
    without one (the ResNets, whose attention pool ends in its own projection), the image embedding.
    """
    visual = getattr(model, "visual", None)
    ln_post = getattr(visual, "ln_post", None)
    if ln_post is None:
        log.info("linear probe: %s has no ln_post; probing the image embeddings", type(visual).__name__)
        return image_features(model, preprocess_cfg, paths, encode=model.encode_image)
    captured = []
    handle = ln_post.register_forward_hook(lambda _m, _i, out: captured.append(out))

    def encode(x):
        captured.clear()
        model.encode_image(x)
        return captured[-1]  # [b, width]

    try:
        return image_features(model, preprocess_cfg, paths, encode=encode)
    finally:
        handle.remove()


def linear_probe_images(
    model, preprocess_cfg, train: LabelledImages, test: LabelledImages | None = None, seed=0
) -> dict:
    """Linear probe on image sets; without ``test``, a seeded 30% of ``train`` is held out.

    The test set must have the training set's classes (its labels are numbered by its own classes).
    """
    if test is not None and test.classnames != train.classnames:
        raise DataError(
            f"linear probe: the test set has other classes than the training set ({len(test.classnames)} "
            f"vs {len(train.classnames)}); give both the same class folders"
        )
    x, kept, _ = pre_projection_features(model, preprocess_cfg, train.paths)
    y = torch.tensor([train.labels[i] for i in kept])
    if test is None:
        held, rest = _split(len(y), 0.3, seed + 1)
        tx, ty, x, y = x[held], y[held], x[rest], y[rest]
    else:
        tx, tkept, _ = pre_projection_features(model, preprocess_cfg, test.paths)
        ty = torch.tensor([test.labels[i] for i in tkept])
    if len(y) < 2 or len(y.unique()) < 2 or not len(ty):
        raise DataError(
            f"linear probe: {len(y)} readable training images of {len(y.unique())} classes and {len(ty)} "
            "test images; need 2 classes, 2 training images and a test image"
        )
    return linear_probe(x, y, tx, ty, seed=seed)


def during_training(
    model,
    tokenizer,
    preprocess_cfg,
    zeroshot_data,
    val_data,
    *,
    img_key="filepath",
    caption_key="title",
    separator=None,
    classnames=None,
    templates=None,
) -> dict:
    """The evaluations the trainer runs at epoch ends (whichever data were given)."""
    out = {}
    was_training = model.training
    data, pairs = read_eval_sets(
        zeroshot_data,
        val_data,
        img_key=img_key,
        caption_key=caption_key,
        separator=separator,
        classnames=classnames,
        templates=templates,
    )
    try:
        if data is not None:
            out.update(zeroshot(model, tokenizer, preprocess_cfg, data))
        if pairs is not None:
            out.update(retrieval(model, tokenizer, preprocess_cfg, pairs))
    finally:
        model.train(was_training)
    return out


def read_eval_sets(
    zeroshot_data,
    pairs_data,
    *,
    img_key="filepath",
    caption_key="title",
    separator=None,
    classnames=None,
    templates=None,
):
    """``(LabelledImages or None, [(image, caption)] or None)``: the listings only, no image decoded,
    so the trainer can check its evaluation data before the first epoch rather than after it."""
    from trainer.data import read_csv, read_jsonl

    data = read_labelled(zeroshot_data, classnames=classnames, templates=templates) if zeroshot_data else None
    pairs = None
    if pairs_data:
        if str(pairs_data).endswith((".jsonl", ".json")):
            pairs = read_jsonl(pairs_data, img_key, caption_key)
        else:
            pairs = read_csv(pairs_data, img_key, caption_key, separator)
        if not pairs:
            raise DataError(f"{pairs_data}: no (image, caption) rows")
    return data, pairs
