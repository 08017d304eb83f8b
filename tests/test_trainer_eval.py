"""Evaluation maths: recall@k by hand, the linear probe on data with a known answer, plots, folders."""

import json

import pytest
import torch

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
    r = recall_at_k(sims, "q", ks=(1, 2, 3))
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
    r = linear_probe(x, y, tx, ty, l2_grid=[1e-4, 1e-2, 1.0])
    assert r["linear_probe_top1"] == 1.0
    assert r["linear_probe_l2"] in (1e-4, 1e-2, 1.0)


def test_linear_probe_is_at_chance_on_random_labels():
    x, _ = _clusters(40, spread=1.0)
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (120,), generator=g)
    tx, _ = _clusters(40, spread=1.0, seed=2)
    ty = torch.randint(0, 3, (120,), generator=g)
    assert linear_probe(x, y, tx, ty)["linear_probe_top1"] < 0.5


def test_strong_l2_is_chosen_when_features_are_noise_and_weak_when_not():
    x, y = _clusters(30, spread=0.1)
    r = linear_probe(x, y, x, y, l2_grid=[1e-6, 1e3])
    assert r["linear_probe_l2"] == 1e-6  # with L2 = 1000 the weights collapse and accuracy drops


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
