"""Where the model runs: ``--device auto|cpu|cuda|mps``.

:func:`pick_device` is the policy as a pure function (tested without the hardware);
:func:`resolve_device` asks PyTorch what this machine has. ``auto`` takes CUDA when PyTorch sees a
CUDA GPU, else Apple's MPS, else the CPU. A device asked for by name that is not there is an error
that says so, never a silent fallback. On the chosen device the indexer's ``auto`` backend keeps
the fastest faithful precision (:mod:`clipsearch.backends`: fp16/bf16 copies on CUDA when they stay
at cosine >= 0.995 to fp32), and the vector search uses faiss-gpu when it is installed
(:mod:`clipsearch.vectors`).
"""

from __future__ import annotations

import logging

from clipsearch.errors import ClipsearchError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")


class DeviceError(ClipsearchError):
    """The device asked for is not available on this machine."""


def pick_device(requested: str, *, cuda: bool, mps: bool) -> str:
    """The device for ``requested`` given what the machine has (``cuda``/``mps`` available)."""
    if requested not in DEVICES:
        raise DeviceError(f"unknown device {requested!r}: use {', '.join(DEVICES)}")
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested == "cuda" and not cuda:
        raise DeviceError(
            "--device cuda: PyTorch sees no CUDA GPU here (a CPU-only torch build, or no driver); "
            "use --device cpu or auto"
        )
    if requested == "mps" and not mps:
        raise DeviceError(
            "--device mps: Apple's Metal backend is not available here; use --device cpu or auto"
        )
    return requested


def accelerator_possible(system: str, exists) -> bool:
    """Whether PyTorch could see an accelerator on this machine, judged without importing it: a pure
    function of the OS name (``platform.system()``) and ``exists(path)``. False only where no GPU
    driver is present (Linux without NVIDIA's or ROCm's device nodes, Windows-WSL without /dev/dxg);
    macOS may have MPS, and other systems are not judged (True: ask torch)."""
    if system != "Linux":
        return True
    return any(exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))


def resolve_device_without_torch(requested: str = "auto") -> str | None:
    """``requested`` resolved where that needs no torch (``cpu``, or ``auto`` on a machine with no GPU
    driver: the CPU), else None (ask :func:`resolve_device`)."""
    import os
    import platform

    if requested == "cpu":
        return "cpu"
    if requested == "auto" and not accelerator_possible(platform.system(), os.path.exists):
        logger.info("device: cpu (asked for auto; no GPU driver on this machine)")
        return "cpu"
    return None


def resolve_device(requested: str = "auto") -> str:
    """:func:`pick_device` for this machine (imports torch; ``cpu`` never asks it)."""
    if requested == "cpu":
        return "cpu"
    import torch

    mps = getattr(torch.backends, "mps", None)
    device = pick_device(
        requested,
        cuda=torch.cuda.is_available(),
        mps=bool(mps is not None and mps.is_available()),
    )
    logger.info("device: %s (asked for %s)", device, requested)
    return device
