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


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """One short run through the CLI with most options on: accumulation, bf16 autocast, clipping, eval."""
    out = tmp_path_factory.mktemp("run")
    args = _args(shapes, out, "--epochs", "1", "--accum-freq", "2", "--batch-size", "4",
                 "--zeroshot-frequency", "1", "--zeroshot-data", str(shapes.zeroshot_dir),
                 "--val-data", str(shapes.val_csv), "--grad-clip-norm", "1.0", "--precision", "amp_bf16",
                 "--train-tokenizer", "600")  # fmt: skip
    assert cli_main(args) == 0
    return out


def test_outputs_eval_and_trained_tokenizer(trained):
    assert (trained / "curves.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "zeroshot_top1" in r]
    assert len(evals) == 1 and 0 <= evals[0]["zeroshot_top1"] <= 1 and "image_to_text_R@5" in evals[0]
    assert all(r["temperature"] <= 100.0 + 1e-4 for r in rows if "temperature" in r)
    assert rows[0]["step"] == 1 and max(r["step"] for r in rows) == 5  # 40 pairs / (2 x 4) per step

    from clipsearch.checkpoints import load_bundle

    bundle = load_bundle(str(trained / "model"))
    vocab = bundle.tokenizer.vocab_size
    assert vocab <= 600 and bundle.model.token_embedding.weight.shape[0] == vocab
    assert "circle" in bundle.tokenizer.decode(bundle.tokenizer.encode("a red circle")).lower()


def test_eval_command(trained, shapes, capsys):
    argv = ["eval", "--model", str(trained / "model"), "--zeroshot-data", str(shapes.zeroshot_dir),
            "--retrieval-data", str(shapes.val_csv), "--linear-probe-data", str(shapes.zeroshot_dir), "--json"]  # fmt: skip
    assert cli_main(argv) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["zeroshot_chance"] == pytest.approx(1 / 12) and m["zeroshot_n"] == 24
    assert 0 <= m["text_to_image_R@1"] <= m["text_to_image_R@5"] <= m["text_to_image_R@10"] <= 1
    assert 0 <= m["linear_probe_top1"] <= 1
    assert cli_main(["eval", "--model", str(trained / "model")]) == 2  # nothing to evaluate on


def test_synth_command(tmp_path):
    assert (
        cli_main(
            ["synth", str(tmp_path / "s"), "--n", "8", "--image-size", "24", "--zeroshot-per-class", "1"]
        )
        == 0
    )
    rows = (tmp_path / "s" / "train.csv").read_text().splitlines()
    assert rows[0] == "filepath,title" and len(rows) == 1 + 7
    from PIL import Image

    formats = {Image.open(tmp_path / "s" / r.split(",")[0]).format for r in rows[1:]}
    assert formats == {"PNG", "JPEG"}
    assert len([d for d in (tmp_path / "s" / "zeroshot").iterdir() if d.is_dir()]) == 12


def test_user_errors_are_one_line(shapes, tmp_path, capsys):
    assert cli_main(_args(shapes, tmp_path / "x", "--precision", "amp")) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert cli_main(_args(shapes, tmp_path / "x", "--precision", "fp16")) == 1
    assert "use --precision amp_bf16" in capsys.readouterr().err
    assert cli_main(_args(shapes, tmp_path / "y", "--resume", "latest")) == 1
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert cli_main(_args(shapes, tmp_path / "z", "--batch-size", "100")) == 1
    assert "lower --batch-size" in capsys.readouterr().err


def _save(directory, step, value=1.0):
    w = {"w": torch.full((2,), value)}
    return checkpointing.save(directory, step, w, {"step": step}, keep=2)


def test_an_output_holding_another_run_is_refused_unless_resumed_or_overwritten(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(_args(shapes, out, "--epochs", "1")) == 0
    (out / "notes.txt").write_text("mine")
    before = (out / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()  # the first run's progress display
    assert cli_main(_args(shapes, out, "--epochs", "1", "--seed", "9")) == 1
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--overwrite" in err and "\n" not in err.strip()
    assert (out / "model" / "model.safetensors").read_bytes() == before  # untouched
    assert cli_main(_args(shapes, out, "--epochs", "1", "--seed", "9", "--overwrite")) == 0
    assert (out / "model" / "model.safetensors").read_bytes() != before
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only what a run writes


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (10, 11, 12):  # an earlier, longer run (keep=2: 10 goes when 12 is written)
        _save(d, step)
    stem = _save(d, 5)  # resumed from further back: step 5 is the current run's newest
    names = [s.name for s in checkpointing.list_checkpoints(d)]
    assert stem.name in names and names == ["step_00000005", "step_00000011", "step_00000012"]
    _save(d, 6)
    _save(d, 7)
    names = [s.name for s in checkpointing.list_checkpoints(d)]
    assert names[:2] == ["step_00000006", "step_00000007"]  # keep=2 among the current run's older ones


def test_resume_latest_skips_a_checkpoint_that_does_not_load(tmp_path, caplog):
    d = tmp_path / "checkpoints"
    _save(d, 1, 1.0)
    _save(d, 2, 2.0)
    (d / "step_00000002.safetensors").write_bytes(b"truncated")
    stem, weights, state, skipped = checkpointing.resume_from("latest", d)
    assert stem.name == "step_00000001" and state["step"] == 1 and torch.equal(weights["w"], torch.ones(2))
    assert [s.name for s in skipped] == ["step_00000002"]
    assert "skipping checkpoint step_00000002" in caplog.text
    (d / "step_00000001.state.pt").write_bytes(b"")
    with pytest.raises(checkpointing.CheckpointError, match="none of the 2 checkpoints"):
        checkpointing.resume_from("latest", d)


def test_checkpoint_files_are_fsynced(tmp_path, monkeypatch):
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    _save(tmp_path / "c", 3)
    assert len(synced) >= 2  # each file (and its folder) reaches the disk before the rename counts


def test_a_state_file_of_any_other_content_is_unreadable_not_a_crash(tmp_path):
    # Text such as /etc/passwd sends torch.load's legacy path into its unpickler (an IndexError).
    d = tmp_path / "checkpoints"
    _save(d, 1, 1.0)
    _save(d, 2, 2.0)
    (d / "step_00000002.state.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    stem, _, _, skipped = checkpointing.resume_from("latest", d)
    assert stem.name == "step_00000001" and [s.name for s in skipped] == ["step_00000002"]
    with pytest.raises(checkpointing.CheckpointError, match="cannot read checkpoint"):
        checkpointing.resume_from(str(d / "step_00000002.state.pt"), d)
    with pytest.raises(checkpointing.CheckpointError, match="is a folder"):
        checkpointing.resume_from(str(d), d)
