"""CLIP architectures: typed configs parsed from the OpenCLIP JSON schema, the named ones
(``clipsearch/configs/*.json``), and inference of the architecture from OpenAI-layout weights.

:class:`ModelConfig` (with :class:`VisionConfig` and :class:`TextConfig`) is what
:func:`clipsearch.model.build_model` builds from. :meth:`ModelConfig.from_dict` reads an OpenCLIP
JSON dict and refuses, by name, every option that would change the architecture away from OpenAI's
(clipsearch does not implement it); options that change nothing are accepted and dropped.
:meth:`ModelConfig.to_dict` gives the OpenCLIP schema back, which is what model files store.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from clipsearch.errors import ModelLoadError

_CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class VisionConfig:
    """The image tower: a ViT (``layers`` an int) or OpenAI's ModifiedResNet (4 stage depths)."""

    image_size: int  # side of the square input, pixels
    layers: int | tuple[int, int, int, int]  # ViT: transformer depth; ResNet: blocks per stage
    width: int  # ViT: token width; ResNet: stem width (the stages are 1, 2, 4, 8 times it, x4)
    patch_size: int | None = None  # ViT only: side of a patch, pixels
    head_width: int = 64  # attention head width; OpenAI's for every released model
    mlp_ratio: float = 4.0  # ViT MLP hidden width / token width

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)


@dataclass(frozen=True)
class TextConfig:
    """The text tower: a causal transformer over BPE tokens."""

    context_length: int  # tokens per text, start and end included
    vocab_size: int  # BPE ids: 49408 for OpenAI's vocabulary
    width: int  # token width
    heads: int  # attention heads
    layers: int  # transformer depth
    mlp_ratio: float = 4.0  # MLP hidden width / token width


