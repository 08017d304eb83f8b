"""Where every tensor of a training run lives, and in which dtype: decided here, once.

:func:`resolve_device` picks the device (``cuda:<local rank>``, ``mps`` or ``cpu``); :class:`Placement`
derives from it and ``--precision`` the weights' dtype, the inputs' dtype and the autocast context, and
moves the model and each batch. Evaluation never takes a device of its own: it reads the model's
(:func:`model_device`), so a model and the tensors fed to it cannot disagree.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from clipsearch.errors import ClipsearchError

log = logging.getLogger(__name__)

# OpenCLIP's --precision names; the pure 16-bit ones are refused (see check_precision).
PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")
AUTOCAST_DTYPE = {"amp": torch.float16, "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16}


class PrecisionError(ClipsearchError):
    """The requested --precision is unsafe or unavailable on the device (the message says what to use)."""


def resolve_device(requested: str | None = None, local_rank: int = 0, *, cuda=None, mps=None) -> torch.device:
    """The device a process trains or evaluates on.

    ``None`` or ``"auto"``: ``cuda:<local_rank>`` when CUDA is available, else ``mps``, else ``cpu``.
    ``"cuda"`` without an index gets the local rank's GPU (one process per GPU under torchrun). Anything
    else is taken as written. ``cuda`` / ``mps`` override the availability checks (for tests). CUDA or
    MPS asked for where it is absent, or a name torch does not know, raises ``DeviceError``.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if mps is None:
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if requested in (None, "auto"):
        kind = "cuda" if cuda else "mps" if mps else "cpu"
        log.info("device: %s (cuda available: %s, mps available: %s)", kind, cuda, mps)
    else:
        kind = requested
    from clipsearch.devices import DeviceError, pick_device

    if kind.partition(":")[0] in ("cuda", "mps"):
        pick_device(kind.partition(":")[0], cuda=cuda, mps=mps)  # not on this machine: says what to use
    try:
        device = torch.device(kind)
    except RuntimeError as e:
        raise DeviceError(f"--device {kind}: not a device torch knows; use cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse precisions that would train badly (or not at all) on ``device``, saying what to use."""
    if precision in ("bf16", "fp16", "pure_bf16", "pure_fp16"):
        raise PrecisionError(
            f"--precision {precision} keeps the weights in 16 bits with no fp32 master copy, so small "
            "updates round away; use --precision amp_bf16 (or amp on a CUDA GPU)"
        )
    if precision == "amp" and device.type not in ("cuda", "meta"):
        raise PrecisionError(
            f"--precision amp (fp16 autocast with loss scaling) needs a CUDA GPU, not {device.type}; "
            "use --precision amp_bf16 or fp32"
        )
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown --precision {precision!r}; use one of {', '.join(PRECISIONS[:3])}")


@dataclass(frozen=True)
class Placement:
    """The device and dtypes of one training process."""

    device: torch.device
    precision: str = "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPE.get(self.precision)

    @property
    def needs_loss_scaler(self) -> bool:
        """fp16 autocast underflows small gradients without one; bf16 has fp32's range and does not."""
        return self.autocast_dtype == torch.float16

    def autocast(self):
        """The context the forward pass and loss run in."""
        dtype = self.autocast_dtype
        if dtype is None or not torch.amp.is_autocast_available(self.device.type):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def put_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the (fp32) model's parameters and buffers to the device."""
        return model.to(self.device)

    def put_images(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W]
        return images.to(self.device, dtype=torch.float32, non_blocking=self.device.type == "cuda")

    def put_tokens(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, L]
        return tokens.to(self.device, non_blocking=self.device.type == "cuda")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where evaluation puts a model's inputs: ``CLIP.device`` (clipsearch's one lookup), else the
    device of the first parameter (an OpenCLIP model, a test stub)."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device
