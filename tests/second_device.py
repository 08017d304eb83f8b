"""A second device on a CPU-only machine, to catch a tensor left on the wrong device.

Inside ``with SecondDevice():``, ``x.to("meta")`` (and so ``model.to("meta")``) gives an :class:`OnMeta`
tensor: it reports ``device == meta`` like a GPU tensor reports ``cuda``, but holds real CPU data, so
the code runs to the end and produces real numbers. Every operation checks that its tensor arguments
share one device, as CUDA does, and raises :class:`DeviceMismatch` naming the operation otherwise.
As on CUDA, CPU scalars (0-dim tensors) mix with any device, and ``copy_`` / ``.to()`` may cross devices.

Code that is right on a GPU is right here, and code that forgets a ``.to(device)`` fails here as it
would on a GPU (``Expected all tensors to be on the same device``), without a GPU.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

META = torch.device("meta")
CPU = torch.device("cpu")
_CROSS_DEVICE = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class DeviceMismatch(RuntimeError):
    pass


class OnMeta(torch.Tensor):
    """Claims the ``meta`` device; ``._cpu`` is the CPU tensor with the values."""

    @staticmethod
    def __new__(cls, real: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(
            cls,
            real.shape,
            strides=real.stride(),
            storage_offset=real.storage_offset(),
            dtype=real.dtype,
            layout=real.layout,
            device=META,
            requires_grad=real.requires_grad,
        )
        t._cpu = real
        return t

    def __repr__(self) -> str:
        return f"OnMeta({self._cpu!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _devices(args, kwargs) -> set[str]:
    found = set()
    for a in tree_flatten((args, kwargs))[0]:
        if isinstance(a, OnMeta):
            found.add("meta")
        elif isinstance(a, torch.Tensor) and not (a.dim() == 0 and a.device.type == "cpu"):
            found.add(a.device.type)
    return found


def _unwrap(tree):
    return tree_map(lambda a: a._cpu if isinstance(a, OnMeta) else a, tree)


def _wants_meta(kwargs) -> bool:
    device = kwargs.get("device")
    return device is not None and torch.device(device).type == "meta"


def _run(func, args, kwargs):
    devices = _devices(args, kwargs)
    if func in _CROSS_DEVICE:
        to_meta = _wants_meta(kwargs) if "device" in kwargs else "meta" in _devices(args[:1], {})
    else:
        if len(devices) > 1:
            raise DeviceMismatch(
                f"Expected all tensors to be on the same device, but {func} got {sorted(devices)}"
            )
        to_meta = "meta" in devices or _wants_meta(kwargs)
    kwargs = dict(kwargs)
    if _wants_meta(kwargs):
        kwargs["device"] = CPU
    if func is torch.ops.aten._to_copy.default and "device" not in kwargs:
        kwargs["device"] = None
    out = func(*_unwrap(args), **_unwrap(kwargs))
    if args and isinstance(args[0], OnMeta) and out is args[0]._cpu:
        return args[0]  # an in-place operation returns the tensor it changed
    if not to_meta:
        return out
    return tree_map(lambda o: OnMeta(o) if type(o) is torch.Tensor else o, out)


class SecondDevice(TorchDispatchMode):
    """The mode that makes ``.to("meta")`` and ``device="meta"`` produce :class:`OnMeta` tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})
