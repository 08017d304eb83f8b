"""OpenCLIP's model flags, trained for a few steps: --lock-text and --force-quick-gelu do what they say."""

import pytest
import torch
import torch.nn.functional as F

from clipsearch.checkpoints import load_bundle
from clipsearch.configs import get_config
from clipsearch.model import build_model
from trainer import checkpointing
from trainer import train as train_mod
from trainer.synthetic import generate

# OpenCLIP's text tower (open_clip.transformer.lock_text_tower freezes exactly these), named here
# independently of trainer.train.lock_text_tower.
TEXT_TOWER = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("shapes"), n=36, seed=4, image_size=32, zeroshot_per_class=2)


def _train(shapes, out, *extra):
    argv = ["--train-data", str(shapes.train_csv), "--model", "demo-vit", "--batch-size", "8",
            "--epochs", "1", "--max-steps", "3", "--lr", "1e-2", "--warmup", "1", "--seed", "5",
            "--output", str(out), "--zeroshot-frequency", "0", "--device", "cpu", *extra]  # fmt: skip
    assert train_mod.main(argv) == 0
    return load_bundle(str(out / "model")).model


def _initial_weights(seed=5):
    torch.manual_seed(seed)  # what the trainer does before building a fresh model
    return build_model(get_config("demo-vit")).state_dict()


def test_lock_text_keeps_the_text_tower_and_leaves_it_out_of_the_optimizer(shapes, tmp_path):
    trained = _train(shapes, tmp_path / "run", "--lock-text").state_dict()
    initial = _initial_weights()
    text = [k for k in initial if k.startswith(TEXT_TOWER)]
    rest = [k for k in initial if not k.startswith(TEXT_TOWER) and initial[k].is_floating_point()]
    assert text and rest
    for k in text:
        torch.testing.assert_close(trained[k], initial[k], rtol=0, atol=0, msg=k)
    changed = [k for k in rest if not torch.equal(trained[k], initial[k])]
    assert "logit_scale" in changed and any(k.startswith("visual.") for k in changed)
    # The optimiser holds exactly the parameters outside the text tower.
    stem = checkpointing.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    state = torch.load(stem.with_suffix(".state.pt"), weights_only=True)
    in_optimizer = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    model = build_model(get_config("demo-vit"))
    trainable = [n for n, _ in model.named_parameters() if not n.startswith(TEXT_TOWER)]
    assert in_optimizer == len(trainable) < len(list(model.parameters()))


def test_without_lock_text_the_text_tower_trains(shapes, tmp_path):
    """The check above can fail: a run without the flag moves the text tower."""
    trained = _train(shapes, tmp_path / "run").state_dict()
    initial = _initial_weights()
    assert not torch.equal(trained["text_projection"], initial["text_projection"])
    assert not torch.equal(trained["ln_final.weight"], initial["ln_final.weight"])


def test_force_quick_gelu_is_the_activation_of_the_trained_model(shapes, tmp_path):
    model = _train(shapes, tmp_path / "run", "--force-quick-gelu").eval()
    assert model.config.get("quick_gelu") is True  # recorded in the model folder's config
    plain = _train(shapes, tmp_path / "plain").eval()
    for m, quick in ((model, True), (plain, False)):
        for block in (m.transformer.resblocks[0], m.visual.transformer.resblocks[-1]):
            seen = {}
            hooks = [
                block.mlp.c_fc.register_forward_hook(
                    lambda _m, _i, out, seen=seen: seen.__setitem__("pre", out)
                ),
                block.mlp.c_proj.register_forward_hook(
                    lambda _m, inp, _o, seen=seen: seen.__setitem__("post", inp[0])
                ),
            ]
            with torch.no_grad():
                m.encode_text(torch.randint(1, 1000, (2, m.context_length)))
                m.encode_image(torch.randn(2, 3, 32, 32))
            for h in hooks:
                h.remove()
            h = seen["pre"]  # the MLP's hidden pre-activation, from the last forward through the block
            by_hand = h * torch.sigmoid(1.702 * h) if quick else 0.5 * h * (1 + torch.erf(h / 2**0.5))
            other = F.gelu(h) if quick else h * torch.sigmoid(1.702 * h)
            torch.testing.assert_close(seen["post"], by_hand, rtol=1e-5, atol=1e-6)
            assert (seen["post"] - other).abs().max() > 1e-4  # the two activations are told apart


def test_unlocked_groups_of_locked_towers_train_as_openclips(shapes, tmp_path):
    """--lock-text-unlocked-layers 2: the projection, the last block and ln_final train; the first block
    and the embeddings do not. --lock-image-unlocked-groups 1: only the image projection trains."""
    trained = _train(shapes, tmp_path / "run", "--lock-text", "--lock-text-unlocked-layers", "2",
                     "--lock-image", "--lock-image-unlocked-groups", "1").state_dict()  # fmt: skip
    initial = _initial_weights()
    last = (
        len([k for k in initial if k.startswith("transformer.resblocks.") and k.endswith(".ln_1.weight")]) - 1
    )

    def moved(prefix):
        keys = [k for k in initial if k.startswith(prefix)]
        assert keys, prefix
        return any(not torch.equal(trained[k], initial[k]) for k in keys)

    assert moved("text_projection") and moved("ln_final.") and moved(f"transformer.resblocks.{last}.")
    assert not moved("transformer.resblocks.0.") and not moved("token_embedding.")
    assert not moved("positional_embedding")
    assert moved("visual.proj") and not moved("visual.ln_post.") and not moved("visual.conv1.")


def test_val_frequency_and_zeroshot_frequency_are_separate(shapes, tmp_path):
    argv = ["--train-data", str(shapes.train_csv), "--val-data", str(shapes.val_csv), "--zeroshot-data",
            str(shapes.zeroshot_dir), "--model", "demo-vit", "--batch-size", "8", "--epochs", "2",
            "--val-frequency", "2", "--output", str(tmp_path / "run"), "--device", "cpu"]  # fmt: skip
    assert train_mod.main(argv) == 0
    import json

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "zeroshot_top1" in r or "val_loss" in r]
    assert [(r["epoch"], "zeroshot_top1" in r, "val_loss" in r) for r in evals] == [
        (1, True, False),
        (2, True, True),
    ]
