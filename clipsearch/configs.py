"""Named CLIP architectures (``clipsearch/configs/*.json``, the OpenCLIP JSON schema) and inference of
the architecture from OpenAI-layout weights."""

import copy
import json
from functools import cache
from pathlib import Path

from clipsearch.errors import ModelLoadError

_CONFIG_DIR = Path(__file__).parent / "configs"


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
