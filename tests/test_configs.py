"""Named architecture configs against open_clip's own JSON files, config loading and its errors, and
architecture inference from OpenAI-layout weights."""

import json
from pathlib import Path

import open_clip
import pytest
import torch

from clipsearch.configs import config_from_openai_state_dict, get_config, list_configs
from clipsearch.errors import ModelLoadError
from clipsearch.model import build_model

OPEN_CLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"
RELEASED = [
    "RN50",
    "RN101",
    "RN50x4",
    "RN50x16",
    "RN50x64",
    "ViT-B-32",
    "ViT-B-16",
    "ViT-L-14",
    "ViT-L-14-336",
]
NAMED = RELEASED + [f"{n}-quickgelu" for n in RELEASED]


def test_list_configs_has_every_released_size_and_the_tiny_ones():
    names = list_configs()
    assert set(NAMED + ["tiny-vit", "tiny-rn"]) <= set(names)
    assert names == sorted(names, key=str.lower)


@pytest.mark.parametrize("name", NAMED)
def test_named_configs_equal_open_clip(name):
    theirs = json.loads((OPEN_CLIP_CONFIGS / f"{name}.json").read_text())
    assert get_config(name) == theirs


def test_tiny_configs_are_small_and_buildable():
    vit, rn = get_config("tiny-vit"), get_config("tiny-rn")
    assert vit["vision_cfg"] == {
        "image_size": 64,
        "layers": 2,
        "width": 64,
        "patch_size": 16,
        "head_width": 32,
    }
    assert rn["vision_cfg"]["layers"] == [1, 1, 1, 1] and rn["vision_cfg"]["width"] == 16
    for cfg in (vit, rn):
        assert cfg["text_cfg"] == {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 4,
            "layers": 2,
        }
        model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) < 5_000_000  # mostly the token embedding


def test_get_config_returns_a_deep_copy():
    cfg = get_config("RN50")
    cfg["vision_cfg"]["layers"][0] = 99
    cfg["embed_dim"] = 1
    assert get_config("RN50")["vision_cfg"]["layers"] == [3, 4, 6, 3]
    assert get_config("RN50")["embed_dim"] == 1024


def test_get_config_reads_a_json_path(tmp_path):
    cfg = get_config("tiny-vit") | {
        "quick_gelu": True,
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3},
    }
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(cfg))
    assert get_config(str(path)) == cfg
    assert get_config(path) == cfg
    model = build_model(get_config(path))
    assert model.config["preprocess_cfg"]["mean"] == [0.5] * 3


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ModelLoadError) as info:
        get_config("ViT-Z-99")
    message = str(info.value)
    assert "ViT-Z-99" in message and "ViT-B-32" in message and "tiny-rn" in message


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "JSON object"),
        ('{"embed_dim": 8, "vision_cfg": {}}', "text_cfg"),
        ('{"embed_dim": 8, "vision_cfg": [], "text_cfg": {}}', "OpenCLIP schema"),
    ],
)
def test_malformed_files_raise_model_load_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ModelLoadError, match=message):
        get_config(path)


def test_missing_json_file_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        get_config(tmp_path / "absent.json")


def _meta_state_dict(name: str) -> dict:
    """open_clip's state dict for a named model, shapes only (the meta device allocates nothing)."""
    with torch.device("meta"):
        return open_clip.create_model(name, pretrained=None, device="meta").state_dict()


@pytest.mark.parametrize("name", RELEASED)
def test_config_inferred_from_openai_layout_weights(name):
    """OpenAI's weights always use QuickGELU, so the inferred config is the -quickgelu one."""
    sd = _meta_state_dict(name)
    assert config_from_openai_state_dict(sd) == get_config(f"{name}-quickgelu")


def test_inference_reads_a_nonstandard_size():
    cfg = get_config("ViT-B-16")
    cfg["vision_cfg"]["image_size"] = 256
    with torch.device("meta"):
        sd = build_model(cfg).state_dict()
    inferred = config_from_openai_state_dict(sd)
    assert inferred["vision_cfg"]["image_size"] == 256 and inferred["quick_gelu"] is True
    mlp = get_config("tiny-rn")
    mlp["text_cfg"]["mlp_ratio"] = 2.0
    with torch.device("meta"):
        sd = build_model(mlp).state_dict()
    inferred = config_from_openai_state_dict(sd)
    assert inferred["text_cfg"]["mlp_ratio"] == 2.0
    assert inferred["vision_cfg"] == {
        "image_size": 64,
        "layers": [1, 1, 1, 1],
        "width": 16,
        "patch_size": None,
    }


def test_inference_tolerates_torchscript_extras_and_rejects_other_weights():
    sd = dict(_meta_state_dict("RN50"))
    sd.update(
        input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408)
    )
    assert config_from_openai_state_dict(sd) == get_config("RN50-quickgelu")
    with pytest.raises(ModelLoadError, match="not an OpenAI-layout"):
        config_from_openai_state_dict({"module.visual.proj": torch.zeros(2, 2)})
    with pytest.raises(ModelLoadError, match="not an OpenAI-layout"):
        config_from_openai_state_dict({"visual.proj": torch.zeros(2, 2)})


# --------------------------------------------------------------------------------------------------
# Typed configs


def test_every_named_config_parses_to_a_typed_config_and_back():
    from clipsearch.configs import ModelConfig

    for name in list_configs():
        raw = get_config(name)
        cfg = ModelConfig.from_dict(raw)
        assert cfg.embed_dim == raw["embed_dim"]
        assert cfg.vision.image_size == raw["vision_cfg"]["image_size"]
        assert cfg.vision.is_resnet == isinstance(raw["vision_cfg"]["layers"], list)
        assert cfg.text.context_length == raw["text_cfg"]["context_length"]
        assert cfg.quick_gelu == raw.get("quick_gelu", False)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "where, key, value",
    [
        ("vision_cfg", "attentional_pool", True),
        ("vision_cfg", "pool_type", "avg"),
        ("text_cfg", "hf_model_name", "roberta-base"),
        ("", "custom_text", True),
    ],
)
def test_unsupported_options_are_refused_by_name(where, key, value):
    from clipsearch.configs import ModelConfig
    from clipsearch.errors import ModelLoadError

    raw = get_config("tiny-vit")
    (raw[where] if where else raw)[key] = value
    name = f"{where}.{key}" if where else key
    with pytest.raises(ModelLoadError, match=f"sets {name}="):
        ModelConfig.from_dict(raw)


def test_options_at_their_default_are_accepted_and_dropped():
    from clipsearch.configs import ModelConfig

    raw = get_config("tiny-vit")
    raw["vision_cfg"]["attentional_pool"] = False  # as OpenCLIP's own JSON files spell it out
    assert ModelConfig.from_dict(raw) == ModelConfig.from_dict(get_config("tiny-vit"))
    assert "attentional_pool" not in ModelConfig.from_dict(raw).to_dict()["vision_cfg"]
