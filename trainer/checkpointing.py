"""Training checkpoints: written atomically, read back without unpickling.

A checkpoint at global step S is two files in ``OUTPUT/checkpoints``:
``step_<S>.safetensors`` (the model weights) and ``step_<S>.state.pt`` (optimiser, grad scaler, RNG
states, step and data position) written second, so a checkpoint counts only once both exist. Each file
is written to a temporary name and moved into place with ``os.replace``. The state file holds only
tensors, dicts, lists and numbers, and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from clipsearch.errors import ClipsearchError

_NAME = re.compile(r"step_(\d+)\.state\.pt$")


class CheckpointError(ClipsearchError):
    """A training checkpoint to resume from is missing or unreadable."""


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save(directory: Path, step: int, state_dict: dict, state: dict, keep: int = 3) -> Path:
    """Write the checkpoint of ``step``; keep only the ``keep`` most recent ones. Returns the stem."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"step_{step:08d}"
    weights = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    _atomic(stem.with_suffix(".safetensors"), lambda p: save_file(weights, str(p)))
    _atomic(stem.with_suffix(".state.pt"), lambda p: torch.save(state, p))
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        for suffix in (".state.pt", ".safetensors"):
            old.with_suffix(suffix).unlink(missing_ok=True)
    return stem


def list_checkpoints(directory: Path) -> list[Path]:
    """Stems of the complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and p.with_name(f"step_{m.group(1)}.safetensors").is_file():
            found.append((int(m.group(1)), directory / f"step_{m.group(1)}"))
    return [stem for _, stem in sorted(found)]


def resolve(resume: str, directory: Path) -> Path:
    """The stem to resume from: ``latest`` in ``directory`` or an explicit file of a checkpoint."""
    if resume == "latest":
        stems = list_checkpoints(directory)
        if not stems:
            raise CheckpointError(f"no checkpoint to resume in {directory}; start without --resume")
        return stems[-1]
    p = Path(resume)
    name = p.name
    for suffix in (".state.pt", ".safetensors"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    stem = p.with_name(name)
    if not (stem.with_suffix(".safetensors").is_file() and stem.with_suffix(".state.pt").is_file()):
        raise CheckpointError(f"{resume}: not a complete checkpoint (need {stem}.safetensors and .state.pt)")
    return stem


def load(stem: Path) -> tuple[dict, dict]:
    """``(model state dict, training state)`` of a checkpoint, without executing any pickled code."""
    from safetensors.torch import load_file

    try:
        weights = load_file(str(stem.with_suffix(".safetensors")))
        state = torch.load(stem.with_suffix(".state.pt"), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {stem}: {e}") from e
    return weights, state
