"""The clipsearch model file: a directory with ``model.safetensors`` and ``clipsearch_model.json``.

``{"format": "clipsearch-model", "version": 1, "model_cfg": {...OpenCLIP schema...},
"preprocess_cfg": {...}, "tokenizer": {...}}``, plus the tokenizer's own files when it was trained.
Nothing is inferred and nothing is unpickled. Writing is atomic: a new directory appears complete or
not at all; in an existing one each file is replaced atomically, the JSON last, so a reader never
sees a config without its weights. Reading the record needs no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from clipsearch.atomic import commit, fsync_dir, umask
from clipsearch.errors import ModelLoadError

MODEL_JSON = "clipsearch_model.json"
MODEL_WEIGHTS = "model.safetensors"
FORMAT_NAME = "clipsearch-model"
FORMAT_VERSION = 1


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a :class:`ModelLoadError` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path} is not readable JSON: {first}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def read_record(directory: Path) -> dict:
    """The validated ``clipsearch_model.json`` of a model directory (its weights file must exist)."""
    record = read_json(directory / MODEL_JSON)
    if record.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{directory / MODEL_JSON} is not a clipsearch model file")
    if not isinstance(record.get("version"), int) or record["version"] > FORMAT_VERSION:
        raise ModelLoadError(
            f"{directory} was written by a newer clipsearch (format version {record.get('version')}); "
            "upgrade clipsearch to load it"
        )
    cfg, pp, tok = record.get("model_cfg"), record.get("preprocess_cfg"), record.get("tokenizer")
    if not (isinstance(cfg, dict) and isinstance(pp, dict) and isinstance(tok, dict)):
        raise ModelLoadError(f"{directory / MODEL_JSON} lacks model_cfg, preprocess_cfg or tokenizer")
    if not (directory / MODEL_WEIGHTS).is_file():
        raise ModelLoadError(f"{directory} has {MODEL_JSON} but no {MODEL_WEIGHTS}")
    return record


def save_model(
    directory: str | Path,
    model,
    preprocess_cfg,
    tokenizer,
    extra: dict | None = None,
    model_cfg: dict | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``clipsearch_model.json`` (+ the tokenizer's files) atomically.

    ``model_cfg`` defaults to the config the model was built from (``model.config``). A new directory
    appears complete or not at all; in an existing one each file is replaced atomically, the JSON
    last, so a reader never sees a config without its weights.
    """
    from safetensors.torch import save_file

    cfg = model_cfg if model_cfg is not None else getattr(model, "config", None)
    if not isinstance(cfg, dict):
        raise ValueError("save_model needs the model's config: pass model_cfg=")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    fresh = not directory.exists()
    work = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(work / MODEL_WEIGHTS), metadata={"format": FORMAT_NAME})
        tok_cfg = tokenizer.to_config() if hasattr(tokenizer, "to_config") else {"type": "clip-bpe"}
        if hasattr(tokenizer, "save"):
            tok_out = tokenizer.save(work)
            if isinstance(tok_out, dict):
                tok_cfg = tok_out
        pp = (
            dataclasses.asdict(preprocess_cfg)
            if dataclasses.is_dataclass(preprocess_cfg)
            else dict(preprocess_cfg)
        )
        pp = {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}
        record = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model_cfg": cfg,
            "preprocess_cfg": pp,
            "tokenizer": tok_cfg,
        }
        if extra:
            record["extra"] = extra
        (work / MODEL_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        names = sorted(p.name for p in work.iterdir() if p.name != MODEL_JSON) + [MODEL_JSON]
        if fresh:  # the whole folder appears at once
            for name in names:
                commit(work / name, work / name)  # fsync'd, a plain file's mode
            os.chmod(work, 0o777 & ~umask())  # mkdtemp makes it private; a model is as readable as any
            os.replace(work, directory)
            fsync_dir(directory.parent)
        else:  # file by file, the JSON last: a reader never sees a config without its weights
            directory.mkdir(exist_ok=True)
            for name in names:
                commit(work / name, directory / name)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return directory
