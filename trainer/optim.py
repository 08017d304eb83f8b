"""The optimiser and learning-rate schedule of the CLIP paper, as OpenCLIP's trainer sets them up."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)
FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")  # device types with torch's fused AdamW kernel


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for gains, biases, norms and the temperature: OpenCLIP's exclusion rule, exactly.

    Parameters with fewer than 2 dimensions (LayerNorm/BatchNorm gains, biases, the temperature) and
    any parameter whose name contains ``bn``, ``ln``, ``bias`` or ``logit_scale`` get no weight decay.
    """
    return param.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: the decayed weights and the excluded ones (trainable parameters only)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def make_optimizer(model: nn.Module, lr: float, wd: float, beta1: float, beta2: float, eps: float):
    """AdamW over :func:`param_groups`; the fused kernel where the parameters' device has one.

    Fused AdamW is the same update in one kernel; the per-tensor loop is slow for CLIP's 49k x width
    token embedding, which dominates the update of a small model (the model step against OpenCLIP's
    is in ``benchmarks/train_throughput.md``).
    """
    groups = param_groups(model, wd)
    params = [p for g in groups for p in g["params"]]
    # Decided here rather than on failure: torch checks the devices only at the first step.
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    log.info("AdamW: %s", "fused kernel" if fused else "per-tensor loop (a device without the fused kernel)")
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps, fused=fused or None)


def cosine_lr(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps, then cosine decay to 0 at ``total_steps``.

    Step ``s < warmup`` gets ``base_lr * (s + 1) / warmup``; afterwards
    ``0.5 * (1 + cos(pi * e / es)) * base_lr`` with ``e = s - warmup``, ``es = total_steps - warmup``.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, total_steps - warmup
    if es <= 0:
        return base_lr
    return 0.5 * (1 + math.cos(math.pi * min(e, es) / es)) * base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
