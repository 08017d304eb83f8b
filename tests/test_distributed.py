"""Two gloo processes give the loss and gradients of one process on the whole batch; so does --accum-freq.

The model is a toy two-tower module with the CLIP forward contract (normalised features and exp(t)),
so that the tests measure the loss gathering, DDP and the accumulation step of the trainer, quickly.
"""

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from clipsearch.loss import ClipLoss
from trainer.data import Batch
from trainer.distributed import DistEnv
from trainer.placement import Placement
from trainer.train import Stepper

N, WORLD = 8, 2  # global batch, processes


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.visual = nn.Linear(12, 6)
        self.text = nn.Embedding(30, 6)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images, texts):
        img = F.normalize(self.visual(images.flatten(1)), dim=-1)  # [B, 6]
        txt = F.normalize(self.text(texts).mean(1), dim=-1)  # [B, 6]
        return img, txt, self.logit_scale.exp()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, 2, 2, generator=g), torch.randint(0, 30, (N, 5), generator=g)


def _grads(model, batches, env, accum, local_loss=False):
    model_fwd = model
    if env.distributed:
        model_fwd = nn.parallel.DistributedDataParallel(model)
    loss_fn = ClipLoss(local_loss=local_loss, rank=env.rank, world_size=env.world_size)
    stepper = Stepper(model_fwd, loss_fn, Placement(env.device, "fp32"), accum)
    loss = stepper.loss_and_backward(batches, lambda t: t.backward())
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _split(images, texts, parts):
    n = images.shape[0] // parts
    return [Batch(images[i * n : (i + 1) * n], texts[i * n : (i + 1) * n]) for i in range(parts)]


def _worker(rank, port, accum, local_loss, results):
    import os

    from trainer.distributed import init_distributed, shutdown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    env = init_distributed("cpu")
    images, texts = _data()
    n = N // WORLD
    mine = _split(images[rank * n : (rank + 1) * n], texts[rank * n : (rank + 1) * n], accum)
    loss, grads = _grads(TwoTowers(), mine, env, accum, local_loss)
    results[rank] = (loss, grads)
    shutdown(env)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference():
    images, texts = _data()
    return _grads(TwoTowers(), _split(images, texts, 1), DistEnv(), 1)


@pytest.mark.parametrize("accum,local_loss", [(1, False), (2, False), (1, True)])
def test_two_processes_equal_one_process_on_the_global_batch(accum, local_loss):
    ref_loss, ref_grads = _reference()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), accum, local_loss, results), nprocs=WORLD, join=True)
        results = dict(results)
    for rank in range(WORLD):
        loss, grads = results[rank]
        if not local_loss:  # a local loss is this rank's rows only; their mean over ranks is the loss
            assert loss == pytest.approx(ref_loss, rel=1e-5)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")
    mean_loss = sum(results[r][0] for r in range(WORLD)) / WORLD
    assert mean_loss == pytest.approx(ref_loss, rel=1e-5)


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulation_gives_the_full_batch_gradient(accum):
    ref_loss, ref_grads = _reference()
    images, texts = _data()
    loss, grads = _grads(TwoTowers(), _split(images, texts, accum), DistEnv(), accum)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_naive_accumulation_would_differ():
    # Guard that the test above can fail: summing per-micro-batch losses is not the full-batch loss.
    images, texts = _data()
    ref_loss, _ = _reference()
    model = TwoTowers()
    parts = _split(images, texts, 2)
    naive = sum(ClipLoss()(*model(b.images, b.texts)).item() for b in parts) / 2
    assert abs(naive - ref_loss) > 1e-3
