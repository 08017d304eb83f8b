"""The training loop end to end on tiny data: resume bit-for-bit, NaN steps, checkpoints, outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from clipsearch.loss import ClipLoss
from trainer import checkpointing
from trainer import train as train_mod
from trainer.cli import main as cli_main
from trainer.synthetic import generate


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("shapes"), n=44, seed=1, image_size=32, zeroshot_per_class=2)


def _args(shapes, out, *extra):
    return [
        "--train-data", str(shapes.train_csv), "--model", "demo-vit", "--batch-size", "8",
        "--epochs", "2", "--lr", "1e-3", "--warmup", "2", "--output", str(out), "--seed", "3",
        "--zeroshot-frequency", "0", "--device", "cpu", *extra,
    ]  # fmt: skip


def _weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(shapes, tmp_path):
    # 40 training pairs / 8 = 5 steps per epoch; stop at step 7 (inside epoch 2) and resume.
    assert train_mod.main(_args(shapes, tmp_path / "a")) == 0
    assert train_mod.main(_args(shapes, tmp_path / "b", "--max-steps", "7", "--save-every-n-steps", "3")) == 0
    stems = checkpointing.list_checkpoints(tmp_path / "b" / "checkpoints")
    assert [s.name for s in stems] == ["step_00000005", "step_00000006", "step_00000007"]
    state = torch.load(stems[-1].with_suffix(".state.pt"), weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)
    first = load_file(str(stems[0].with_suffix(".safetensors")))
    assert train_mod.main(_args(shapes, tmp_path / "b", "--resume", "latest")) == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ... and training did change the weights (the comparison is not between two untouched models).
    assert not torch.equal(first["text_projection"], a["text_projection"])
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # the resumed log continues without gaps or repeats


class _NaNOnCalls(ClipLoss):
    calls: set = set()
    n = 0

    def forward(self, *a):
        loss = super().forward(*a)
        type(self).n += 1
        return loss * float("nan") if type(self).n in self.calls else loss


def test_nan_steps_are_skipped_and_counted(shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "ClipLoss", _NaNOnCalls)
    _NaNOnCalls.calls, _NaNOnCalls.n = set(range(1, 100)), 0  # every step
    assert train_mod.main(_args(shapes, tmp_path / "all", "--epochs", "1")) == 0
    torch.manual_seed(3)
    from clipsearch.configs import get_config
    from clipsearch.model import build_model

    initial = build_model(get_config("demo-vit")).state_dict()
    final = _weights(tmp_path / "all")
    assert all(torch.equal(initial[k], final[k]) for k in final)  # no update was applied
    last = json.loads((tmp_path / "all" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["nan_steps_skipped"] == 5

    _NaNOnCalls.calls, _NaNOnCalls.n = {2}, 0  # only the second step
    assert train_mod.main(_args(shapes, tmp_path / "one", "--epochs", "1")) == 0
    last = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["nan_steps_skipped"] == 1
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "one").values())


def test_outputs_eval_and_accumulation_flags(shapes, tmp_path):
    out = tmp_path / "run"
    args = _args(shapes, out, "--epochs", "1", "--accum-freq", "2", "--batch-size", "4",
                 "--zeroshot-frequency", "1", "--zeroshot-data", str(shapes.zeroshot_dir),
                 "--val-data", str(shapes.val_csv), "--grad-clip-norm", "1.0", "--precision", "amp_bf16")  # fmt: skip
    assert cli_main(args) == 0
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "model" / "clipsearch_model.json").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "zeroshot_top1" in r]
    assert len(evals) == 1 and 0 <= evals[0]["zeroshot_top1"] <= 1 and "image_to_text_R@5" in evals[0]
    assert all(r["temperature"] <= 100.0 + 1e-4 for r in rows if "temperature" in r)


def test_user_errors_are_one_line(shapes, tmp_path, capsys):
    assert cli_main(_args(shapes, tmp_path / "x", "--precision", "fp16")) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert cli_main(_args(shapes, tmp_path / "y", "--resume", "latest")) == 1
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert cli_main(_args(shapes, tmp_path / "z", "--batch-size", "100")) == 1
    assert "lower --batch-size" in capsys.readouterr().err
