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

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipsearch.errors import ModelLoadError
from clipsearch.identity import ModelIdentity, identify, library_model_id, preprocess_config, remember
from clipsearch.modelfile import MODEL_JSON, save_model
from clipsearch.pretrained import cached_pretrained, fetch_pretrained, list_pretrained, pretrained_path
from clipsearch.torchscript import first_line
from clipsearch.weights import read_safetensors, read_state_dict

log = logging.getLogger(__name__)

__all__ = [
    "ModelBundle",
    "LazyBundle",
    "open_bundle",
    "load",
    "load_bundle",
    "save_model",
    "list_pretrained",
    "cached_pretrained",
    "pretrained_path",
    "fetch_pretrained",
    "read_state_dict",
]

_PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# --------------------------------------------------------------------------------------------------
# The bundle


@dataclass
class ModelBundle:
    """A model with everything needed to feed it, and a stable identity for photo libraries.

    ``model_id`` is the registered name for pretrained weights (``ViT-B-32/openai``), else
    ``file:<name>:<16 hex>`` covering the weights, config, preprocessing and tokenizer (see
    :mod:`clipsearch.identity`), so the same model always gives the same id and another does not.
    ``config`` is the model's architecture in the OpenCLIP JSON schema; ``identity`` says where it came
    from (None for a bundle made by hand, as tests do).
    """

    model: Any
    preprocess_cfg: Any
    tokenizer: Any
    model_id: str
    config: dict
    identity: ModelIdentity | None = None

    @property
    def name(self) -> str:
        """How output names the model for a person (:func:`clipsearch.store.model_label`): its
        registered name or folder, never the internal id (unless it was made by hand)."""
        from clipsearch.store import model_label

        return model_label(self.model_id, self.identity.source if self.identity is not None else None)

    @property
    def preprocess(self) -> Callable:
        """The eval transform: ``PIL.Image -> Tensor [3, H, W]``."""
        from clipsearch.transform import image_transform

        return image_transform(self.preprocess_cfg)


class LazyBundle:
    """A :class:`ModelBundle` whose torch model is built only when something first asks for it.

    Everything a run may need without the model is known from the identity, without torch:
    ``model_id``, ``config``, ``preprocess_cfg``/``preprocess``, ``identity`` and ``placement``
    (``("cpu", "float32")``). An index run whose backend verdict says ONNX embeds with ONNX Runtime
    from the exported tower and never touches ``model``; the first access to ``model`` or
    ``tokenizer`` loads the real bundle (``load()``, which may import torch) and says so in the log.
    Only for models on the CPU in fp32 whose architecture is known without reading the weights:
    :func:`open_bundle` decides.
    """

    def __init__(self, identity: ModelIdentity, load: Callable[[], ModelBundle]):
        self.identity = identity
        self.model_id = identity.model_id
        self.config = identity.model_cfg
        self.preprocess_cfg = identity.preprocess_cfg
        self.placement = ("cpu", "float32")
        self._load = load
        self._bundle: ModelBundle | None = None

    @property
    def name(self) -> str:
        """How output names the model (as :attr:`ModelBundle.name`)."""
        from clipsearch.store import model_label

        return model_label(self.model_id, self.identity.source)

    @property
    def loaded(self) -> bool:
        """Whether the torch model has been built (by an access to ``model`` or ``tokenizer``)."""
        return self._bundle is not None

    def _loaded(self) -> ModelBundle:
        if self._bundle is None:
            log.info("loading %s in torch (a step needs the model itself)", self.identity.source)
            self._bundle = self._load()
        return self._bundle

    @property
    def model(self):
        return self._loaded().model

    @property
    def tokenizer(self):
        return self._loaded().tokenizer

    @property
    def preprocess(self) -> Callable:
        from clipsearch.transform import image_transform

        return image_transform(self.preprocess_cfg)


