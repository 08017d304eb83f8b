"""Weight-decay groups and the learning-rate schedule, against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from trainer.optim import cosine_lr, make_optimizer, no_weight_decay, param_groups


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(4)
        self.attn_proj = nn.Linear(4, 4)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 3, bias=False)
        self.token_embedding = nn.Embedding(10, 4)
        self.positional_embedding = nn.Parameter(torch.zeros(7, 4))
        self.class_embedding = nn.Parameter(torch.zeros(4))
        self.text_projection = nn.Parameter(torch.zeros(4, 4))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_weight_decay_groups_follow_open_clip():
    model = Block()
    groups = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = sorted(names[id(p)] for p in groups[0]["params"])
    decay = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.2
    assert no_decay == sorted(
        [
            "ln_1.weight",
            "ln_1.bias",
            "attn_proj.bias",
            "bn1.weight",
            "bn1.bias",
            "class_embedding",
            "logit_scale",
        ]
    )
    # 2-D embeddings and projections are decayed, as in OpenCLIP; frozen parameters are left out.
    assert decay == sorted(
        [
            "attn_proj.weight",
            "conv1.weight",
            "token_embedding.weight",
            "positional_embedding",
            "text_projection",
        ]
    )


def test_name_rule_excludes_matrices_named_like_norms():
    assert no_weight_decay("visual.ln_post.weight", torch.zeros(4, 4))
    assert no_weight_decay("logit_scale", torch.zeros(1, 1))
    assert not no_weight_decay("visual.proj", torch.zeros(4, 4))


def test_optimizer_hyperparameters():
    opt = make_optimizer(Block(), lr=1e-3, wd=0.1, beta1=0.8, beta2=0.95, eps=1e-8)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-8
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 1e-3 * 1 / 10),  # warm-up is linear from lr/warmup
        (4, 1e-3 * 5 / 10),
        (9, 1e-3),
        (10, 1e-3),  # cosine starts at the peak
        (55, 1e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90))),  # half-way: lr / 2
        (100, 0.0),
    ],
)
def test_warmup_then_cosine(step, expected):
    assert cosine_lr(step, 1e-3, warmup=10, total_steps=100) == pytest.approx(expected, abs=1e-12)


def test_schedule_without_warmup_and_past_the_end():
    assert cosine_lr(0, 2.0, warmup=0, total_steps=4) == pytest.approx(2.0)
    assert cosine_lr(2, 2.0, warmup=0, total_steps=4) == pytest.approx(1.0)
    assert cosine_lr(9, 2.0, warmup=0, total_steps=4) == pytest.approx(0.0)
