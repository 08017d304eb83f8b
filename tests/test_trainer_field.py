"""What a user meets at the train command line: awkward flags, files and interruptions give one line
on stderr and a non-zero exit (never a traceback), and lose nothing already written."""

import pytest

from trainer.cli import main as cli_main
from trainer.synthetic import generate


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("shapes"), n=24, seed=1, image_size=32, zeroshot_per_class=1)


def _args(shapes, out, *extra):
    return [
        "--train-data", str(shapes.train_csv), "--model", "demo-vit", "--batch-size", "4",
        "--epochs", "1", "--warmup", "1", "--output", str(out), "--zeroshot-frequency", "0",
        "--device", "cpu", *extra,
    ]  # fmt: skip


def _one_line_error(capsys) -> str:
    """The error line that ends stderr (after any progress display), without a traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1] if err else ""
    assert last.startswith("error: ") and "error: " not in err.removesuffix(last), err
    return last


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--lr", "-1"], "--lr must be at least 0"),
        (["--wd", "-0.1"], "--wd must be at least 0"),
        (["--beta2", "1.5"], "--beta2 must be in [0, 1)"),
        (["--log-every-n-steps", "0"], "--log-every-n-steps must be at least 1"),
        (["--save-frequency", "-1"], "--save-frequency must be at least 0"),
        (["--workers", "-1"], "--workers must be at least 0"),
        (["--keep-checkpoints", "-1"], "--keep-checkpoints must be at least 0"),
        (["--warmup", "-5"], "--warmup must be at least 0"),
        (["--max-steps", "0"], "--max-steps must be at least 1"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),  # else every step is skipped
        (["--accum-freq", "0"], "--accum-freq must be at least 1"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--train-num-samples", "-5"], "--train-num-samples must be at least 1"),  # trained nothing
        (["--lock-image", "--lock-image-unlocked-groups", "-1"], "--lock-image-unlocked-groups must be"),
        (["--grad-clip-norm", "-1"], "--grad-clip-norm must be above 0"),  # flipped every gradient
    ],
)
def test_out_of_range_flags_are_one_line_errors(shapes, tmp_path, capsys, flags, says):
    assert cli_main(_args(shapes, tmp_path / "run", *flags)) == 1
    assert says in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_save_frequency_0_saves_only_at_the_end(shapes, tmp_path):
    # OpenCLIP's meaning; it divided by zero at the end of the first epoch.
    assert cli_main(_args(shapes, tmp_path / "run", "--save-frequency", "0", "--epochs", "2")) == 0
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("*.state.pt")] == [
        "step_00000010.state.pt"
    ]


def test_skipped_samples_are_reported_and_a_run_that_reads_none_fails(shapes, tmp_path, capsys):
    folder = shapes.train_csv.parent
    rows = [f"{folder / r}" if i else r for i, r in enumerate(shapes.train_csv.read_text().splitlines())]
    some_bad = tmp_path / "some_bad.csv"
    some_bad.write_text("\n".join([*rows, *[f"gone{i}.png,a ghost" for i in range(8)]]) + "\n")
    assert cli_main(_args(shapes, tmp_path / "a", "--train-data", str(some_bad), "--batch-size", "28")) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "unreadable" in err  # counted in metrics.jsonl, and now said
    all_bad = tmp_path / "all_bad.csv"
    all_bad.write_text("filepath,title\n" + "".join(f"gone{i}.png,a ghost\n" for i in range(8)))
    assert cli_main(_args(shapes, tmp_path / "b", "--train-data", str(all_bad))) == 1
    assert "no sample of --train-data could be read" in _one_line_error(capsys)
    assert not (tmp_path / "b" / "model").exists()  # no untrained model passed off as trained


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_resume_from_a_checkpoint_that_does_not_fit_is_one_line(shapes, tmp_path, capsys, monkeypatch):
    import torch

    from trainer import checkpointing

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert cli_main(_args(shapes, out, "--save-every-n-steps", "2")) == 0
    stems = checkpointing.list_checkpoints(out / "checkpoints")
    assert len(stems) == 3
    capsys.readouterr()
    # A state file carrying a pickled callable: refused unexecuted with a clear line (torch's own
    # message advises weights_only=False), and `latest` falls back to the checkpoint before it.
    torch.save({"x": _Payload()}, stems[-1].with_suffix(".state.pt"))
    resume = ["--resume", str(stems[-1].with_suffix(".state.pt")), "--epochs", "2"]
    assert cli_main(_args(shapes, out, *resume)) == 1
    err = _one_line_error(capsys)
    assert "never unpickled" in err and "weights_only" not in err
    assert not (tmp_path / "PWNED").exists()
    assert cli_main(_args(shapes, out, "--resume", "latest", "--epochs", "2")) == 0
    assert f"skipped unreadable checkpoint {stems[-1].name}" in capsys.readouterr().err
    # Another --model than the checkpoint's, or a state file lacking what a resume needs.
    assert cli_main(_args(shapes, out, "--resume", "latest", "--epochs", "3", "--model", "tiny-vit")) == 1
    assert "does not fit this run" in _one_line_error(capsys)
    latest = checkpointing.list_checkpoints(out / "checkpoints")[-1]
    torch.save({"step": 3}, latest.with_suffix(".state.pt"))
    assert (
        cli_main(_args(shapes, out, "--resume", str(latest.with_suffix(".safetensors")), "--epochs", "3"))
        == 1
    )
    assert "does not fit this run" in _one_line_error(capsys)


def test_an_output_that_cannot_be_a_folder_is_one_line(shapes, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert cli_main(_args(shapes, tmp_path / "afile")) == 1
    assert "afile" in _one_line_error(capsys)
    assert cli_main(_args(shapes, tmp_path / "afile" / "run")) == 1
    assert "afile" in _one_line_error(capsys)
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_full_disk_keeps_the_checkpoints_written_before(shapes, tmp_path, capsys, monkeypatch):
    import errno

    import torch

    from trainer import checkpointing

    real_save, saves = torch.save, []

    def save(obj, f, *a, **k):  # the second checkpoint's state file meets a full disk
        saves.append(f)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert cli_main(_args(shapes, out, "--save-every-n-steps", "2")) == 1
    err = _one_line_error(capsys)
    assert (
        "No space left on device" in err and "step_00000004" in err and "the 1 written before are kept" in err
    )
    assert [s.name for s in checkpointing.list_checkpoints(out / "checkpoints")] == ["step_00000002"]
    assert not (out / "checkpoints" / "step_00000004.safetensors").exists()  # no half checkpoint left
    monkeypatch.setattr(torch, "save", real_save)
    assert cli_main(_args(shapes, out, "--resume", "latest")) == 0


def test_ctrl_c_says_where_to_resume_from(shapes, tmp_path, capsys, monkeypatch):
    from trainer import train as train_mod

    real, calls = train_mod.Stepper.loss_and_backward, []

    def interrupted(self, *a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(train_mod.Stepper, "loss_and_backward", interrupted)
    out = tmp_path / "run"
    assert cli_main(_args(shapes, out, "--save-every-n-steps", "2")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "interrupted" in err and "step_00000002" in err and "--resume latest" in err
    monkeypatch.setattr(train_mod.Stepper, "loss_and_backward", real)
    assert cli_main(_args(shapes, out, "--resume", "latest")) == 0


def test_wrong_evaluation_data_fails_before_training_not_after_an_epoch(shapes, tmp_path, capsys):
    one_class = tmp_path / "zs"
    (one_class / "red").mkdir(parents=True)
    (one_class / "red" / "a.png").write_bytes((shapes.train_csv.parent / "images" / "00000.png").read_bytes())
    out = tmp_path / "run"
    assert cli_main(_args(shapes, out, "--zeroshot-data", str(one_class), "--zeroshot-frequency", "1")) == 1
    assert "need at least 2 class folders" in _one_line_error(capsys)
    assert not (out / "checkpoints").exists()  # nothing trained for an epoch, then thrown away
    header_only = tmp_path / "val.csv"
    header_only.write_text("filepath,title\n")
    assert cli_main(_args(shapes, out, "--val-data", str(header_only))) == 1
    assert "no (image, caption) rows" in _one_line_error(capsys)
    assert not (out / "checkpoints").exists()
    assert cli_main(_args(shapes, out, "--model", "no-such-model")) == 1
    _one_line_error(capsys)
    assert not out.exists() or not any(out.iterdir())  # a failed start does not claim --output
    assert cli_main(_args(shapes, out, "--epochs", "1")) == 0
    args_json = (out / "args.json").read_text()
    assert cli_main(_args(shapes, out, "--overwrite", "--val-data", str(header_only))) == 1
    assert (out / "model").is_dir() and (out / "args.json").read_text() == args_json  # the run is kept
    assert cli_main(_args(shapes, out, "--resume", "latest", "--model", "tiny-vit")) == 1
    assert (out / "args.json").read_text() == args_json  # not the failed resume's flags


def test_a_device_that_is_not_there_is_one_line(shapes, tmp_path, capsys):
    from clipsearch.devices import DeviceError
    from trainer.placement import resolve_device

    for requested in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device(requested, cuda=False, mps=False)
    with pytest.raises(DeviceError, match="--device tpu: not a device torch knows"):
        resolve_device("tpu", cuda=True, mps=True)
    assert cli_main([*_args(shapes, tmp_path / "run"), "--device", "tpu"]) == 1
    assert "not a device torch knows" in _one_line_error(capsys)
    assert cli_main(["eval", "--model", "nowhere", "--zeroshot-data", ".", "--device", "tpu"]) == 1
    _one_line_error(capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["synth", "OUT", "--n", "1"],
        ["synth", "OUT", "--image-size", "0"],
        ["synth", "OUT", "--zeroshot-per-class", "-1"],
        ["demo", "--out", "OUT", "--n", "0"],
        ["demo", "--out", "OUT", "--epochs", "0"],
    ],
)
def test_synth_and_demo_refuse_sizes_they_cannot_make(tmp_path, capsys, argv):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert cli_main(argv) == 2  # a usage error, before anything is written
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Invalid value" in err
    assert not (tmp_path / "out").exists()


def test_linear_probe_on_too_few_images_or_other_test_classes_is_one_line(shapes, tmp_path, capsys):
    assert cli_main(_args(shapes, tmp_path / "run")) == 0
    model = str(tmp_path / "run" / "model")
    one = tmp_path / "one.csv"
    one.write_text(f"filepath,label\n{shapes.train_csv.parent / 'images' / '00000.png'},red\n")
    capsys.readouterr()
    assert cli_main(["eval", "--model", model, "--linear-probe-data", str(one), "--device", "cpu"]) == 1
    assert "need at least 2 classes" in _one_line_error(capsys)
    assert cli_main(["eval", "--model", model, "--zeroshot-data", str(one), "--device", "cpu"]) == 1
    assert "need at least 2 classes" in _one_line_error(capsys)  # not a zero-shot accuracy of 100%
    two = tmp_path / "two.csv"
    two.write_text(one.read_text() + f"{tmp_path / 'gone.png'},blue\n")
    assert cli_main(["eval", "--model", model, "--linear-probe-data", str(two), "--device", "cpu"]) == 1
    assert "linear probe" in _one_line_error(capsys)
    # Test folders with other classes than the training folders: their label numbers mean other
    # classes, so the accuracy would be silently wrong.
    zs = shapes.zeroshot_dir
    other = tmp_path / "other"
    for d in sorted(p for p in zs.iterdir() if p.is_dir())[1:]:
        (other / d.name).mkdir(parents=True)
        for f in d.iterdir():
            (other / d.name / f.name).write_bytes(f.read_bytes())
    argv = ["eval", "--model", model, "--linear-probe-data", str(zs), "--linear-probe-test", str(other)]
    assert cli_main([*argv, "--device", "cpu"]) == 1
    assert "other classes" in _one_line_error(capsys)


def test_a_metrics_line_cut_short_does_not_stop_a_resume(shapes, tmp_path):
    # A crash or a full disk while appending leaves half a line; resume and the plot read past it.
    import json

    out = tmp_path / "run"
    assert cli_main(_args(shapes, out, "--save-every-n-steps", "2", "--max-steps", "3")) == 0
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 4, "lo')
    assert cli_main(_args(shapes, out, "--resume", "latest")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_a_first_checkpoint_that_cannot_be_written_claims_no_earlier_ones(tmp_path):
    """The message said "the checkpoints written before are kept" also when there were none."""
    from trainer import checkpointing

    (tmp_path / "afile").write_text("mine")
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint was written before it"):
        checkpointing.save(tmp_path / "afile" / "checkpoints", 2, {}, {"step": 2}, keep=3)
