"""PNGs decoded by libvips (``clipsearch.pngvips``) give Pillow's pixels exactly, and what libvips
does not take, or fails on, is decoded and judged by Pillow as before.

The reference is ``open_image`` with libvips switched off: Pillow's decoder and the same
conversions. Files are written by Pillow, by libvips itself (interlaced) and by hand (16 bits).
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
from PIL import Image
from test_decode_scaled import _alpha, _photo, png_bytes, reference

from clipsearch import pngvips
from clipsearch.errors import ImageDecodeError
from clipsearch.imageio import COVERS_KEY, open_image

if not pngvips.available():
    if os.environ.get("CI"):
        raise RuntimeError("pyvips with libvips (pip install 'pyvips[binary]') is required under CI")
    pytest.skip("pyvips/libvips is not installed: PNGs decode with Pillow", allow_module_level=True)

SIZE = (901, 602)  # odd sizes: the last reduced pixel is partial


def _write(path, kind: str, seed: int = 1):
    rgb = Image.fromarray(_photo(seed, SIZE))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(_alpha(seed, SIZE)))
    if kind == "rgb":
        rgb.save(path)
    elif kind == "rgba":
        rgba.save(path)
    elif kind == "l":
        rgb.convert("L").save(path)
    elif kind == "la":
        rgba.convert("LA").save(path)
    elif kind == "interlaced":  # Adam7, as libvips writes it
        import pyvips

        pyvips.Image.new_from_array(np.asarray(rgb)).pngsave(str(path), interlace=True)
    elif kind == "turned":  # EXIF orientation 8 in an eXIf chunk
        exif = Image.Exif()
        exif[0x0112] = 8
        rgb.save(path, exif=exif.tobytes())
    elif kind == "palette":
        rgb.quantize(200).save(path)
    elif kind == "colour-key":  # tRNS on an RGB image: one colour is transparent
        rgb.save(path, transparency=tuple(int(v) for v in np.asarray(rgb)[0, 0]))
    elif kind == "16":
        path.write_bytes(png_bytes((_photo(seed, SIZE).astype(np.uint16) * 257).astype(">u2"), 16, 2))
    else:
        raise ValueError(kind)
    return path


TAKEN = ["rgb", "rgba", "l", "la", "interlaced", "turned"]
LEFT_TO_PILLOW = ["palette", "colour-key", "16"]


@pytest.mark.parametrize("draft", [None, 224])
@pytest.mark.parametrize("kind", TAKEN)
def test_libvips_gives_pillows_pixels(tmp_path, kind, draft):
    path = _write(tmp_path / f"{kind}.png", kind)
    calls = []
    real = pngvips.decode

    def spy(data, im, shrink=1):
        calls.append(out := real(data, im, shrink))
        return out

    with mock.patch.object(pngvips, "decode", spy):
        got = open_image(path, draft_size=draft)
    assert len(calls) == 1 and calls[0] is not None  # libvips decoded it
    want = reference(path) if draft is None else _reduced_by_pillow(path, draft)
    assert got.size == want.size and got.mode == want.mode == "RGB"
    assert got.info.get(COVERS_KEY) == want.info.get(COVERS_KEY)  # the same geometry for the transform
    if draft is None:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:
        # libvips averaged (and flattened) while decoding, Pillow after: the same values up to the
        # rounding of each step, a level or two here and there (edges of the transparent corner).
        diff = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
        assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 2, (diff.mean(), diff.max())
    if kind == "turned":
        assert got.size == SIZE[::-1] if draft is None else got.size[0] < got.size[1]


def _reduced_by_pillow(path, draft):
    with mock.patch.object(pngvips, "decode", lambda data, im, shrink=1: None):
        return open_image(path, draft_size=draft)


@pytest.mark.parametrize("kind", LEFT_TO_PILLOW)
def test_layouts_libvips_would_convert_differently_stay_with_pillow(tmp_path, kind):
    path = _write(tmp_path / f"{kind}.png", kind)
    with Image.open(path) as im:
        assert not pngvips.takes(im)
    np.testing.assert_array_equal(np.asarray(open_image(path)), np.asarray(reference(path)))


def test_small_pngs_stay_with_pillow(tmp_path):
    """Below MIN_PIXELS libvips' fixed cost per file is more than Pillow's whole decode."""
    path = tmp_path / "small.png"
    Image.fromarray(_photo(2, (64, 64))).save(path)
    with Image.open(path) as im:
        assert not pngvips.takes(im)
    with mock.patch.object(pngvips, "decode", side_effect=AssertionError("libvips was asked")):
        got = open_image(path)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(reference(path)))
    assert SIZE[0] * SIZE[1] >= pngvips.MIN_PIXELS  # the other tests' images are libvips'


def test_a_truncated_png_is_still_reported_as_truncated(tmp_path):
    """libvips would fill a cut-off PNG with grey; it must give the file back to Pillow instead."""
    path = _write(tmp_path / "cut.png", "rgb")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageDecodeError) as e:
        open_image(path, draft_size=224)
    assert e.value.reason == "truncated"


def test_without_libvips_pngs_decode_with_pillow(tmp_path, monkeypatch):
    path = _write(tmp_path / "rgb.png", "rgb")
    want = np.asarray(open_image(path))
    monkeypatch.setattr(pngvips, "_pyvips", lambda: None)
    assert not pngvips.available()
    np.testing.assert_array_equal(np.asarray(open_image(path)), want)