def open_bundle(
    source: str | Path,
    device: str = "cpu",
    *,
    library=None,
    load: Callable[[str], ModelBundle] | None = None,
) -> ModelBundle | LazyBundle:
    """``source`` as a bundle whose model loads when first used (:class:`LazyBundle`) where that is
    possible without torch, else loaded now (:func:`load_bundle`, or ``load(device)``: the CLI's, with
    its download progress bar).

    Lazy when the device is the CPU (``auto`` counts when :func:`clipsearch.devices.resolve_device_without_torch`
    can tell there is no accelerator), the weights are on this machine and the architecture is known
    without reading them; otherwise (a download, a GPU, a bare weights file never loaded) the
    model is loaded here, as before.
    """
    from clipsearch.devices import resolve_device_without_torch

    def load_now(on: str) -> ModelBundle:
        if load is not None:
            return load(on)
        from clipsearch.devices import resolve_device

        return load_bundle(source, device=resolve_device(on), library=library)

    cpu = resolve_device_without_torch(device) == "cpu"
    try:
        identity = identify(source)
    except ModelLoadError:
        return load_now(device)  # the loader reports what is wrong with the source, as without this
    if not cpu or not identity.weights.is_file() or identity.model_cfg is None:  # a download, a GPU, a guess
        return load_now(device)
    if library is not None:
        identity = dataclasses.replace(identity, model_id=library_model_id(library, identity))
    return LazyBundle(identity, lambda: load_now("cpu"))


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
    library=None,
) -> ModelBundle:
    """Resolve ``source`` to a :class:`ModelBundle` with the model in eval mode on ``device``.

    ``precision``: ``fp32`` (default), ``bf16`` or ``fp16`` (weights cast; LayerNorm stays fp32).
    ``arch``: a named architecture or OpenCLIP JSON path, for a weights file instead of inferring it.
    ``quick_gelu``: override the activation for a weights file (OpenAI and inferred default: True).
    ``progress(bytes_done, total_or_None)`` is called while a pretrained checkpoint downloads.
    ``library``: the photo library the model is for; ``model_id`` is then the id that library knows
    it under (an older library may have recorded a weights-only id: :mod:`clipsearch.identity`).
    """
    if precision is None:
        precision = "fp32"
    if precision not in _PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; use one of {', '.join(_PRECISIONS)}")
    identity = identify(source, arch=arch, quick_gelu=quick_gelu)
    if library is not None:
        identity = dataclasses.replace(identity, model_id=library_model_id(library, identity))
    log.info("model %s is a %s", source, identity.kind)
    try:
        bundle = _LOADERS[identity.kind](identity, progress=progress, quick_gelu=quick_gelu)
    except OSError as e:  # e.g. weights the user may not read
        raise ModelLoadError(f"cannot read model {source}: {e.strerror or e}") from e
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


def _load_registered(identity: ModelIdentity, progress=None, **_) -> ModelBundle:
    path = fetch_pretrained(identity.source, progress=progress)
    model = _build_and_load(identity.model_cfg, read_state_dict(path), str(path))
    return _bundle(model, identity, _clip_tokenizer(identity.model_cfg))


def _load_model_dir(identity: ModelIdentity, **_) -> ModelBundle:
    from clipsearch.tokenizer import Tokenizer

    weights = identity.weights
    model = _build_and_load(identity.model_cfg, read_safetensors(weights), str(weights))
    try:
        tokenizer = Tokenizer.from_config(identity.tokenizer_cfg, weights.parent)
    except (TypeError, ValueError, KeyError, OSError) as e:
        raise ModelLoadError(f"{weights.parent / MODEL_JSON}: bad tokenizer config: {e}") from e
    return _bundle(model, identity, tokenizer)


def _load_hub_dir(identity: ModelIdentity, **_) -> ModelBundle:
    weights = identity.weights
    model = _build_and_load(identity.model_cfg, read_state_dict(weights), str(weights))
    return _bundle(model, identity, _clip_tokenizer(identity.model_cfg))


def _load_weights_file(identity: ModelIdentity, quick_gelu: bool | None = None, **_) -> ModelBundle:
    path = identity.weights
    state_dict = read_state_dict(path)
    cfg = identity.model_cfg
    if cfg is None:  # never loaded before: the weights' shapes say what they are
        cfg = _infer_config(state_dict, path)
        if quick_gelu is not None:
            cfg["quick_gelu"] = bool(quick_gelu)
    model = _build_and_load(cfg, state_dict, str(path))
    preprocess_cfg = identity.preprocess_cfg or preprocess_config(cfg, {})
    remember(identity, cfg, preprocess_cfg)
    identity = dataclasses.replace(
        identity, model_cfg=cfg, preprocess_cfg=preprocess_cfg, tokenizer_cfg=_clip_bpe_config(cfg)
    )
    return _bundle(model, identity, _clip_tokenizer(cfg))


_LOADERS = {
    "registered": _load_registered,
    "model-dir": _load_model_dir,
    "run-dir": _load_model_dir,
    "hub-dir": _load_hub_dir,
    "weights-file": _load_weights_file,
}


def _bundle(model, identity: ModelIdentity, tokenizer) -> ModelBundle:
    return ModelBundle(
        model, identity.preprocess_cfg, tokenizer, identity.model_id, identity.model_cfg, identity
    )


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


def _clip_tokenizer(cfg: dict):
    from clipsearch.tokenizer import Tokenizer

    return Tokenizer.from_config(_clip_bpe_config(cfg))


def _clip_bpe_config(cfg: dict) -> dict:
    return {"type": "clip-bpe", "context_length": int(cfg.get("text_cfg", {}).get("context_length", 77))}


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
