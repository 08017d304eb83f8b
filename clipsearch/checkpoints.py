"""Loading CLIP models: one call from any source to a model with its preprocessing and tokenizer.

``load_bundle(source)`` accepts, in this order of resolution:

1. a registered pretrained name ``ARCH/TAG`` (:mod:`clipsearch.pretrained`), downloaded on first use;
2. a clipsearch model directory (:mod:`clipsearch.modelfile`): nothing inferred;
3. a training run's output folder (``clipsearch-train --output RUN``): its final model, ``RUN/model``;
4. an OpenCLIP hub directory (``open_clip_config.json`` beside ``open_clip_model.safetensors`` or
   ``open_clip_pytorch_model.bin``): its model and preprocessing config honoured;
5. a weights file (:mod:`clipsearch.weights`): OpenAI's TorchScript archive (read without executing
   it), a pickled state dict (``torch.load(weights_only=True)``), or safetensors; the architecture is
   inferred from the weights unless ``arch=`` is given.

Which source a name or path is, and the model's identity, are decided by :mod:`clipsearch.identity`
without torch; this module builds the model. Saving is :func:`clipsearch.modelfile.save_model`.
Nothing here executes code from a file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipsearch.errors import ModelLoadError
from clipsearch.modelfile import MODEL_JSON, MODEL_WEIGHTS, read_json, read_record, save_model
from clipsearch.pretrained import (
    OPENAI_MEAN,
    OPENAI_STD,
    PRETRAINED,
    cached_pretrained,
    fetch_pretrained,
    list_pretrained,
    not_found_message,
    pretrained_path,
    registered_match,
)
from clipsearch.torchscript import first_line
from clipsearch.weights import read_safetensors, read_state_dict

log = logging.getLogger(__name__)

__all__ = [
    "ModelBundle",
    "load",
    "load_bundle",
    "save_model",
    "list_pretrained",
    "cached_pretrained",
    "pretrained_path",
    "fetch_pretrained",
    "read_state_dict",
]

HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# --------------------------------------------------------------------------------------------------
# The bundle


@dataclass
class ModelBundle:
    """A model with everything needed to feed it, and a stable identity for photo libraries.

    ``model_id`` is the registered name for pretrained weights (``ViT-B-32/openai``), else
    ``file:<basename>:<sha256 prefix of the weights>``, so the same file always gives the same id.
    ``config`` is the model's architecture in the OpenCLIP JSON schema.
    """

    model: Any
    preprocess_cfg: Any
    tokenizer: Any
    model_id: str
    config: dict

    @property
    def preprocess(self) -> Callable:
        """The eval transform: ``PIL.Image -> Tensor [3, H, W]``."""
        from clipsearch.transform import image_transform

        return image_transform(self.preprocess_cfg)


def load(source: str | Path, device: str = "cpu", **kwargs) -> tuple[Any, Callable, Callable]:
    """Load a CLIP model in eval mode: returns ``(model, preprocess, tokenize)``.

    ``tokenize(list_of_str)`` returns a LongTensor ``[N, context_length]``. See :func:`load_bundle`
    for the sources and keyword arguments.
    """
    bundle = load_bundle(source, device=device, **kwargs)
    return bundle.model, bundle.preprocess, bundle.tokenizer


def load_bundle(
    source: str | Path,
    device: str = "cpu",
    precision: str | None = "fp32",
    *,
    arch: str | None = None,
    quick_gelu: bool | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> ModelBundle:
    """Resolve ``source`` to a :class:`ModelBundle` with the model in eval mode on ``device``.

    ``precision``: ``fp32`` (default), ``bf16`` or ``fp16`` (weights cast; LayerNorm stays fp32).
    ``arch``: a named architecture or OpenCLIP JSON path, for a weights file instead of inferring it.
    ``quick_gelu``: override the activation for a weights file (OpenAI and inferred default: True).
    ``progress(bytes_done, total_or_None)`` is called while a pretrained checkpoint downloads.
    """
    if precision is None:
        precision = "fp32"
    if precision not in _PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; use one of {', '.join(_PRECISIONS)}")
    text = str(source)
    path = Path(text).expanduser()
    if (arch is not None or quick_gelu is not None) and not path.is_file():
        # Registered names and model directories carry their architecture; overriding it would
        # only produce wrong features silently.
        raise ModelLoadError(
            f"arch/quick_gelu apply to a bare weights file only; {text} says its own architecture"
        )
    try:
        if text in PRETRAINED and not path.exists():
            bundle = _load_pretrained(text, progress=progress)
        elif path.is_dir():
            if (path / MODEL_JSON).is_file():
                bundle = _load_clipsearch_dir(path)
            elif (path / HUB_CONFIG).is_file():
                bundle = _load_hub_dir(path)
            else:
                raise ModelLoadError(
                    f"{path} is a directory but holds neither {MODEL_JSON} (a clipsearch model) "
                    f"nor {HUB_CONFIG} (an OpenCLIP hub model)"
                )
        elif path.is_file():
            bundle = _load_weights_file(path, arch=arch, quick_gelu=quick_gelu)
        else:
            raise ModelLoadError(not_found_message(text))
    except OSError as e:  # e.g. a model folder the user may not open: is_dir()/is_file() raise
        raise ModelLoadError(f"cannot read model {text}: {e.strerror or e}") from e
    import torch

    dtype = getattr(torch, _PRECISIONS[precision])
    try:
        bundle.model.to(device=device)
    except (RuntimeError, AssertionError) as e:  # torch's "not compiled with CUDA" is an assert
        raise ModelLoadError(f"cannot use device {device!r}: {first_line(e)}") from e
    if dtype != torch.float32:
        _cast_except_layernorm(bundle.model, dtype)
    bundle.model.eval()
    return bundle


def _load_pretrained(name: str, progress=None) -> ModelBundle:
    entry = PRETRAINED[name]
    path = fetch_pretrained(name, progress=progress)
    state_dict = read_state_dict(path)
    cfg = _named_config(entry["arch"])
    cfg["quick_gelu"] = entry["quick_gelu"]
    model = _build_and_load(cfg, state_dict, str(path))
    preprocess_cfg = _preprocess_config(cfg, **_entry_preprocess(entry))
    return ModelBundle(model, preprocess_cfg, _clip_tokenizer(cfg), name, cfg)


# --------------------------------------------------------------------------------------------------
# Building models from weights


def _named_config(name: str) -> dict:
    from clipsearch.configs import get_config

    try:
        return dict(get_config(name))
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise ModelLoadError(f"unknown architecture {name!r}: {e}") from e


def _infer_config(state_dict: dict, path: Path) -> dict:
    from clipsearch.configs import config_from_openai_state_dict

    try:
        return config_from_openai_state_dict(state_dict)
    except (ModelLoadError, KeyError, ValueError, IndexError, AttributeError) as e:
        raise ModelLoadError(
            f"the weights in {path} match no CLIP architecture clipsearch knows ({first_line(e)}); "
            "pass arch= (--arch) to name it"
        ) from e


def _build_and_load(cfg: dict, state_dict: dict, origin: str):
    """Build ``cfg`` and load ``state_dict`` strictly, naming the first key that does not fit.

    The model is built on the meta device and the loaded tensors are assigned to it: a random
    initialisation that every weight then overwrites would cost seconds for a ViT-B/32.
    """
    import torch

    from clipsearch.model import build_model

    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except (ModelLoadError, KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot build the architecture of {origin}: {first_line(e)}") from e
    expected = model.state_dict()
    # Causal masks are derived, not learned; some exporters saved them, our model need not.
    state_dict = {k: v for k, v in state_dict.items() if k in expected or not k.endswith("attn_mask")}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise ModelLoadError(
            f"the weights in {origin} do not fit the architecture: {'; '.join(parts)} keys; "
            "pass arch= (--arch) if the architecture was guessed wrong"
        )
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelLoadError(
                f"shape mismatch for {key} in {origin}: file has {tuple(tensor.shape)}, "
                f"architecture expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.float()  # OpenAI's archives hold fp16 weights; precision is applied by the caller
    # Buffers left out of state dicts (the causal mask) are still on the meta device: rebuild them.
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name == "attn_mask" and hasattr(module, "build_attention_mask"):
                module.attn_mask = module.build_attention_mask()
            else:
                return _build_and_load_eagerly(cfg, state_dict)
    return model


def _build_and_load_eagerly(cfg: dict, state_dict: dict):
    """The plain way, for a model with derived buffers we do not know how to rebuild."""
    from clipsearch.model import build_model

    model = build_model(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model


def _preprocess_config(
    cfg: dict, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic", resize_mode="shortest"
):
    from clipsearch.transform import PreprocessConfig

    size = cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ModelLoadError(f"non-square image size {size} is not supported")
        size = size[0]
    try:
        return PreprocessConfig(
            image_size=int(size),
            mean=tuple(float(x) for x in mean),
            std=tuple(float(x) for x in std),
            interpolation=interpolation,
            resize_mode=resize_mode,
        )
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"bad preprocessing config: {first_line(e)}") from e


def _entry_preprocess(entry: dict) -> dict:
    """A registry entry's normalisation settings (OpenAI's unless it says otherwise)."""
    keys = ("mean", "std", "interpolation", "resize_mode")
    return {k: entry[k] for k in keys if k in entry}


def _clip_tokenizer(cfg: dict):
    from clipsearch.tokenizer import Tokenizer

    return Tokenizer(context_length=int(cfg.get("text_cfg", {}).get("context_length", 77)))


def _file_id(name: str, weights: Path) -> str:
    from clipsearch.hashing import user_file_sha256

    return f"file:{name}:{user_file_sha256(weights)[:16]}"


def _load_weights_file(path: Path, arch: str | None, quick_gelu: bool | None) -> ModelBundle:
    from clipsearch.hashing import user_file_sha256

    state_dict = read_state_dict(path)
    digest = user_file_sha256(path)
    registered = registered_match(digest) if arch is None else None
    entry = PRETRAINED[registered] if registered else {}
    if arch is not None:
        cfg = _named_config(arch)
    elif registered:
        # A copy of a released file put somewhere by hand: use what the registry knows about it.
        cfg = _named_config(entry["arch"])
        cfg["quick_gelu"] = entry["quick_gelu"]
    else:
        cfg = _infer_config(state_dict, path)
    if quick_gelu is not None:
        cfg["quick_gelu"] = bool(quick_gelu)
    model = _build_and_load(cfg, state_dict, str(path))
    preprocess_cfg = _preprocess_config(cfg, **_entry_preprocess(entry))
    model_id = registered or f"file:{path.name}:{digest[:16]}"
    return ModelBundle(model, preprocess_cfg, _clip_tokenizer(cfg), model_id, cfg)


def _load_hub_dir(directory: Path) -> ModelBundle:
    config = read_json(directory / HUB_CONFIG)
    cfg = config.get("model_cfg")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("vision_cfg"), dict):
        raise ModelLoadError(f"{directory / HUB_CONFIG} has no model_cfg with a vision_cfg")
    unsupported = [k for k in ("timm_model_name", "hf_model_name") if cfg["vision_cfg"].get(k)]
    unsupported += [k for k in ("hf_model_name", "hf_tokenizer_name") if cfg.get("text_cfg", {}).get(k)]
    if unsupported:
        raise ModelLoadError(
            f"{directory} uses {', '.join(unsupported)}: only CLIP's own towers are supported"
        )
    weights = next((directory / n for n in HUB_WEIGHTS if (directory / n).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{directory} has {HUB_CONFIG} but neither {' nor '.join(HUB_WEIGHTS)}")
    cfg = dict(cfg)
    cfg.setdefault("quick_gelu", False)  # OpenCLIP's default activation is nn.GELU
    model = _build_and_load(cfg, read_state_dict(weights), str(weights))
    pp = config.get("preprocess_cfg") or {}
    preprocess_cfg = _preprocess_config(
        cfg,
        mean=pp.get("mean", OPENAI_MEAN),
        std=pp.get("std", OPENAI_STD),
        interpolation=pp.get("interpolation", "bicubic"),
        resize_mode=pp.get("resize_mode", "shortest"),
    )
    return ModelBundle(model, preprocess_cfg, _clip_tokenizer(cfg), _file_id(directory.name, weights), cfg)


def _load_clipsearch_dir(directory: Path) -> ModelBundle:
    record = read_record(directory)
    cfg, pp, tok = record["model_cfg"], record["preprocess_cfg"], record["tokenizer"]
    weights = directory / MODEL_WEIGHTS
    model = _build_and_load(cfg, read_safetensors(weights), str(weights))
    from clipsearch.tokenizer import Tokenizer
    from clipsearch.transform import PreprocessConfig

    try:
        preprocess_cfg = PreprocessConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in pp.items()}
        )
        tokenizer = Tokenizer.from_config(tok, directory)
    except (TypeError, ValueError, KeyError, OSError) as e:
        raise ModelLoadError(f"{directory / MODEL_JSON}: bad preprocess or tokenizer config: {e}") from e
    return ModelBundle(model, preprocess_cfg, tokenizer, _file_id(directory.name, weights), cfg)


def _cast_except_layernorm(model, dtype) -> None:
    """Cast weights to ``dtype`` but keep LayerNorm's affine parameters in fp32 (it computes there)."""
    import torch

    norms = {m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    for module in model.modules():
        if module in norms:
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point():
                setattr(module, name, buf.to(dtype))
