"""Evaluation maths: recall@k by hand and against an independent reference with five captions per
image, the linear probe on data with a known answer, plots, folders."""

import json

import pytest
import torch

from trainer import evaluate
from trainer.data import DataError
from trainer.evaluate import linear_probe, read_class_folders, recall_at_k
from trainer.plots import plot_metrics


def test_recall_at_k_hand_computed():
    sims = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # query 0: its pair ranks 1st
            [0.8, 0.2, 0.5],  # query 1: 3rd
            [0.1, 0.7, 0.7],  # query 2: tied for 1st -> counted as 2nd
        ]
    )
    r = recall_at_k(sims, torch.eye(3, dtype=torch.bool), "q", ks=(1, 2, 3))
    assert r == {"q_R@1": pytest.approx(1 / 3), "q_R@2": pytest.approx(2 / 3), "q_R@3": pytest.approx(1.0)}


def _clusters(n_per_class, n_classes=3, dim=5, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:n_classes] * 3
    x = torch.cat(
        [centres[c] + spread * torch.randn(n_per_class, dim, generator=g) for c in range(n_classes)]
    )
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return x, y


def test_linear_probe_separates_clusters():
    x, y = _clusters(30)
    tx, ty = _clusters(10, seed=1)
    r = linear_probe(x, y, tx, ty)
    assert r["linear_probe_top1"] == 1.0
    assert 1e-6 <= r["linear_probe_C"] <= 1e6
    assert r["linear_probe_16shot"] == 1.0 and 0 <= r["linear_probe_1shot"] <= 1


def test_linear_probe_is_at_chance_on_random_labels():
    x, _ = _clusters(40, spread=1.0)
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (120,), generator=g)
    tx, _ = _clusters(40, spread=1.0, seed=2)
    ty = torch.randint(0, 3, (120,), generator=g)
    assert linear_probe(x, y, tx, ty)["linear_probe_top1"] < 0.5


def test_fit_minimises_sklearns_objective():
    """At the returned (W, b) the gradient of C * sum(cross-entropy) + |W|^2 / 2 vanishes."""
    x, y = _clusters(20, spread=1.5)
    for c in (1e-3, 1.0, 100.0):
        w, b = evaluate._fit_logistic(x, y, 3, c)
        w.requires_grad_(True)
        b.requires_grad_(True)
        objective = c * torch.nn.functional.cross_entropy(x @ w + b, y, reduction="sum") + (w * w).sum() / 2
        gw, gb = torch.autograd.grad(objective, (w, b))
        scale = max(1.0, c * len(y))
        assert gw.abs().max() / scale < 1e-4 and gb.abs().max() / scale < 1e-4, c


def test_c_search_refines_beyond_the_decades():
    x, y = _clusters(12, spread=1.2)
    val_x, val_y = _clusters(8, spread=1.2, seed=3)
    seen = []
    real = evaluate._fit_logistic

    def spy(*a, **k):
        seen.append(a[3])
        return real(*a, **k)

    evaluate._fit_logistic = spy
    try:
        c, acc = evaluate.search_c(x, y, val_x, val_y, 3)
    finally:
        evaluate._fit_logistic = real
    decades = {10.0**e for e in range(-6, 7)}
    assert decades <= set(seen)  # the whole coarse sweep, 1e-6..1e6
    assert any(min(abs(v - d) / d for d in decades) > 0.01 for v in seen)  # and points between decades
    assert 1e-6 <= c <= 1e6 and acc == pytest.approx(_val_acc(x, y, val_x, val_y, c))


def _val_acc(x, y, vx, vy, c):
    w, b = evaluate._fit_logistic(x, y, 3, c)
    return ((vx @ w + b).argmax(1) == vy).float().mean().item()


def _reference_recall(sims, owner, k):
    """Recall@k both ways by sorting, written apart from recall_at_k. ``sims [I, T]``; ``owner[t]`` is
    the image of caption t. Ties are broken against the query: relevant items sort after equal ones."""
    n_images, n_texts = sims.shape
    i2t_hits = 0
    for i in range(n_images):
        order = sorted(range(n_texts), key=lambda t: (-sims[i, t].item(), owner[t] == i))
        first = next(pos for pos, t in enumerate(order) if owner[t] == i)
        i2t_hits += first < k
    t2i_hits = 0
    for t in range(n_texts):
        order = sorted(range(n_images), key=lambda i: (-sims[i, t].item(), i == owner[t]))
        t2i_hits += order.index(owner[t]) < k
    return i2t_hits / n_images, t2i_hits / n_texts


def _stub_model(image_vecs: torch.Tensor, caption_vec: dict):
    """``(model class, tokenize)``: a "model" whose image features are ``image_vecs`` (an image's red
    channel, in steps of 20, is its index) and whose text features are ``caption_vec`` (a "token" is
    the caption's index in it)."""
    names = list(caption_vec)

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

        def encode_image(self, x):
            idx = (x[:, 0, 0, 0] * 0.26862954 + 0.48145466).mul(255).round().div(20).round().long()
            return image_vecs[idx]

        def encode_text(self, tokens):
            return torch.stack([caption_vec[names[t]] for t in tokens.tolist()])

    return Stub, lambda texts: torch.tensor([names.index(t) for t in texts])


