"""Preprocessing against OpenCLIP's transforms and OpenAI's definition, to the last bit."""

import itertools
import json
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from clipsearch.transform import (
    OPENAI_MEAN,
    OPENAI_STD,
    PreprocessConfig,
    TrainTransform,
    image_transform,
)

SIZES = [(333, 517), (517, 333), (1, 1), (4000, 30), (30, 4000), (224, 224), (225, 224), (31, 30)]
MODES = ["RGB", "L", "RGBA", "P"]


def _image(w, h, mode, seed=0):
    rng = np.random.default_rng(seed + w * 7 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _openai_eval(n_px):
    """OpenAI's ``clip.clip._transform``, written out from its definition."""
    return Compose(
        [
            Resize(n_px, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(n_px),
            lambda im: im.convert("RGB"),
            ToTensor(),
            Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )


@pytest.mark.parametrize("size,sizes", [(224, SIZES[:3] + SIZES[5:]), (32, SIZES)])
def test_eval_equals_openai_and_open_clip_exactly(size, sizes):
    # (4000 x 30 at 224 would be a 29,866-pixel-wide resize: slow, and no different at 32)
    ours = image_transform(PreprocessConfig(size))
    reference = open_clip.image_transform(size, is_train=False)
    openai = _openai_eval(size)
    for w, h in sizes:
        for mode in MODES:
            im = _image(w, h, mode)
            out = ours(im)
            assert out.shape == (3, size, size) and out.dtype == torch.float32
            assert torch.equal(out, reference(im)), (w, h, mode)
            assert torch.equal(out, openai(im)), (w, h, mode)


@pytest.mark.parametrize("resize_mode", ["longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_other_modes_equal_open_clip(resize_mode, interpolation):
    cfg = PreprocessConfig(48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation=interpolation)
    cfg = PreprocessConfig(**{**cfg.to_dict(), "resize_mode": resize_mode})
    ours = image_transform(cfg)
    reference = open_clip.image_transform(
        48, is_train=False, mean=cfg.mean, std=cfg.std, resize_mode=resize_mode, interpolation=interpolation
    )
    for w, h in [(333, 517), (1, 1), (100, 30), (48, 48)]:
        for mode in MODES:
            im = _image(w, h, mode)
            assert torch.equal(ours(im), reference(im)), (w, h, mode)


def test_longest_mode_survives_extreme_aspect():
    # OpenCLIP fails here (a 0-pixel side); we keep one pixel row and pad
    out = image_transform(PreprocessConfig(32, resize_mode="longest"))(_image(4000, 30, "RGB"))
    assert out.shape == (3, 32, 32)


def test_known_pixel_values():
    # a uniform image: every output pixel is (value/255 - mean) / std, computed by hand
    im = Image.new("RGB", (50, 80), (255, 0, 128))
    out = image_transform(PreprocessConfig(16))(im)
    expected = [(1.0 - OPENAI_MEAN[0]) / OPENAI_STD[0], -OPENAI_MEAN[1] / OPENAI_STD[1]]
    expected.append((128 / 255 - OPENAI_MEAN[2]) / OPENAI_STD[2])
    for c in range(3):
        assert torch.allclose(out[c], torch.full((16, 16), expected[c]), atol=1e-6)


def test_train_transform_equals_open_clip_with_the_same_seed():
    im = _image(300, 300, "RGB")
    ours = image_transform(PreprocessConfig(64), train=True)
    reference = open_clip.image_transform(64, is_train=True)
    outs = []
    for seed in range(5):
        torch.manual_seed(seed)
        a = ours(im)
        torch.manual_seed(seed)
        assert torch.equal(a, reference(im))
        outs.append(a)
    assert a.shape == (3, 64, 64)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # a random crop, not the centre one


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_train_crop_equals_torchvision_random_resized_crop(interpolation):
    # the tall and wide strips exhaust the ten tries and take the centre fallback; 1 x 1 and 3 x 2 the
    # smallest crops; RGBA and P crop in their own mode first, as torchvision's PIL path does
    from torchvision.transforms import RandomResizedCrop

    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    ours = TrainTransform(PreprocessConfig(24, interpolation=interpolation), scale=(0.08, 1.0))
    reference = Compose(
        [
            RandomResizedCrop(24, scale=(0.08, 1.0), interpolation=mode),
            lambda im: im.convert("RGB"),
            ToTensor(),
            Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )
    sizes = [(300, 200), (201, 333), (1000, 41), (41, 1000), (1, 1), (3, 2), (64, 64)]
    for (w, h), im_mode in itertools.product(sizes, ["RGB", "RGBA", "P"]):
        im = _image(w, h, im_mode)
        for seed in range(4):
            torch.manual_seed(seed)
            a = ours(im)
            after_ours = torch.get_rng_state()
            torch.manual_seed(seed)
            assert torch.equal(a, reference(im)), ((w, h), im_mode, seed)
            assert torch.equal(after_ours, torch.get_rng_state())  # the same draws, no more, no fewer


def test_train_crop_keeps_most_of_the_image():
    # left half black, right half white: a crop of >= 90% of the area keeps both halves
    arr = np.zeros((200, 200, 3), dtype=np.uint8)
    arr[:, 100:] = 255
    t = image_transform(PreprocessConfig(32, mean=(0, 0, 0), std=(1, 1, 1)), train=True)
    for seed in range(20):
        torch.manual_seed(seed)
        out = t(Image.fromarray(arr))
        assert 0.35 < out.mean().item() < 0.65
        assert out[:, :, 0].max() < 0.1 and out[:, :, -1].min() > 0.9


def test_train_converts_modes_to_rgb():
    t = image_transform(PreprocessConfig(16), train=True)
    for mode in MODES:
        assert t(_image(40, 30, mode)).shape == (3, 16, 16)


def test_config_round_trip_and_json():
    cfg = PreprocessConfig(336, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), interpolation="bilinear")
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["mean"] == [0.5, 0.4, 0.3] and d["resize_mode"] == "shortest"
    assert PreprocessConfig.from_dict(d) == cfg
    assert PreprocessConfig(224).mean == OPENAI_MEAN and PreprocessConfig(224).std == OPENAI_STD
    assert PreprocessConfig(image_size=224, mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)
    assert isinstance(image_transform(d)(_image(20, 20, "RGB")), torch.Tensor)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 0},
        {"image_size": 22.5},
        {"image_size": True},
        {"image_size": 224, "mean": (0.5, 0.5)},
        {"image_size": 224, "std": (0.5, 0.0, 0.5)},
        {"image_size": 224, "interpolation": "lanczos"},
        {"image_size": 224, "resize_mode": "crop"},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        PreprocessConfig(**kwargs)


def test_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict({"image_size": 224, "fill_color": 0})
    with pytest.raises(ValueError, match="image_size"):
        PreprocessConfig.from_dict({"mean": [0, 0, 0]})


@pytest.mark.parametrize("train", [False, True])
def test_transforms_do_not_import_torchvision(train):
    code = (
        "import sys; from PIL import Image; from clipsearch.transform import PreprocessConfig, image_transform;"
        f"image_transform(PreprocessConfig(8), train={train})(Image.new('RGB', (9, 9)));"
        "assert 'torchvision' not in sys.modules, 'torchvision imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
