"""The train command line: OpenCLIP's names accepted or refused with the equivalent; --recipe paper."""

import pytest

from trainer.options import OPENCLIP_REFUSED, OptionError, apply_paper_recipe, parse

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
    with pytest.raises(SystemExit):
        parse([*BASE, "--lr-scheduler", "const"])


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
