"""Every trainer path keeps its tensors on the model's device (checked with a second device on a CPU).

``tests/second_device.py`` gives a CPU machine a second device ("meta" tensors that hold real values and
refuse to mix with CPU tensors, as CUDA tensors do). Each path runs with the model there and must
give the same numbers as on the CPU: a forgotten ``.to(device)`` raises ``DeviceMismatch`` here as it
would raise on a GPU.
"""

import copy

import pytest
import torch
from second_device import DeviceMismatch, OnMeta, SecondDevice

from clipsearch.checkpoints import load_bundle
from trainer import evaluate, placement
from trainer import train as train_mod
from trainer.synthetic import generate


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("shapes"), n=40, seed=2, image_size=32, zeroshot_per_class=2)


@pytest.fixture(scope="module")
def bundle(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = ["--train-data", str(shapes.train_csv), "--model", "demo-vit", "--batch-size", "8",
            "--epochs", "1", "--output", str(out), "--zeroshot-frequency", "0", "--device", "cpu"]  # fmt: skip
    assert train_mod.main(argv) == 0
    return load_bundle(str(out / "model"))


def test_the_second_device_catches_a_forgotten_move():
    lin = torch.nn.Linear(3, 2)
    with SecondDevice():
        lin.to("meta")
        assert lin.weight.device.type == "meta" and isinstance(lin.weight, OnMeta)
        with pytest.raises(DeviceMismatch):
            lin(torch.ones(1, 3))
        y = lin(torch.ones(1, 3).to("meta"))  # moved: runs, with real values
        assert y.device.type == "meta" and y.sum().item() == pytest.approx(
            (lin.weight._cpu.sum(1) + lin.bias._cpu).sum().item()
        )


def _on_second_device(model):
    with SecondDevice():
        return copy.deepcopy(model).to("meta")


def test_zeroshot_on_the_models_device_equals_cpu(bundle, shapes):
    data = evaluate.read_class_folders(shapes.zeroshot_dir)
    cpu = evaluate.zeroshot(bundle.model, bundle.tokenizer, bundle.preprocess_cfg, data)
    with SecondDevice():
        moved = evaluate.zeroshot(
            _on_second_device(bundle.model), bundle.tokenizer, bundle.preprocess_cfg, data
        )
    assert moved == pytest.approx(cpu, abs=1e-6)


def test_retrieval_and_probe_features_on_the_models_device_equal_cpu(bundle, shapes):
    """(The probe's fit itself runs on CPU features, whatever the model's device.)"""
    from trainer.data import read_csv

    pairs = read_csv(shapes.val_csv)
    paths = evaluate.read_class_folders(shapes.zeroshot_dir).paths
    cpu = evaluate.retrieval(bundle.model, bundle.tokenizer, bundle.preprocess_cfg, pairs)
    cpu_feats = evaluate.pre_projection_features(bundle.model, bundle.preprocess_cfg, paths)[0]
    with SecondDevice():
        model = _on_second_device(bundle.model)
        moved = evaluate.retrieval(model, bundle.tokenizer, bundle.preprocess_cfg, pairs)
        feats = evaluate.pre_projection_features(model, bundle.preprocess_cfg, paths)[0]
    assert moved == pytest.approx(cpu, rel=1e-4, abs=1e-5)
    assert type(feats) is torch.Tensor and feats.device.type == "cpu"
    torch.testing.assert_close(feats, cpu_feats, rtol=1e-4, atol=1e-5)


def test_training_with_end_of_epoch_evaluation_runs_on_the_device(shapes, tmp_path):
    """The whole loop (accumulation, loss, optimiser, checkpoint, zero-shot and retrieval at the epoch
    end) with ``--device meta``; the weights equal a CPU run's."""
    common = ["--train-data", str(shapes.train_csv), "--val-data", str(shapes.val_csv),
              "--zeroshot-data", str(shapes.zeroshot_dir), "--model", "demo-vit", "--batch-size", "4",
              "--accum-freq", "2", "--epochs", "1", "--max-steps", "2", "--seed", "1"]  # fmt: skip
    assert train_mod.main([*common, "--output", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    with SecondDevice():
        assert train_mod.main([*common, "--output", str(tmp_path / "meta"), "--device", "meta"]) == 0
    a = load_bundle(str(tmp_path / "cpu" / "model")).model.state_dict()
    b = load_bundle(str(tmp_path / "meta" / "model")).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_epoch_end_evaluation_on_the_device(shapes, tmp_path):
    argv = ["--train-data", str(shapes.train_csv), "--val-data", str(shapes.val_csv),
            "--zeroshot-data", str(shapes.zeroshot_dir), "--model", "demo-vit", "--batch-size", "8",
            "--epochs", "1", "--output", str(tmp_path / "m"), "--device", "meta"]  # fmt: skip
    with SecondDevice():
        assert train_mod.main(argv) == 0
    rows = (tmp_path / "m" / "metrics.jsonl").read_text()
    assert "zeroshot_top1" in rows and "image_to_text_R@1" in rows


@pytest.mark.parametrize(
    ("requested", "cuda", "mps", "expected"),
    [
        (None, True, True, "cuda:3"),  # the local rank's GPU
        ("auto", False, True, "mps"),
        (None, False, False, "cpu"),
        ("cuda", True, False, "cuda:3"),
        ("cuda:1", True, False, "cuda:1"),
        ("cpu", True, True, "cpu"),
    ],
)
def test_device_choice(requested, cuda, mps, expected):
    assert str(placement.resolve_device(requested, 3, cuda=cuda, mps=mps)) == expected


def test_eval_command_defaults_to_the_best_device(monkeypatch, bundle, shapes, tmp_path, capsys):
    """``clipsearch-train eval`` without --device uses the GPU when there is one (here: the second device)."""
    from clipsearch.checkpoints import save_model
    from trainer.cli import main as cli_main

    save_model(tmp_path / "model", bundle.model, bundle.preprocess_cfg, bundle.tokenizer)
    monkeypatch.setattr(
        placement, "resolve_device", lambda requested=None, *a, **k: torch.device(requested or "meta")
    )
    seen = []
    real_zeroshot = evaluate.zeroshot

    def spy(model, *a, **k):
        seen.append(placement.model_device(model).type)
        return real_zeroshot(model, *a, **k)

    monkeypatch.setattr(evaluate, "zeroshot", spy)
    with SecondDevice():
        assert (
            cli_main(
                ["eval", "--model", str(tmp_path / "model"), "--zeroshot-data", str(shapes.zeroshot_dir)]
            )
            == 0
        )
    assert seen == ["meta"]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "pure_bf16", "pure_fp16"])
def test_16_bit_weights_are_refused_with_the_safe_choice(precision):
    with pytest.raises(placement.PrecisionError, match="amp_bf16"):
        placement.check_precision(precision, torch.device("cuda", 0))


def test_fp16_autocast_is_refused_off_cuda_and_scaled_on_it():
    with pytest.raises(placement.PrecisionError, match="CUDA"):
        placement.check_precision("amp", torch.device("cpu"))
    placement.check_precision("amp", torch.device("cuda", 0))
    assert placement.Placement(torch.device("cuda", 0), "amp").needs_loss_scaler
    assert not placement.Placement(torch.device("cuda", 0), "amp_bf16").needs_loss_scaler
