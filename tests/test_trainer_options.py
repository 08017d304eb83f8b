"""The train command line: OpenCLIP's names accepted or refused with the equivalent; --recipe paper."""

import pytest

from trainer.options import (
    OPENCLIP_ALIASES,
    OPENCLIP_REFUSED,
    OptionError,
    apply_paper_recipe,
    build_parser,
    parse,
)

BASE = ["--train-data", "x.csv"]


def test_openclip_spellings_are_translated():
    a = parse([*BASE, "--logs", "L", "--name", "n", "--imagenet-val", "val/", "--delete-previous-checkpoint",
               "--gather-with-grad", "--lr-scheduler", "cosine", "--save-frequency", "2", "--lock-text",
               "--force-quick-gelu", "--precision", "amp_bf16"])  # fmt: skip
    assert a.output == "L/n" and a.zeroshot_data == "val/" and a.keep_checkpoints == 1
    assert a.gather_with_grad and a.local_loss  # the local loss is on by default where it is exact
    assert a.save_frequency == 2 and a.lock_text and a.force_quick_gelu
    assert not parse([*BASE, "--no-gather-with-grad"]).local_loss  # not exact without gathered gradients
    assert parse(BASE).output == "runs/clip"
    with pytest.raises(OptionError, match="not both"):
        parse([*BASE, "--output", "o", "--logs", "L"])


@pytest.mark.parametrize("flag", sorted(f for f in OPENCLIP_REFUSED if "=" not in f))
def test_openclip_flags_without_an_equivalent_are_refused_with_one(flag):
    with pytest.raises(OptionError, match="not supported; .+"):
        parse([*BASE, flag, "1"])


def test_refused_value_and_unknown_choice():
    with pytest.raises(OptionError, match="clipsearch-train synth"):
        parse([*BASE, "--dataset-type=synthetic"])
    with pytest.raises(OptionError, match="--lr-scheduler const: not supported; only --lr-scheduler cosine"):
        parse([*BASE, "--lr-scheduler", "const"])
    with pytest.raises(SystemExit):  # not an OpenCLIP value either: argparse's message
        parse([*BASE, "--lr-scheduler", "linear"])


def test_paper_recipe_per_architecture():
    vit = parse([*BASE, "--model", "ViT-B-32", "--recipe", "paper"])
    assert (vit.lr, vit.wd, vit.warmup, vit.epochs) == (5e-4, 0.2, 2000, 32)
    assert (vit.beta1, vit.beta2, vit.eps, vit.batch_size) == (0.9, 0.98, 1e-6, 32768)
    rn = parse([*BASE, "--model", "RN50", "--recipe", "paper", "--lr", "1e-4", "--accum-freq", "4"])
    assert (rn.beta2, rn.eps) == (0.999, 1e-8) and rn.lr == 1e-4  # a flag given explicitly wins
    assert rn.batch_size == 32768 // 4
    applied = apply_paper_recipe(parse([*BASE, "--model", "ViT-L-14"]), set(), world_size=64)
    assert applied["lr"] == 4e-4 and applied["batch_size"] == 512  # 64 ranks x 512 = 32,768
    with pytest.raises(OptionError, match="not tiny-vit"):
        parse([*BASE, "--recipe", "paper"])
    with pytest.raises(OptionError, match="divisible"):
        apply_paper_recipe(parse([*BASE, "--model", "RN50"]), set(), world_size=3)


def _openclip_parser(monkeypatch):
    """OpenCLIP's own argparse parser, as open_clip_train.params.parse_args builds it."""
    import argparse
    import os

    try:
        from open_clip_train import params
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("open_clip_train not importable (pip install '.[test]')")
    seen = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        return real(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    params.parse_args([])
    return seen["parser"]


# A valid value for the accepted OpenCLIP flags that take one ("1" for the others).
VALUES = {"--report-to": "tensorboard", "--lr-scheduler": "cosine", "--opt": "adamw", "--resume": "latest",
          "--csv-separator": ",", "--dataset-type": "csv", "--precision": "amp_bf16", "--logs": "L"}  # fmt: skip


def test_every_openclip_flag_is_accepted_or_refused_with_the_equivalent(monkeypatch):
    """Enumerates OpenCLIP's parser, so a flag it gains cannot go unnoticed here."""
    ours = {s for a in build_parser()._actions for s in a.option_strings}
    theirs = [a for a in _openclip_parser(monkeypatch)._actions if "--help" not in a.option_strings]
    assert len(theirs) > 80
    for action in theirs:
        flag = max(action.option_strings, key=len)
        takes_value = action.nargs != 0
        argv = [*BASE, flag, VALUES.get(flag, "1")] if takes_value else [*BASE, flag]
        if flag in OPENCLIP_REFUSED:
            assert flag not in ours, f"{flag} is both accepted and refused"
            with pytest.raises(OptionError, match=r"not supported; \S+"):
                parse(argv)
            continue
        assert flag in ours, f"OpenCLIP's {flag} is neither accepted nor refused with an equivalent"
        args = parse(argv)
        if not takes_value and flag not in OPENCLIP_ALIASES:
            assert getattr(args, action.dest) is True, flag  # the same destination, switched on
        for choice in action.choices or ():  # each of OpenCLIP's values: accepted, or refused by name
            try:
                parse([*BASE, flag, choice])
            except OptionError as e:
                assert f"{flag}={choice}" in OPENCLIP_REFUSED, e


def test_every_openclip_flag_is_in_the_docs_table(monkeypatch):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    section = doc[doc.index("## For OpenCLIP users") :]
    for action in _openclip_parser(monkeypatch)._actions:
        flag = max(action.option_strings, key=len)
        if flag != "--help":
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", section), flag


def test_adam_defaults_follow_the_architecture_as_openclips():
    assert (parse(BASE).beta2, parse(BASE).eps) == (0.98, 1e-6)  # tiny-vit
    rn = parse([*BASE, "--model", "RN50"])
    assert (rn.beta2, rn.eps) == (0.999, 1e-8)
    assert parse([*BASE, "--model", "RN50", "--beta2", "0.95"]).beta2 == 0.95
    assert parse([*BASE, "--model", "no-such-model"]).beta2 == 0.98  # refused later, where it is built


def test_report_to_anything_but_tensorboard_is_refused():
    assert parse([*BASE, "--report-to", "tensorboard"]).report_to == "tensorboard"
    for value in ("wandb", "all", "tensorboard,wandb"):
        with pytest.raises(OptionError, match="use --report-to tensorboard"):
            parse([*BASE, "--report-to", value])