@dataclass(frozen=True)
class ModelConfig:
    """A CLIP architecture in OpenAI's layout (so OpenAI/OpenCLIP weights load with ``strict=True``)."""

    embed_dim: int  # the shared embedding space both towers project into
    vision: VisionConfig
    text: TextConfig
    quick_gelu: bool = False  # OpenAI's activation x * sigmoid(1.702 x); OpenCLIP's default is GELU
    preprocess_cfg: dict | None = None  # the schema's optional pixel settings, kept as given (transform.py)

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        """Parse an OpenCLIP-schema dict; :class:`ModelLoadError` names what is missing or unsupported."""
        if isinstance(cfg, ModelConfig):
            return cfg
        if not isinstance(cfg, dict):
            raise ModelLoadError(
                f"model config must be a dict in the OpenCLIP schema, got {type(cfg).__name__}"
            )
        for prefix, keys in _REQUIRED.items():
            section = cfg.get(prefix.rstrip("."), {}) if prefix else cfg
            if not isinstance(section, dict):
                raise ModelLoadError(f"model config {prefix.rstrip('.')} must be an object, got {section!r}")
            missing = [prefix + key for key in keys if key not in section]
            if missing:
                raise ModelLoadError(
                    f"model config is missing {', '.join(missing)}; it needs the OpenCLIP schema"
                )
        vision_cfg, text_cfg = cfg["vision_cfg"], cfg["text_cfg"]
        _refuse_unsupported(cfg, _TOP_DEFAULTS, "")
        _refuse_unsupported(vision_cfg, _VISION_DEFAULTS, "vision_cfg.")
        _refuse_unsupported(text_cfg, _TEXT_DEFAULTS, "text_cfg.")
        layers = vision_cfg["layers"]
        if isinstance(layers, list | tuple):
            if len(layers) != 4:
                raise ModelLoadError(
                    f"a ResNet image tower needs 4 stage depths in vision_cfg.layers, got {layers}"
                )
            layers = tuple(int(n) for n in layers)
        elif not vision_cfg.get("patch_size"):
            raise ModelLoadError("a ViT image tower (integer vision_cfg.layers) needs vision_cfg.patch_size")
        image_size = vision_cfg["image_size"]
        if not isinstance(image_size, int) or isinstance(image_size, bool):
            raise ModelLoadError(
                f"vision_cfg.image_size must be one integer, got {vision_cfg['image_size']!r}"
            )
        try:
            vision = VisionConfig(
                image_size=image_size,
                layers=layers if isinstance(layers, tuple) else int(layers),
                width=int(vision_cfg["width"]),
                patch_size=int(vision_cfg["patch_size"]) if vision_cfg.get("patch_size") else None,
                head_width=int(vision_cfg.get("head_width", 64)),
                mlp_ratio=float(vision_cfg.get("mlp_ratio", 4.0)),
            )
            text = TextConfig(
                context_length=int(text_cfg["context_length"]),
                vocab_size=int(text_cfg["vocab_size"]),
                width=int(text_cfg["width"]),
                heads=int(text_cfg["heads"]),
                layers=int(text_cfg["layers"]),
                mlp_ratio=float(text_cfg.get("mlp_ratio", 4.0)),
            )
            pp = cfg.get("preprocess_cfg")
            return cls(
                int(cfg["embed_dim"]),
                vision,
                text,
                bool(cfg.get("quick_gelu", False)),
                copy.deepcopy(pp) if isinstance(pp, dict) else None,
            )
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"model config has a value of the wrong type: {e}") from e

    def to_dict(self) -> dict:
        """The OpenCLIP-schema dict of this config (what model files record)."""
        v, t = self.vision, self.text
        vision = {
            "image_size": v.image_size,
            "layers": list(v.layers) if v.is_resnet else v.layers,
            "width": v.width,
        }
        vision["patch_size"] = v.patch_size
        if v.head_width != 64:
            vision["head_width"] = v.head_width
        if v.mlp_ratio != 4.0:
            vision["mlp_ratio"] = v.mlp_ratio
        text = {
            "context_length": t.context_length,
            "vocab_size": t.vocab_size,
            "width": t.width,
            "heads": t.heads,
            "layers": t.layers,
        }
        if t.mlp_ratio != 4.0:
            text["mlp_ratio"] = t.mlp_ratio
        out = {
            "embed_dim": self.embed_dim,
            "quick_gelu": self.quick_gelu,
            "vision_cfg": vision,
            "text_cfg": text,
        }
        if self.preprocess_cfg is not None:
            out["preprocess_cfg"] = copy.deepcopy(self.preprocess_cfg)
        return out


# Options of the OpenCLIP schema that we accept only at their default (architecture-neutral) value.
_VISION_DEFAULTS = {
    "ls_init_value": None,
    "patch_dropout": 0.0,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "timm_model_name": None,
}
_TEXT_DEFAULTS = {
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "hf_model_name": None,
}
_TOP_DEFAULTS = {"custom_text": False, "init_logit_bias": None}

_REQUIRED = {
    "": ("embed_dim", "vision_cfg", "text_cfg"),
    "vision_cfg.": ("image_size", "layers", "width"),
    "text_cfg.": ("context_length", "vocab_size", "width", "heads", "layers"),
}


def _refuse_unsupported(section: dict, defaults: dict, where: str) -> None:
    for key, default in defaults.items():
        if key in section and section[key] != default:
            raise ModelLoadError(
                f"model config sets {where}{key}={section[key]!r}, which clipsearch's CLIP does not "
                f"implement (only {default!r}); use a config in OpenAI's CLIP architecture"
            )


@cache
def _named_configs() -> dict[str, dict]:
    configs = {}
    for path in sorted(_CONFIG_DIR.glob("*.json")):
        configs[path.stem] = _read_config(path)
    return configs


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"model config {path} must hold a JSON object, not {type(cfg).__name__}")
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in cfg]
    if missing or not isinstance(cfg.get("vision_cfg"), dict) or not isinstance(cfg.get("text_cfg"), dict):
        raise ModelLoadError(
            f"model config {path} is not in the OpenCLIP schema: it needs embed_dim and the objects "
            f"vision_cfg and text_cfg (missing: {', '.join(missing) or 'none; wrong types'})"
        )
    return cfg


