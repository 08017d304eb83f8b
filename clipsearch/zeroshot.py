"""Zero-shot classification: class names -> prompt ensembles -> a linear classifier over embeddings.

The classifier follows the CLIP paper (Radford et al. 2021, section 3.1.4): every class name is put
into each prompt template, the text embeddings are L2-normalised, averaged over the templates and
normalised again. Images are classified by the softmax of ``logit_scale * cosine similarity``.

``label_images`` is the job behind ``clipsearch label``: it classifies the embeddings already stored
in a library (no image is decoded again) and stores the result with ``Library.replace_labels``.

Multi-label rule (``multi_label=True``): each class is decided on its own, by a two-way softmax
between the class and a *background* prompt ensemble built the same way from the class name
``"something"``. ``p(c) = exp(s*cos_c) / (exp(s*cos_c) + exp(s*cos_bg))`` is the probability that
the image matches class ``c`` better than a generic photo does; a class is kept when ``p(c)`` is at
least the threshold (default 0.5, i.e. closer to the class than to the background). The decision
for one class does not depend on which other classes were asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipsearch.errors import ClipsearchError

if TYPE_CHECKING:
    from clipsearch.encoders import QueryEncoder

# The 80 prompts OpenAI used for ImageNet (the CLIP paper's prompt-engineering notebook).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The paper's 7-template subset, selected on ImageNet: 7 prompts per class instead of 80, nearly as good.
SHORT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

BACKGROUND_CLASS = "something"  # the generic class multi-label decisions are measured against
DEFAULT_LOGIT_SCALE = 100.0  # the temperature CLIP's zero-shot evaluation uses (1 / 0.01)


class LabelError(ClipsearchError):
    """Bad classes or templates given to zero-shot labelling."""


def check_templates(templates: Sequence[str] | None) -> list[str]:
    """Templates as a list (None: :data:`DEFAULT_TEMPLATES`); each must contain ``{}`` exactly once
    (where the class name goes)."""
    out = list(DEFAULT_TEMPLATES if templates is None else templates)
    if not out:
        raise LabelError("no prompt templates given")
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise LabelError(f"template {t!r} must contain {{}} exactly once, e.g. 'a photo of a {{}}.'")
    return out


def check_classes(classnames: Sequence[str]) -> list[str]:
    """Class names stripped, non-empty and unique, in the order given."""
    out = [str(c).strip() for c in classnames]
    out = [c for c in out if c]
    if not out:
        raise LabelError("no class names given: pass --classes a,b,c or --classes-file FILE")
    dupes = sorted({c for c in out if out.count(c) > 1})
    if dupes:
        raise LabelError(f"class names given twice: {', '.join(dupes)}")
    return out


def ensemble_classifier(
    encode_texts,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> np.ndarray:
    """The zero-shot weights ``float32 [D, C]`` from ``encode_texts(texts) -> normalised [n, D]``: per
    class, the normalised mean of the normalised embeddings of every template filled with the class
    name (the paper's ensembling). Any text encoder: the model in torch, or its torch-free export."""
    classnames = check_classes(classnames)
    templates = check_templates(templates)
    texts = [t.format(c) for c in classnames for t in templates]  # class-major: [C * T]
    feats = np.concatenate(
        [
            np.asarray(encode_texts(texts[start : start + batch_size]), np.float32)
            for start in range(0, len(texts), batch_size)
        ]
    )
    feats = feats.reshape(len(classnames), len(templates), -1)  # [C, T, D]
    mean = feats.mean(axis=1)  # [C, D]
    mean /= np.linalg.norm(mean, axis=-1, keepdims=True)
    return np.ascontiguousarray(mean.T)  # [D, C]


def build_classifier(
    model,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    device="cpu",
    batch_size: int = 256,
):
    """:func:`ensemble_classifier` of ``model``'s text tower in torch: ``Tensor [D, C]`` on ``device``."""
    import torch

    def encode(texts):
        with torch.no_grad():
            feats = model.encode_text(tokenizer(texts).to(device)).float()  # [b, D]
            return (feats / feats.norm(dim=-1, keepdim=True)).cpu().numpy()

    return torch.from_numpy(ensemble_classifier(encode, classnames, templates, batch_size)).to(device)


def classify(image_features, classifier, logit_scale: float = DEFAULT_LOGIT_SCALE):
    """Softmax class probabilities ``[N, C]`` of L2-normalised ``image_features [N, D]``.

    Accepts numpy arrays (computed in numpy) or tensors (returns the same kind as ``image_features``).
    """
    if isinstance(image_features, np.ndarray):
        x = image_features.astype(np.float32, copy=False)
        logits = logit_scale * (x @ np.asarray(classifier, np.float32))  # [N, C]
        logits -= logits.max(axis=-1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=-1, keepdims=True)
    import torch

    w = torch.as_tensor(np.asarray(classifier)) if isinstance(classifier, np.ndarray) else classifier
    logits = logit_scale * (image_features.float() @ w.float().to(image_features.device))  # [N, C]
    return logits.softmax(dim=-1)


def multi_label_probabilities(image_features, classifier, background, logit_scale=DEFAULT_LOGIT_SCALE):
    """Independent per-class probabilities ``[N, C]``: class vs the background ensemble (see the
    module docstring). ``background`` is a ``[D, 1]`` classifier built from ``BACKGROUND_CLASS``."""
    x = np.asarray(image_features, dtype=np.float64)
    cos = x @ np.asarray(classifier, dtype=np.float64)  # [N, C]
    cos_bg = x @ np.asarray(background, dtype=np.float64)  # [N, 1]
    return 1.0 / (1.0 + np.exp(-logit_scale * (cos - cos_bg)))  # two-way softmax == logistic


@dataclass
class ImageLabels:
    """The labels of one image, best first: ``labels[i] = (class, probability)``."""

    image_id: int
    path: Path
    labels: list[tuple[str, float]] = field(default_factory=list)

    @property
    def label(self) -> str | None:
        return self.labels[0][0] if self.labels else None

    @property
    def score(self) -> float | None:
        return self.labels[0][1] if self.labels else None


def label_images(
    library,
    encoder: QueryEncoder,
    classes: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    top_k: int = 1,
    threshold: float | None = None,
    multi_label: bool = False,
    under: Path | None = None,
    store: bool = True,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    filters=None,
) -> list[ImageLabels]:
    """Zero-shot label the library's images from their stored embeddings of ``encoder.model_id``.

    ``encoder``: the text side, a :class:`clipsearch.encoders.QueryEncoder` (the torch-free export or
    the model: :func:`clipsearch.encoders.for_texts` picks; a bundle in hand is
    ``ModelEncoder(bundle)``).
    Single-label: softmax over ``classes``, keep the ``top_k`` best (those at least ``threshold``).
    Multi-label: every class whose independent probability is at least ``threshold`` (default 0.5),
    best first, at most ``top_k`` when given. Images with no label left are returned with an empty
    list. With ``store``, the labels replace every stored label of this class set and model.
    ``under`` (a folder) and ``filters`` (a :class:`clipsearch.filters.PhotoFilter`) label only the
    photos they select.
    """
    classes = check_classes(classes)
    templates = check_templates(templates)
    if top_k is not None and top_k < 1:
        raise LabelError(f"top-k must be at least 1, got {top_k}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise LabelError(f"threshold is a probability between 0 and 1, got {threshold}")
    from clipsearch.search import check_model

    check_model(library, encoder)
    model_id = encoder.model_id
    allowed = filters.allowed_ids(library) if filters is not None else None
    if allowed is None:
        ids, paths, vectors = library.embeddings(model_id, under=under)
    else:
        ids, paths, vectors = library.embeddings(model_id, under=under, ids=sorted(allowed))
    classifier = ensemble_classifier(encoder.texts, classes, templates)  # [D, C]
    results: list[ImageLabels] = []
    if len(ids) == 0:
        probs = np.zeros((0, len(classes)))
    elif multi_label:
        bg = ensemble_classifier(encoder.texts, [BACKGROUND_CLASS], templates)  # [D, 1]
        probs = multi_label_probabilities(vectors, classifier, bg, logit_scale)
    else:
        probs = classify(np.asarray(vectors, np.float32), classifier, logit_scale)
    cut = 0.5 if (multi_label and threshold is None) else threshold
    k = len(classes) if (multi_label and top_k is None) else min(top_k or 1, len(classes))
    for row, (image_id, path) in enumerate(zip(ids.tolist(), paths, strict=True)):
        order = np.argsort(-probs[row], kind="stable")
        kept = [(classes[c], float(probs[row, c])) for c in order]
        if cut is not None:
            kept = [(c, p) for c, p in kept if p >= cut]
        results.append(ImageLabels(int(image_id), path, kept[:k]))
    if store:
        rows = [
            (r.image_id, label, score, rank)
            for r in results
            for rank, (label, score) in enumerate(r.labels, start=1)
        ]
        library.replace_labels(model_id, classes, rows)
    return results
