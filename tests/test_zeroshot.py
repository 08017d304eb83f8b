"""Zero-shot classification: against a hand-written template loop, open_clip's builder, and
hand-computed probabilities; labelling a library from its stored embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from e2e_helpers import make_tiny_model

from clipsearch import zeroshot
from clipsearch.checkpoints import load_bundle
from clipsearch.encoders import ModelEncoder
from clipsearch.errors import LibraryError
from clipsearch.store import Library

open_clip = pytest.importorskip("open_clip")

CLASSES = ["dog", "cat on a sofa", "beach at sunset"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of the {}."]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(make_tiny_model(tmp_path_factory.mktemp("zs") / "tiny"))


def test_default_templates_are_the_papers():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    assert list(zeroshot.DEFAULT_TEMPLATES) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert list(zeroshot.SHORT_TEMPLATES) == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    assert len(set(zeroshot.DEFAULT_TEMPLATES)) == 80
    assert zeroshot.check_templates(None) == list(zeroshot.DEFAULT_TEMPLATES)  # None means the default


def test_build_classifier_equals_a_manual_template_loop(bundle):
    """Per class: encode each template with open_clip's tokenizer, normalise, average, normalise."""
    model = bundle.model
    expected = []
    with torch.no_grad():
        for c in CLASSES:
            feats = model.encode_text(open_clip.tokenize([t.format(c) for t in TEMPLATES]))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            mean = feats.mean(dim=0)
            expected.append(mean / mean.norm())
    expected = torch.stack(expected, dim=1)  # [D, C]
    got = zeroshot.build_classifier(model, bundle.tokenizer, CLASSES, TEMPLATES, batch_size=2)
    assert got.shape == (32, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=0), torch.ones(3))


def test_build_classifier_agrees_with_open_clip_on_identical_weights(tmp_path):
    """open_clip's own model + builder on the same random weights, loaded from a hub folder."""
    from safetensors.torch import save_file

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    }
    torch.manual_seed(3)
    ref = open_clip.model.CLIP(**cfg).eval()
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(dict(ref.state_dict()), str(hub / "open_clip_model.safetensors"))
    ours = load_bundle(hub)
    theirs = open_clip.build_zero_shot_classifier(
        ref, open_clip.tokenize, CLASSES, zeroshot.SHORT_TEMPLATES, num_classes_per_batch=2
    )
    got = zeroshot.build_classifier(ours.model, ours.tokenizer, CLASSES, zeroshot.SHORT_TEMPLATES)
    torch.testing.assert_close(got, theirs, atol=1e-5, rtol=0)


