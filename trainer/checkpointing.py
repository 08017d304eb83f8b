"""Training checkpoints: written atomically, read back without unpickling.

A checkpoint at global step S is two files in ``OUTPUT/checkpoints``:
``step_<S>.safetensors`` (the model weights) and ``step_<S>.state.pt`` (optimiser, grad scaler, RNG
states, step and data position) written second, so a checkpoint counts only once both exist. Both go
through ``clipsearch.atomic.atomic_path`` (a fresh temporary name, fsync of the file and the folder,
rename), so a crash or a full disk leaves the previous checkpoints intact. The state file holds only
tensors, dicts, lists and numbers, and is read with ``torch.load(weights_only=True)``.

Pruning after a save keeps the checkpoint just written and the ``keep - 1`` newest older ones; a
checkpoint with a higher step (left by a run resumed from further back) is never taken for "older".
``--resume latest`` takes the newest checkpoint that loads, skipping (with a warning) any that does not.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from pathlib import Path

import torch

from clipsearch.atomic import atomic_path
from clipsearch.errors import ClipsearchError

log = logging.getLogger(__name__)
_NAME = re.compile(r"step_(\d+)\.state\.pt$")


class CheckpointError(ClipsearchError):
    """A training checkpoint to resume from is missing or unreadable."""


def _step(stem: Path) -> int:
    return int(stem.name.removeprefix("step_"))


def save(directory: Path, step: int, state_dict: dict, state: dict, keep: int = 3) -> Path:
    """Write the checkpoint of ``step`` and prune older ones down to ``keep``. Returns the stem.

    A write that fails (a full disk) raises :class:`CheckpointError` and leaves no half checkpoint.
    """
    import shutil

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    stem = directory / f"step_{step:08d}"
    weights = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    had_state = stem.with_suffix(".state.pt").is_file()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(stem.with_suffix(".safetensors")) as tmp:
            save_file(weights, str(tmp))
        with atomic_path(stem.with_suffix(".state.pt")) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError, SafetensorError) as e:
        if not had_state:  # weights without a state file are no checkpoint, only used space
            with contextlib.suppress(OSError):  # never written, or the folder is not one
                stem.with_suffix(".safetensors").unlink()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        try:
            free = f"; {shutil.disk_usage(directory).free / 2**20:.0f} MiB free there"
        except OSError:
            free = ""
        raise CheckpointError(
            f"cannot write checkpoint {stem.name} in {directory}: {reason}{free}; {kept_note(directory)}"
        ) from e
    older = [s for s in list_checkpoints(directory) if _step(s) < step]
    for old in older[: max(0, len(older) - (keep - 1))] if keep > 0 else []:
        for suffix in (".state.pt", ".safetensors"):  # the state first: the pair stops counting at once
            old.with_suffix(suffix).unlink(missing_ok=True)
    return stem


def kept_note(directory: Path) -> str:
    """What a failed write leaves of the run's checkpoints in ``directory``, for its message."""
    try:
        before = len(list_checkpoints(directory))
    except OSError:  # the folder cannot even be listed
        before = 0
    return f"the {before} written before are kept" if before else "no checkpoint was written before it"


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


def resume_from(resume: str, directory: Path) -> tuple[Path, dict, dict, list[Path]]:
    """``(stem, weights, state, skipped)`` of the checkpoint ``resume`` names.

    ``latest``: the newest checkpoint in ``directory`` that loads; the ones skipped on the way (newer
    but unreadable: a truncated file, a disk error) are returned, and each is logged as a warning.
    """
    if resume != "latest":
        stem = resolve(resume, directory)
        return (stem, *load(stem), [])
    stems = list_checkpoints(directory)
    if not stems:
        raise CheckpointError(f"no checkpoint to resume in {directory}; start without --resume")
    skipped = []
    for stem in reversed(stems):
        try:
            return (stem, *load(stem), skipped)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", stem.name, e)
            skipped.append(stem)
    raise CheckpointError(
        f"none of the {len(stems)} checkpoints in {directory} can be read; start without --resume"
    )


def resolve(resume: str, directory: Path) -> Path:
    """The stem to resume from: ``latest`` in ``directory`` or an explicit file of a checkpoint."""
    if resume == "latest":
        stems = list_checkpoints(directory)
        if not stems:
            raise CheckpointError(f"no checkpoint to resume in {directory}; start without --resume")
        return stems[-1]
    p = Path(resume)
    if p.is_dir():
        raise CheckpointError(f"--resume {resume} is a folder; give a checkpoint's file or 'latest'")
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
    except pickle.UnpicklingError as e:  # torch's message suggests weights_only=False: never here
        raise CheckpointError(
            f"cannot read checkpoint {stem}: its state file holds Python objects other than tensors, "
            "dicts, lists and numbers, and a checkpoint is never unpickled"
        ) from e
    except Exception as e:  # noqa: BLE001 - untrusted bytes: any parse failure means "unreadable"
        raise CheckpointError(f"cannot read checkpoint {stem}: {type(e).__name__}: {e}") from e
    return weights, state
