"""What a model source is, and the identity its embeddings are stored under, without importing torch.

:func:`identify` resolves a source exactly as :func:`clipsearch.checkpoints.load_bundle` does (same
order, same errors) by reading JSON and hashing files, so a command whose model exports already exist
(the torch-free query and index paths) can find them, and the preprocessing and tokenizer to use,
without loading the model.

A model's identity covers everything that decides its features, not only the weights:

- a registered name ``ARCH/TAG`` is its own id: the registry pins the file (revision and sha256),
  the architecture, the activation and the normalisation;
- a model folder (clipsearch's, a training run's final model, or an OpenCLIP hub folder) is
  ``file:<folder>:<16 hex>``, a sha256 over the weights' sha256, the model config, the
  preprocessing config and the tokenizer config with its file's sha256;
- a bare weights file is ``file:<name>:<first 16 hex of its sha256>``: the file alone decides the
  architecture (inferred), preprocessing and tokenizer. With ``arch``/``quick_gelu`` overrides the
  digest covers them too. A copy of a registered file is recognised by its sha256.

Libraries written before this scheme keyed model folders by their weights alone; those ids are
:attr:`ModelIdentity.legacy_ids`, and :func:`library_model_id` keeps using one that a library recorded
for the same source, so an old library is neither re-embedded nor split in two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from clipsearch import paths
from clipsearch.errors import ModelLoadError
from clipsearch.hashing import user_file_sha256
from clipsearch.modelfile import MODEL_JSON, MODEL_WEIGHTS, read_json, read_record
from clipsearch.pretrained import PRETRAINED, not_found_message, pretrained_path, registered_match
from clipsearch.transform import OPENAI_MEAN, OPENAI_STD, PreprocessConfig

log = logging.getLogger(__name__)

HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
RUN_MODEL = "model"  # where `clipsearch-train --output RUN` saves its final model
_RUN_MARKERS = ("args.json", "metrics.jsonl", "checkpoints")  # what a training run folder holds
_RECORD = "model.json"  # in paths.cache_dir(model_id): what a bare weights file turned out to be
_CHECKPOINT = re.compile(r"^step_(\d+)\.safetensors$")


@dataclass(frozen=True)
class ModelIdentity:
    """A model source resolved without torch: its id, where its files are, how to feed it."""

    model_id: str  # the key of library rows, exports and caches (paths.cache_dir)
    kind: str  # "registered" | "model-dir" | "run-dir" | "hub-dir" | "weights-file"
    source: str  # what to record to load it again: a registered name or an absolute path
    weights: Path  # the weights file (a registered name's may not be downloaded yet)
    model_cfg: dict | None  # OpenCLIP schema; None for a bare weights file never loaded
    preprocess_cfg: PreprocessConfig | None  # None exactly when model_cfg is
    tokenizer_cfg: dict  # for Tokenizer.from_config(tokenizer_cfg, tokenizer_dir)
    tokenizer_dir: Path | None  # the folder holding a trained tokenizer's file
    legacy_ids: tuple[str, ...] = ()  # ids older clipsearch gave this same model


def identify(source: str | Path, *, arch: str | None = None, quick_gelu: bool | None = None) -> ModelIdentity:
    """Resolve ``source`` as :func:`~clipsearch.checkpoints.load_bundle` would, without torch.

    Never downloads. Raises :class:`ModelLoadError` for what ``load_bundle`` would refuse at this
    stage (unknown name, missing file, a folder that is no model, a run without a final model).
    """
    text = str(source)
    path = Path(text).expanduser()
    try:
        if (arch is not None or quick_gelu is not None) and not path.is_file():
            # Registered names and model folders carry their architecture; overriding it would
            # only produce wrong features silently.
            raise ModelLoadError(
                f"arch/quick_gelu apply to a bare weights file only; {text} says its own architecture"
            )
        if text in PRETRAINED and not path.exists():
            return _registered(text)
        if path.is_dir():
            return _directory(path)
        if path.is_file():
            return _weights_file(path, arch, quick_gelu)
    except OSError as e:  # e.g. a model folder the user may not open: is_dir()/is_file() raise
        raise ModelLoadError(f"cannot read model {text}: {e.strerror or e}") from e
    raise ModelLoadError(not_found_message(text))


def library_model_id(library, identity: ModelIdentity) -> str:
    """The id ``library`` knows this model under: its own, or a legacy id recorded for the same source.

    A legacy id is taken only when the library recorded it for this very source (same resolved
    path) and its weights hash is this model's: the library then keeps its embeddings.
    """
    known = library.model_ids()
    if identity.model_id in known:
        return identity.model_id
    for old in identity.legacy_ids:
        if old in known and _same_place(library.model_source(old), identity):
            log.info(
                "library knows %s as %s (id before config and tokenizer were covered)", identity.source, old
            )
            return old
    return identity.model_id


def remember(identity: ModelIdentity, model_cfg: dict, preprocess_cfg: PreprocessConfig) -> None:
    """Record what a bare weights file turned out to be, so :func:`identify` knows it next time.

    Best effort: a cache that cannot be written only means torch is needed again to find out.
    """
    if identity.model_cfg is not None:
        return
    from clipsearch.atomic import write_text

    record = {
        "model_id": identity.model_id,
        "model_cfg": model_cfg,
        "preprocess_cfg": preprocess_cfg.to_dict(),
    }
    try:
        write_text(paths.cache_dir(identity.model_id) / _RECORD, json.dumps(record, indent=1))
    except OSError as e:
        log.info("could not record the config of %s (%s); it is inferred again next time", identity.source, e)


# --------------------------------------------------------------------------------------------------
# The kinds of source


def _registered(name: str) -> ModelIdentity:
    entry = PRETRAINED[name]
    cfg = registered_config(name)
    return ModelIdentity(
        model_id=name,
        kind="registered",
        source=name,
        weights=pretrained_path(name),
        model_cfg=cfg,
        preprocess_cfg=preprocess_config(cfg, entry),
        tokenizer_cfg=_clip_bpe(cfg),
        tokenizer_dir=None,
    )


def registered_config(name: str) -> dict:
    """The OpenCLIP-schema config of a registered name: its architecture with its activation."""
    entry = PRETRAINED[name]
    cfg = named_config(entry["arch"])
    cfg["quick_gelu"] = entry["quick_gelu"]
    return cfg


def named_config(name: str) -> dict:
    from clipsearch.configs import get_config

    try:
        return dict(get_config(name))
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise ModelLoadError(f"unknown architecture {name!r}: {e}") from e


def _directory(path: Path) -> ModelIdentity:
    if (path / MODEL_JSON).is_file():
        return _model_dir(path, kind="model-dir", name=path.name)
    if (path / RUN_MODEL / MODEL_JSON).is_file():
        return _model_dir(path / RUN_MODEL, kind="run-dir", name=path.name)
    if (path / HUB_CONFIG).is_file():
        return _hub_dir(path)
    if any((path / marker).exists() for marker in _RUN_MARKERS):
        raise ModelLoadError(_unfinished_run_message(path))
    raise ModelLoadError(
        f"{path} is a folder but holds neither {MODEL_JSON} (a clipsearch model), "
        f"{RUN_MODEL}/{MODEL_JSON} (a finished training run) nor {HUB_CONFIG} (an OpenCLIP hub model)"
    )


def _unfinished_run_message(path: Path) -> str:
    steps = []
    ckpts = path / "checkpoints"
    if ckpts.is_dir():
        steps = sorted(int(m.group(1)) for p in ckpts.iterdir() if (m := _CHECKPOINT.match(p.name)))
    where = (
        f"{len(steps)} checkpoint(s) in {ckpts}, the last at step {steps[-1]}"
        if steps
        else "no checkpoint yet"
    )
    return (
        f"{path} is a training run without a final model ({RUN_MODEL}/ is written when training ends; "
        f"{where}). Let it finish, or resume it with `clipsearch-train --output {path} --resume latest`"
    )


def _model_dir(directory: Path, kind: str, name: str) -> ModelIdentity:
    record = read_record(directory)
    cfg, pp, tok = record["model_cfg"], record["preprocess_cfg"], record["tokenizer"]
    weights = directory / MODEL_WEIGHTS
    try:
        preprocess_cfg = PreprocessConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in pp.items()}
        )
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{directory / MODEL_JSON}: bad preprocess config: {e}") from e
    tok_file = _tokenizer_file(tok, directory)
    weights_sha = user_file_sha256(weights)
    parts = {
        "weights_sha256": weights_sha,
        "model_cfg": cfg,
        "preprocess_cfg": preprocess_cfg.to_dict(),
        "tokenizer": tok,
        "tokenizer_file_sha256": user_file_sha256(tok_file) if tok_file else None,
    }
    legacy = [f"file:{directory.name}:{weights_sha[:16]}"]
    if name != directory.name:
        legacy.insert(0, f"file:{name}:{weights_sha[:16]}")
    return ModelIdentity(
        model_id=f"file:{name}:{_digest(parts)}",
        kind=kind,
        source=str(directory.resolve()),
        weights=weights,
        model_cfg=cfg,
        preprocess_cfg=preprocess_cfg,
        tokenizer_cfg=tok,
        tokenizer_dir=directory if tok_file else None,
        legacy_ids=tuple(legacy),
    )


def _tokenizer_file(tok: dict, directory: Path) -> Path | None:
    if tok.get("type") != "tokenizers-json":
        return None
    name = tok.get("file", "tokenizer.json")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ModelLoadError(
            f"{directory / MODEL_JSON}: tokenizer file must be a plain file name, got {name!r}"
        )
    if not (directory / name).is_file():
        raise ModelLoadError(f"{directory} has a trained tokenizer config but no {name}")
    return directory / name


def hub_config(directory: Path) -> tuple[dict, dict, Path]:
    """``(model_cfg, preprocess dict, weights path)`` of an OpenCLIP hub folder, checked."""
    config = read_json(directory / HUB_CONFIG)
    cfg = config.get("model_cfg")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("vision_cfg"), dict):
        raise ModelLoadError(f"{directory / HUB_CONFIG} has no model_cfg with a vision_cfg")
    unsupported = [k for k in ("timm_model_name", "hf_model_name") if cfg["vision_cfg"].get(k)]
    text_cfg = cfg.get("text_cfg") if isinstance(cfg.get("text_cfg"), dict) else {}
    unsupported += [k for k in ("hf_model_name", "hf_tokenizer_name") if text_cfg.get(k)]
    if unsupported:
        raise ModelLoadError(
            f"{directory} uses {', '.join(unsupported)}: only CLIP's own towers are supported"
        )
    weights = next((directory / n for n in HUB_WEIGHTS if (directory / n).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{directory} has {HUB_CONFIG} but neither {' nor '.join(HUB_WEIGHTS)}")
    cfg = dict(cfg)
    cfg.setdefault("quick_gelu", False)  # OpenCLIP's default activation is nn.GELU
    pp = config.get("preprocess_cfg") or {}
    return cfg, pp, weights


def _hub_dir(directory: Path) -> ModelIdentity:
    cfg, pp, weights = hub_config(directory)
    preprocess_cfg = preprocess_config(cfg, pp)
    weights_sha = user_file_sha256(weights)
    tok = _clip_bpe(cfg)
    parts = {
        "weights_sha256": weights_sha,
        "model_cfg": cfg,
        "preprocess_cfg": preprocess_cfg.to_dict(),
        "tokenizer": tok,
    }
    return ModelIdentity(
        model_id=f"file:{directory.name}:{_digest(parts)}",
        kind="hub-dir",
        source=str(directory.resolve()),
        weights=weights,
        model_cfg=cfg,
        preprocess_cfg=preprocess_cfg,
        tokenizer_cfg=tok,
        tokenizer_dir=None,
        legacy_ids=(f"file:{directory.name}:{weights_sha[:16]}",),
    )


def _weights_file(path: Path, arch: str | None, quick_gelu: bool | None) -> ModelIdentity:
    digest = user_file_sha256(path)
    registered = registered_match(digest) if arch is None and quick_gelu is None else None
    if registered:
        # A copy of a released file put somewhere by hand: the registry knows what it is.
        model_id = registered
        cfg = registered_config(registered)
        entry = PRETRAINED[registered]
    else:
        entry = {}
        cfg = named_config(arch) if arch is not None else None
        if arch is not None or quick_gelu is not None:
            parts = {"weights_sha256": digest, "arch_cfg": cfg, "quick_gelu": quick_gelu}
            model_id = f"file:{path.name}:{_digest(parts)}"
        else:
            model_id = f"file:{path.name}:{digest[:16]}"
    if cfg is not None and quick_gelu is not None:
        cfg["quick_gelu"] = bool(quick_gelu)
    pp = preprocess_config(cfg, entry) if cfg is not None else None
    if cfg is None:
        cfg, pp = _remembered(model_id)
    if cfg is None:
        cfg = _safetensors_config(path)
        if cfg is not None and quick_gelu is not None:
            cfg["quick_gelu"] = bool(quick_gelu)
        pp = preprocess_config(cfg, {}) if cfg is not None else None
    return ModelIdentity(
        model_id=model_id,
        kind="weights-file",
        source=str(path.resolve()),
        weights=path,
        model_cfg=cfg,
        preprocess_cfg=pp,
        tokenizer_cfg=_clip_bpe(cfg) if cfg is not None else {"type": "clip-bpe"},
        tokenizer_dir=None,
    )


class _Shape:
    """Stands in for a tensor whose shape a safetensors header gives (all that inference reads)."""

    def __init__(self, shape):
        self.shape = tuple(int(n) for n in shape)


def _safetensors_config(path: Path) -> dict | None:
    """The architecture of OpenAI-layout weights in a safetensors file, from its header alone."""
    from clipsearch.configs import config_from_openai_state_dict

    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000:  # not safetensors (or absurd): torch will tell
                return None
            header = json.loads(f.read(n))
        shapes = {k: _Shape(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        if shapes and all(k.startswith("module.") for k in shapes):
            shapes = {k[len("module.") :]: v for k, v in shapes.items()}
        return config_from_openai_state_dict(shapes)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, ModelLoadError):
        return None


def _remembered(model_id: str) -> tuple[dict | None, PreprocessConfig | None]:
    try:
        record = json.loads((paths.cache_dir(model_id) / _RECORD).read_text(encoding="utf-8"))
        if record.get("model_id") != model_id:
            return None, None
        return record["model_cfg"], PreprocessConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in record["preprocess_cfg"].items()}
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None


# --------------------------------------------------------------------------------------------------
# Shared pieces


def preprocess_config(cfg: dict, settings: dict) -> PreprocessConfig:
    """The eval preprocessing of ``cfg`` with ``settings``' normalisation (OpenAI's by default)."""
    size = cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ModelLoadError(f"non-square image size {size} is not supported")
        size = size[0]
    try:
        return PreprocessConfig(
            image_size=int(size),
            mean=tuple(float(x) for x in settings.get("mean", OPENAI_MEAN)),
            std=tuple(float(x) for x in settings.get("std", OPENAI_STD)),
            interpolation=settings.get("interpolation", "bicubic"),
            resize_mode=settings.get("resize_mode", "shortest"),
        )
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"bad preprocessing config: {str(e).splitlines()[0]}") from e


def _clip_bpe(cfg: dict) -> dict:
    return {"type": "clip-bpe", "context_length": int(cfg.get("text_cfg", {}).get("context_length", 77))}


def _digest(parts: dict) -> str:
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _same_place(recorded: str, identity: ModelIdentity) -> bool:
    candidates = {identity.source, str(identity.weights.parent.resolve()), str(identity.weights.resolve())}
    if identity.kind == "run-dir":
        candidates.add(str(Path(identity.source).parent))
    try:
        return str(Path(recorded).expanduser().resolve()) in candidates
    except (OSError, RuntimeError):
        return False
