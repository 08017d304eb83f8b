"""The CLIP training objective: symmetric cross-entropy over the N x N similarity matrix.

Radford et al. 2021, figure 3: for a batch of N (image, text) pairs, the N x N matrix of scaled cosine
similarities is read row-wise (each image picks its text among N) and column-wise (each text picks its
image); the loss is the mean of the two cross-entropies with the diagonal as the target.

Across several processes, every rank gathers the features of all ranks so that it sees the negatives of
the whole global batch. :class:`_GatherWithGrad` sends the gradient of the gathered tensor back to the
rank that produced each slice, so that after DDP averages the gradients over ranks they equal the
gradient of the single-process loss on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipLoss", "contrastive_loss", "gather_features"]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed gradient.

    Each rank's loss depends on every rank's features, so the gradient that reaches rank r's features is
    the sum over ranks of d(loss_k)/d(features_r): an all_reduce of the gathered gradient, then a slice.
    Written by hand (rather than torch.distributed.nn.all_gather) because it needs only all_gather and
    all_reduce, which every backend (gloo included) implements. Every rank must pass the same shape.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank = dist.get_rank()
        ctx.n = x.shape[0]
        return torch.cat(parts, dim=0)  # [world_size * n, D]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    gather_with_grad: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``[n, D]`` features of all ranks into ``[world_size * n, D]`` in rank order.

    With ``gather_with_grad`` the gradient flows back to every rank (exact global-batch gradient).
    Without it, other ranks' features are constants and only this rank's own slice carries gradient
    (OpenCLIP's cheaper default; its gradient is the global one divided by ``world_size`` after DDP).
    """
    if world_size == 1:
        return image_features, text_features
    if gather_with_grad:
        return _GatherWithGrad.apply(image_features), _GatherWithGrad.apply(text_features)
    gathered = []
    for local in (image_features, text_features):
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[rank] = local  # keep the graph for this rank's own slice
        gathered.append(torch.cat(parts, dim=0))
    return gathered[0], gathered[1]


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    row_offset: int = 0,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric cross-entropy; features are L2-normalised ``[n, D]``, ``logit_scale`` is exp(t).

    If ``all_*_features`` are given, ``image_features``/``text_features`` are this rank's rows
    (starting at ``row_offset`` of the global batch) scored against all columns: the "local loss",
    whose mean over ranks equals the global loss. Computed in float32 whatever the input dtype.
    """
    image_features = image_features.float()
    text_features = text_features.float()
    logit_scale = logit_scale.float()
    if all_image_features is None:
        logits_per_image = logit_scale * image_features @ text_features.T  # [N, N]
        logits_per_text = logits_per_image.T
    else:
        logits_per_image = logit_scale * image_features @ all_text_features.float().T  # [n, N]
        logits_per_text = logit_scale * text_features @ all_image_features.float().T  # [n, N]
    labels = torch.arange(image_features.shape[0], device=image_features.device) + row_offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class ClipLoss(nn.Module):
    """CLIP's loss, optionally over the global batch of several processes.

    ``local_loss=False``: every rank builds the whole ``[N, N]`` matrix of the global batch.
    ``local_loss=True``: every rank scores only its own ``n`` rows against the ``N`` columns
    (``n x N`` memory instead of ``N x N``); with ``gather_with_grad`` both give, after DDP's gradient
    averaging, the gradient of the single-process loss on the global batch.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """``image_features``, ``text_features``: normalised ``[n, D]`` of this rank; returns a scalar."""
        if self.world_size == 1:
            return contrastive_loss(image_features, text_features, logit_scale)
        all_image, all_text = gather_features(
            image_features,
            text_features,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
        )
        if self.local_loss:
            return contrastive_loss(
                image_features,
                text_features,
                logit_scale,
                row_offset=self.rank * image_features.shape[0],
                all_image_features=all_image,
                all_text_features=all_text,
            )
        return contrastive_loss(all_image, all_text, logit_scale)