def test_retrieval_with_five_captions_per_image_equals_a_reference(tmp_path):
    """Five captions per image as in Flickr30k/COCO, rows shuffled, with exact ties in the scores."""
    from PIL import Image

    n_images, per_image, dim = 12, 5, 4
    g = torch.Generator().manual_seed(0)
    image_vecs = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    rows, caption_vec = [], {}
    for i in range(n_images):
        path = tmp_path / f"{i:02d}.png"
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(path)
        for j in range(per_image):
            caption = f"img{i} cap{j}"
            noise = 0.0 if j == 4 else 0.9  # one caption per image is exactly the image's vector
            caption_vec[caption] = image_vecs[i] + noise * torch.randn(dim, generator=g)
            rows.append((path, caption))
    caption_vec["img3 cap1"] = image_vecs[5].clone()  # ties: equal to image 5's exact caption
    order = torch.randperm(len(rows), generator=g).tolist()
    rows = [rows[i] for i in order]

    from clipsearch.transform import PreprocessConfig

    pp = PreprocessConfig.from_dict({"image_size": 8})
    Stub, tokenize = _stub_model(image_vecs, caption_vec)
    out = evaluate.retrieval(Stub(), tokenize, pp, rows)
    asked = []  # a caller's image encoder (train_quality's encodes each file once) is the one used

    def remembered(model, cfg, paths):
        asked.append(list(paths))
        return evaluate.image_features(model, cfg, paths)

    assert evaluate.retrieval(Stub(), tokenize, pp, rows, encode_images=remembered) == out
    assert [sorted(a) for a in asked] == [sorted({p for p, _ in rows})]
    images = sorted({p for p, _ in rows}, key=lambda p: [p for p, _ in rows].index(p))
    sims = torch.nn.functional.normalize(torch.stack([image_vecs[int(p.stem)] for p in images]), dim=-1)
    texts = [c for _, c in rows]
    txt = torch.nn.functional.normalize(torch.stack([caption_vec[c] for c in texts]), dim=-1)
    owner = [images.index(p) for p, _ in rows]
    for k in (1, 5, 10):
        i2t, t2i = _reference_recall(sims @ txt.T, owner, k)
        assert out[f"image_to_text_R@{k}"] == pytest.approx(i2t), k
        assert out[f"text_to_image_R@{k}"] == pytest.approx(t2i), k
    assert out["val_n"] == n_images and out["val_captions"] == n_images * per_image
    assert out["image_to_text_R@1"] > out["text_to_image_R@1"]  # any of five vs one image each


def test_retrieval_counts_an_identical_caption_text_as_relevant(tmp_path):
    """Three images share the caption "a red circle": its copies have identical features, so a model
    that ranks that text first for each of them is right, not beaten by ties with its own copies."""
    from PIL import Image

    from clipsearch.transform import PreprocessConfig

    image_vecs = torch.eye(5)
    caption_vec = {"a red circle": image_vecs[:3].sum(0), "img3": image_vecs[3], "img4": image_vecs[4]}
    rows = []
    for i in range(5):
        path = tmp_path / f"{i:02d}.png"
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(path)
        rows.append((path, "a red circle" if i < 3 else f"img{i}"))
    Stub, tokenize = _stub_model(image_vecs, caption_vec)
    out = evaluate.retrieval(Stub(), tokenize, PreprocessConfig.from_dict({"image_size": 8}), rows)
    assert out["image_to_text_R@1"] == 1.0 and out["text_to_image_R@1"] == 1.0
    assert out["val_n"] == 5 and out["val_captions"] == 5


def test_class_folders(tmp_path):
    for name in ("red_circle", "blue_square"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_bytes(b"")
    (tmp_path / "templates.txt").write_text("a {}\nno placeholder\n")
    data = read_class_folders(tmp_path)
    assert data.classnames == ["blue square", "red circle"] and data.labels == [0, 1]
    assert data.templates == ["a {}"]
    with pytest.raises(DataError):
        read_class_folders(tmp_path / "red_circle")


def test_plot_written_from_metrics(tmp_path):
    rows = [{"step": i, "loss": 5 - i * 0.1, "temperature": 14 + i} for i in range(1, 6)]
    rows.append({"step": 5, "epoch": 1, "zeroshot_top1": 0.4})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_metrics(tmp_path / "m.jsonl", tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics(tmp_path / "none.jsonl", tmp_path / "d.png") is None


def test_plot_without_evaluation_says_which_flags_fill_it(tmp_path, monkeypatch):
    import matplotlib.axes

    texts = []
    real = matplotlib.axes.Axes.text
    monkeypatch.setattr(
        matplotlib.axes.Axes, "text", lambda self, *a, **k: texts.append(a[2]) or real(self, *a, **k)
    )
    rows = [{"step": i, "loss": 5 - i * 0.1, "temperature": 14} for i in range(1, 4)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_metrics(tmp_path / "m.jsonl", tmp_path / "c.png")
    assert any("--zeroshot-data" in t and "--val-data" in t for t in texts)