def test_classify_is_the_softmax_of_scaled_cosines():
    feats = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    classifier = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # [D, C]
    probs = zeroshot.classify(feats, classifier, logit_scale=10.0)
    # Row 0: cosines (1, 0) -> e^10 / (e^10 + 1); row 1: (0.6, 0.8) -> 1 / (1 + e^2)
    assert probs.shape == (2, 2)
    assert probs[0, 0] == pytest.approx(np.exp(10) / (np.exp(10) + 1), rel=1e-6)
    assert probs[1, 0] == pytest.approx(1 / (1 + np.exp(2)), rel=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    as_tensor = zeroshot.classify(torch.from_numpy(feats), torch.from_numpy(classifier), logit_scale=10.0)
    np.testing.assert_allclose(as_tensor.numpy(), probs, rtol=1e-6)


def test_multi_label_probability_is_class_versus_background():
    x = np.array([[1.0, 0.0, 0.0]])
    classifier = np.array([[0.9, 0.1], [0.1, 0.2], [0.0, 0.0]])  # cosines 0.9 and 0.1
    background = np.array([[0.5], [0.0], [0.0]])  # cosine 0.5
    p = zeroshot.multi_label_probabilities(x, classifier, background, logit_scale=10.0)
    assert p[0, 0] == pytest.approx(np.exp(9) / (np.exp(9) + np.exp(5)))
    assert p[0, 1] == pytest.approx(np.exp(1) / (np.exp(1) + np.exp(5)))
    # Each class is decided alone: dropping the other class does not change it.
    alone = zeroshot.multi_label_probabilities(x, classifier[:, :1], background, logit_scale=10.0)
    assert alone[0, 0] == pytest.approx(p[0, 0])


@pytest.mark.parametrize(
    "classes, templates, match",
    [
        ([], TEMPLATES, "no class names"),
        (["dog", " dog "], TEMPLATES, "given twice"),
        (["dog"], ["a photo"], "exactly once"),
        (["dog"], ["{} and {}"], "exactly once"),
        (["dog"], [], "no prompt templates"),
    ],
)
def test_bad_classes_and_templates(bundle, classes, templates, match):
    with pytest.raises(zeroshot.LabelError, match=match):
        zeroshot.build_classifier(bundle.model, bundle.tokenizer, classes, templates)


# --- label_images on a library -----------------------------------------------------------------


def _library_with(tmp_path, bundle, vectors: np.ndarray) -> Library:
    """A library whose images have exactly ``vectors`` as embeddings of ``bundle``'s model."""
    lib = Library.open(tmp_path / "lib.db", create=True)
    lib.register_model(bundle.model_id, "tiny", vectors.shape[1])
    with lib.transaction():
        for n, v in enumerate(vectors):
            image_id = lib.add_image(tmp_path / f"img{n}.jpg", size=1, mtime_ns=1, content_hash=f"h{n}")
            lib.put_embedding(image_id, bundle.model_id, v / np.linalg.norm(v))
    return lib


def test_label_images_uses_stored_embeddings_and_relabel_replaces(tmp_path, bundle):
    w = zeroshot.build_classifier(bundle.model, bundle.tokenizer, CLASSES, TEMPLATES).numpy()
    # Image n *is* class n's text direction: its top label must be class n.
    lib = _library_with(tmp_path, bundle, w.T.copy())
    results = zeroshot.label_images(lib, ModelEncoder(bundle), CLASSES, templates=TEMPLATES, top_k=2)
    assert [r.label for r in results] == CLASSES
    probs = zeroshot.classify(w.T.copy(), w, logit_scale=100.0)
    for n, r in enumerate(results):
        assert len(r.labels) == 2
        assert r.score == pytest.approx(float(probs[n].max()), rel=1e-5)
        assert r.path == tmp_path / f"img{n}.jpg"
    stored = lib.labels(bundle.model_id, CLASSES)
    assert len(stored) == 6 and {s.rank for s in stored} == {1, 2}

    # Same class set (any order): replaced, not added to. Another class set: kept apart.
    zeroshot.label_images(lib, ModelEncoder(bundle), list(reversed(CLASSES)), templates=TEMPLATES, top_k=1)
    assert len(lib.labels(bundle.model_id, CLASSES)) == 3
    zeroshot.label_images(lib, ModelEncoder(bundle), ["dog", "cat on a sofa"], templates=TEMPLATES)
    assert len(lib.labels(bundle.model_id, CLASSES)) == 3
    assert len(lib.labels(bundle.model_id)) == 6

    # A threshold keeps only labels at least that probable: here each image's own class alone.
    results = zeroshot.label_images(
        lib, ModelEncoder(bundle), CLASSES, templates=TEMPLATES, top_k=3, threshold=0.5
    )
    for n, r in enumerate(results):
        want = [CLASSES[c] for c in np.argsort(-probs[n]) if probs[n, c] >= 0.5]
        assert [lab for lab, _ in r.labels] == want == [CLASSES[n]]
    assert len(lib.labels(bundle.model_id, CLASSES)) == 3
    # store=False leaves the library alone.
    zeroshot.label_images(lib, ModelEncoder(bundle), ["dog"], templates=TEMPLATES, store=False)
    assert lib.labels(bundle.model_id, ["dog"]) == []
    lib.close()


def test_multi_label_keeps_every_class_that_beats_the_background(tmp_path, bundle):
    w = zeroshot.build_classifier(bundle.model, bundle.tokenizer, CLASSES, TEMPLATES).numpy()
    bg = zeroshot.build_classifier(bundle.model, bundle.tokenizer, ["something"], TEMPLATES).numpy()
    vectors = np.stack([w[:, 0] + w[:, 1], w[:, 2], bg[:, 0]])
    lib = _library_with(tmp_path, bundle, vectors)
    results = zeroshot.label_images(
        lib, ModelEncoder(bundle), CLASSES, templates=TEMPLATES, multi_label=True, top_k=None
    )
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos, cos_bg = unit @ w, unit @ bg  # [3, C], [3, 1]
    expected_p = 1 / (1 + np.exp(-100 * (cos - cos_bg)))
    for n, r in enumerate(results):
        expected = sorted(
            ((CLASSES[c], expected_p[n, c]) for c in range(3) if expected_p[n, c] >= 0.5), key=lambda t: -t[1]
        )
        assert [lab for lab, _ in r.labels] == [lab for lab, _ in expected]
        for (_, got), (_, want) in zip(r.labels, expected, strict=True):
            assert got == pytest.approx(want, rel=1e-4)
    assert results[2].labels == []  # a generic photo itself: no class beats the background
    assert results[1].label == CLASSES[2]
    lib.close()


def test_label_images_errors(tmp_path, bundle):
    lib = Library.open(tmp_path / "lib.db", create=True)
    with pytest.raises(
        LibraryError, match=r"no embeddings of model .* \(it has: none\): index with that model"
    ):
        zeroshot.label_images(lib, ModelEncoder(bundle), CLASSES, templates=TEMPLATES)
    with pytest.raises(zeroshot.LabelError, match="top-k"):
        zeroshot.label_images(lib, ModelEncoder(bundle), CLASSES, top_k=0)
    with pytest.raises(zeroshot.LabelError, match="between 0 and 1"):
        zeroshot.label_images(lib, ModelEncoder(bundle), CLASSES, threshold=1.5)
    lib.close()


def test_label_runs_its_prompts_through_the_numpy_tower_in_batches(tmp_path, bundle, monkeypatch):
    """2 classes x the 80 templates: a few runs of the tower, each layer one 2-D product over the
    run's tokens (a stacked [N, n, W] product costs what N queries do), the features those of one
    prompt at a time, the labels the torch model's, and a second run served from the text cache."""
    from clipsearch import fastquery
    from clipsearch.encoders import ExportedTextEncoder

    fastquery.ensure_text_encoder(bundle)
    classes, templates = ["dog", "cat on a sofa"], zeroshot.DEFAULT_TEMPLATES
    texts = [t.format(c) for c in classes for t in templates]
    w = zeroshot.build_classifier(bundle.model, bundle.tokenizer, classes, templates).numpy()  # [D, 2]
    lib = _library_with(tmp_path, bundle, np.concatenate([w.T, w.T[::-1] + 0.1 * w.T]))

    runs, products = [], []  # texts per run of the tower; activation shapes of products with a weight

    class Weight(np.ndarray):
        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            if ufunc is np.matmul:
                products.append(next(np.shape(i) for i in inputs if not isinstance(i, Weight)))
            return getattr(ufunc, method)(*(np.asarray(i) for i in inputs), **kwargs)

    tower_call = fastquery.NumpyTextTower.__call__

    def spied(tower, tokens):
        runs.append(len(tokens))
        tower.w = {name: np.asarray(a).view(Weight) for name, a in tower.w.items()}
        return tower_call(tower, tokens)

    monkeypatch.setattr(fastquery.NumpyTextTower, "__call__", spied)
    encoder = ExportedTextEncoder(bundle.model_id)
    fast = zeroshot.label_images(lib, encoder, classes, templates=templates, top_k=2)
    assert sum(runs) == len(texts) == 160
    assert len(runs) == -(-160 // fastquery.CHUNK) and max(runs) <= fastquery.CHUNK
    layers = encoder._held.tower.layers
    assert len(products) == len(runs) * (4 * layers + 1)
    assert all(len(shape) == 2 for shape in products), sorted(set(products))

    slow = zeroshot.label_images(lib, ModelEncoder(bundle), classes, templates=templates, top_k=2)
    assert [[lab for lab, _ in r.labels] for r in fast] == [[lab for lab, _ in r.labels] for r in slow]
    for f, s in zip(fast, slow, strict=True):
        np.testing.assert_allclose([p for _, p in f.labels], [p for _, p in s.labels], rtol=1e-4, atol=1e-5)

    batched = encoder._held(texts)  # [160, D], unnormalised
    one_by_one = np.concatenate([encoder._held([t]) for t in texts])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-4, atol=1e-5)
    cos = (batched * one_by_one).sum(1) / np.linalg.norm(batched, axis=1) / np.linalg.norm(one_by_one, axis=1)
    assert cos.min() >= 0.9999
    got = zeroshot.ensemble_classifier(encoder.texts, classes, templates)
    assert (got * w).sum(0).min() >= 0.9999  # both columns unit length: the cosine to torch's

    runs.clear()  # labelling again reads every prompt's features from the model's text cache
    again = zeroshot.label_images(lib, encoder, classes, templates=templates, top_k=2)
    assert runs == []
    assert [r.labels for r in again] == [r.labels for r in fast]
    lib.close()