def list_configs() -> list[str]:
    """Names of the bundled architectures, sorted."""
    return sorted(_named_configs(), key=str.lower)


def get_config(name_or_path: str | Path) -> dict:
    """A deep copy of a named architecture's config, or of the config in a JSON file at that path.

    Raises ``ModelLoadError`` for an unknown name (listing the known ones) or an unreadable or
    malformed file.
    """
    configs = _named_configs()
    if isinstance(name_or_path, str) and name_or_path in configs:
        return copy.deepcopy(configs[name_or_path])
    path = Path(name_or_path)
    if path.suffix.lower() == ".json" or path.is_file():
        if not path.is_file():
            raise ModelLoadError(f"model config file {path} does not exist")
        return _read_config(path)
    raise ModelLoadError(
        f"unknown model config {str(name_or_path)!r}; known: {', '.join(list_configs())} "
        "(or give the path to an OpenCLIP-schema JSON file)"
    )


def _require(sd: dict, key: str):
    if key not in sd:
        raise ModelLoadError(
            f"weights are not an OpenAI-layout CLIP state dict: key {key!r} is missing "
            "(strip any 'module.' or 'state_dict' wrapping first)"
        )
    return sd[key]


def config_from_openai_state_dict(sd: dict) -> dict:
    """Infer the OpenCLIP-schema config from OpenAI-layout CLIP weights, as OpenAI's ``build_model`` does.

    A ``visual.proj`` key means a ViT image tower; otherwise a ResNet with attention pooling. Attention
    heads are not visible in weight shapes: like OpenAI we assume 64-wide heads in both towers, which
    holds for every released model. ``quick_gelu`` is True, the activation OpenAI's weights use.
    """
    if "visual.proj" in sd:
        conv1 = _require(sd, "visual.conv1.weight")  # [width, 3, patch, patch]
        width, patch = conv1.shape[0], conv1.shape[-1]
        layers = len(
            {
                k
                for k in sd
                if k.startswith("visual.transformer.resblocks.") and k.endswith(".attn.in_proj_weight")
            }
        )
        grid = round((_require(sd, "visual.positional_embedding").shape[0] - 1) ** 0.5)
        vision_cfg = {"image_size": patch * grid, "layers": layers, "width": width, "patch_size": patch}
        mlp = _require(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]
        if mlp != 4 * width:
            vision_cfg["mlp_ratio"] = mlp / width
    else:
        stages = [
            len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{i}.")}) for i in (1, 2, 3, 4)
        ]
        if not all(stages):
            raise ModelLoadError(
                f"weights are not an OpenAI-layout CLIP state dict: no ViT 'visual.proj' and ResNet "
                f"stages have {stages} blocks"
            )
        width = _require(sd, "visual.layer1.0.conv1.weight").shape[0]
        grid = round((_require(sd, "visual.attnpool.positional_embedding").shape[0] - 1) ** 0.5)
        vision_cfg = {"image_size": grid * 32, "layers": stages, "width": width, "patch_size": None}

    text_width = _require(sd, "ln_final.weight").shape[0]
    text_cfg = {
        "context_length": _require(sd, "positional_embedding").shape[0],
        "vocab_size": _require(sd, "token_embedding.weight").shape[0],
        "width": text_width,
        "heads": text_width // 64,
        "layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    }
    text_mlp = _require(sd, "transformer.resblocks.0.mlp.c_fc.weight").shape[0]
    if text_mlp != 4 * text_width:
        text_cfg["mlp_ratio"] = text_mlp / text_width
    return {
        "embed_dim": _require(sd, "text_projection").shape[1],
        "quick_gelu": True,
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }
