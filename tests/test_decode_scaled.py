"""Every reduced-size decode path against the full decode it replaces (the reference pipeline).

``open_image(path, draft_size=S)`` decodes JPEG at a DCT scale, WebP through libwebp's scaler
(``clipsearch.webpscale``), and box-reduces every other format right after decoding. The reference
is what clipsearch did before: a full decode, then the model's eval transform. Both are compared on
pixels (after the transform) and on embeddings (what the indexer stores against fp32
``encode_image`` of full decodes), on real files written by Pillow and libheif, with a mismatched
pairing that shows each check can fail.
"""

from __future__ import annotations

import importlib.util
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch import backends, pngvips, webpscale
from clipsearch.backends import MIN_COSINE
from clipsearch.checkpoints import ModelBundle
from clipsearch.configs import get_config
from clipsearch.imageio import FULL_SIZE_KEY, open_image, reduce_to_cover
from clipsearch.indexer import index_paths
from clipsearch.metadata import read_metadata
from clipsearch.model import build_model
from clipsearch.store import Library
from clipsearch.transform import PreprocessConfig, image_transform

W, H = 1200, 800  # big enough that a 224 px model reduces by 3, the 64 px test model by 12


def _photo(seed: int, size=(W, H)) -> np.ndarray:
    """A photo-like ``[H, W, 3]`` uint8 image with grain (so lossy codecs keep some detail)."""
    w, h = size
    rng = np.random.default_rng(seed)
    small = Image.fromarray(backends.synthetic_photo(rng, w // 4, h // 4)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(small, np.int16) + rng.integers(-5, 6, (h, w, 3), dtype=np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _alpha(seed: int, size=(W, H)) -> np.ndarray:
    """An alpha channel with a soft vignette, a fully transparent hole and an opaque band."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((xx - w / 2) / w, (yy - h / 2) / h)
    a = np.clip(1.3 - 1.6 * r, 0, 1) * 255
    a[h // 5 : h // 3, w // 5 : w // 3] = 0
    a[:, (seed * 97) % (w // 2) : (seed * 97) % (w // 2) + w // 8] = 255
    return a.astype(np.uint8)


def _heif_available() -> bool:
    return importlib.util.find_spec("pillow_heif") is not None


def write(path, kind: str, seed: int, size=(W, H)):
    """Write a photo as ``kind``: jpg, png, rgba.png, p.png (palette + transparent index), webp,
    rgba.webp, lossless.webp, heic, tiff."""
    rgb = Image.fromarray(_photo(seed, size))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(_alpha(seed, size)))
    if kind == "jpg":
        rgb.save(path, "JPEG", quality=90)
    elif kind == "png":
        rgb.save(path, "PNG")
    elif kind == "rgba.png":
        rgba.save(path, "PNG")
    elif kind == "p.png":
        pal = rgb.quantize(255)
        pixels = np.asarray(pal).copy()
        pixels[_alpha(seed, size) == 0] = 255  # index 255: the transparent colour
        out = Image.fromarray(pixels, "P")
        out.putpalette(pal.getpalette()[: 255 * 3] + [0, 255, 0])
        out.save(path, "PNG", transparency=255)
    elif kind == "webp":
        rgb.save(path, "WEBP", quality=90)
    elif kind == "rgba.webp":
        rgba.save(path, "WEBP", quality=90)
    elif kind == "lossless.webp":
        rgb.save(path, "WEBP", lossless=True)
    elif kind == "heic":
        import pillow_heif

        pillow_heif.register_heif_opener()
        rgb.save(path, "HEIF", quality=90)
    elif kind == "tiff":
        rgb.save(path, "TIFF")
    elif kind == "l.png":
        rgb.convert("L").save(path, "PNG")
    elif kind == "la.png":
        rgba.convert("LA").save(path, "PNG")
    elif kind == "16.png":  # 16 bits per sample, RGB: Pillow cannot write these, so by hand
        low = (np.arange(size[0], dtype=np.uint16) % 256)[None, :, None]  # a low byte Pillow drops
        wide = (_photo(seed, size).astype(np.uint16) * 256 + low).astype(">u2")
        path.write_bytes(png_bytes(wide, bit_depth=16, colour_type=2))
    elif kind == "i16.png":  # 16-bit greyscale (a scan, an astronomy frame)
        grey = np.asarray(rgb.convert("L"), np.uint16) * 257
        Image.fromarray(grey).save(path, "PNG")
    elif kind == "l.jpg":
        rgb.convert("L").save(path, "JPEG", quality=90)
    elif kind == "cmyk.jpg":  # print workflows; Adobe's inverted CMYK as Photoshop writes it
        rgb.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "o6.jpg":  # a phone photo stored sideways with EXIF orientation 6
        exif = Image.Exif()
        exif[0x0112] = 6
        rgb.save(path, "JPEG", quality=90, exif=exif.tobytes())
    else:
        raise ValueError(kind)
    return path


def png_bytes(pixels: np.ndarray, bit_depth: int, colour_type: int) -> bytes:
    """A PNG of ``pixels`` ``[H, W, C]`` (big-endian samples), each row unfiltered."""
    import struct
    import zlib

    h, w = pixels.shape[:2]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\0" + row.tobytes() for row in pixels.reshape(h, -1))
    header = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


KINDS = ["jpg", "png", "rgba.png", "p.png", "webp", "rgba.webp", "lossless.webp", "heic", "tiff"]
KINDS += ["l.png", "la.png", "16.png", "i16.png", "l.jpg", "cmyk.jpg", "o6.jpg"]
TURNED = {"o6.jpg"}  # stored landscape, upright portrait


def reference(path):
    """The reference decode: the whole picture, by Pillow alone (no libvips, no reduced scale)."""
    with mock.patch.object(pngvips, "decode", lambda data, im, shrink=1: None):
        return open_image(path)


def _need(kind):
    if kind == "heic" and not _heif_available():
        pytest.skip("pillow-heif is not installed")
    if kind.endswith("webp") and not webpscale.available():
        pytest.skip("no libwebp 1.x found: WebP decodes at full size through Pillow")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


# --- pixels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_reduced_decode_gives_the_full_decodes_pixels(tmp_path, kind):
    _need(kind)
    path = write(tmp_path / f"photo.{kind}", kind, seed=1)
    t = image_transform(PreprocessConfig(224))
    reduced = open_image(path, draft_size=224)
    # the reduced path was taken: shorter side 800 -> 266 (800 // 224 = 3; JPEG: 1/2 scale, 400),
    # except for 16-bit grey, left at full size for its own conversion (reduce_to_cover)
    assert 224 <= min(reduced.size) < 2 * 224 or kind == "i16.png", reduced.size
    assert reduced.mode == "RGB" and reduced.info[FULL_SIZE_KEY] == ((H, W) if kind in TURNED else (W, H))
    full, small = t(reference(path)), t(reduced)
    assert full.shape == small.shape == (3, 224, 224)
    # normalised units (one 8-bit level is ~0.015): the per-pixel grain averages a little differently
    assert (full - small).abs().mean().item() < 0.05
    assert _cosine(full, small) > 0.999
    # and not trivially: another photo in the same format is far away
    other = t(open_image(write(tmp_path / f"other.{kind}", kind, seed=2), draft_size=224))
    assert _cosine(full, other) < 0.99


def test_transparent_pixels_come_out_white_after_reduction(tmp_path):
    """Premultiplied reduction: a hole in the alpha is white, not the colour hidden under it."""
    rgba = np.zeros((600, 900, 4), np.uint8)
    rgba[..., 0] = 255  # pure red under the alpha...
    rgba[:, 450:, 3] = 255  # ...visible on the right half only
    for ext in ("png", "webp"):
        if ext == "webp" and not webpscale.available():
            continue
        path = tmp_path / f"half.{ext}"
        Image.fromarray(rgba, "RGBA").save(path, lossless=True) if ext == "webp" else Image.fromarray(
            rgba, "RGBA"
        ).save(path)
        im = np.asarray(open_image(path, draft_size=100))  # reduced by 6: 150 x 100
        assert im.shape == (100, 150, 3)
        np.testing.assert_array_equal(im[:, :70], 255)  # transparent: white, no red bleeding in
        np.testing.assert_array_equal(im[:, 80:], [255, 0, 0] * np.ones((100, 70, 1), np.uint8))


@pytest.mark.parametrize("kind", ["png", "webp"])
def test_orientation_and_date_survive_the_reduction(tmp_path, kind):
    _need(kind)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    exif.get_ifd(0x8769)[0x9003] = "2022:03:04 05:06:07"
    path = tmp_path / f"turned.{kind}"
    Image.fromarray(_photo(3)).save(path, exif=exif.tobytes(), **({"quality": 90} if kind == "webp" else {}))
    im = open_image(path, draft_size=224)
    assert im.size == (267, 400)  # reduced by 3, then turned upright
    meta = read_metadata(path)
    assert (meta.width, meta.height, meta.taken_at) == (H, W, "2022-03-04T05:06:07")
    assert im.info[FULL_SIZE_KEY] == (meta.width, meta.height)  # what the transform crops by
    full = open_image(path)
    t = image_transform(PreprocessConfig(224))
    assert _cosine(t(full), t(im)) > 0.999


@pytest.mark.parametrize("kind", ["jpg", "png", "webp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_keeps_the_full_decodes_geometry(tmp_path, kind, orientation):
    """The reduced image's box is turned with it: a wrong turn shifts the crop by pixels."""
    _need(kind)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.{kind}"
    size = (1203, 805)  # not divisible by the factor: the last reduced pixel is partial
    Image.fromarray(_photo(orientation, size)).save(
        path, exif=exif.tobytes(), **({"quality": 92} if kind != "png" else {})
    )
    t = image_transform(PreprocessConfig(224))
    reduced = open_image(path, draft_size=224)
    full = open_image(path)
    assert reduced.size != full.size
    assert _cosine(t(full), t(reduced)) > 0.9995


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_every_resize_mode_keeps_the_full_decodes_geometry(tmp_path, mode):
    path = write(tmp_path / "photo.png", "png", seed=8, size=(1203, 805))
    t = image_transform(PreprocessConfig(224, resize_mode=mode))
    assert _cosine(t(open_image(path)), t(open_image(path, draft_size=224))) > 0.9995


def test_small_images_and_deep_modes_are_left_as_they_are():
    small = Image.new("RGB", (400, 300))
    assert reduce_to_cover(small, 224) is small  # 300 // 224 = 1: nothing to gain
    deep = Image.new("I;16", (2000, 1500))
    assert reduce_to_cover(deep, 224) is deep  # 16-bit: its own conversion scales it later
    assert reduce_to_cover(Image.new("L", (2000, 1500)), 224).size == (334, 250)


def test_animated_webp_falls_back_to_pillows_first_frame(tmp_path):
    if not webpscale.available():
        pytest.skip("no libwebp 1.x found")
    frames = [Image.fromarray(_photo(s)) for s in (4, 5)]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, quality=90)
    assert webpscale.decode_scaled(path.read_bytes(), 224) is None  # libwebp's still decoder refuses
    im = open_image(path, draft_size=224)
    t = image_transform(PreprocessConfig(224))
    assert _cosine(t(im), t(frames[0])) > 0.999


def test_without_libwebp_webp_decodes_through_pillow(tmp_path, monkeypatch):
    path = write(tmp_path / "photo.webp", "webp", seed=6)
    monkeypatch.setattr(webpscale, "_library", lambda: None)
    im = open_image(path, draft_size=224)
    assert im.size == (400, 267)  # decoded in full by Pillow, then box-reduced by 3
    assert not webpscale.available()


def test_a_broken_webp_is_reported_by_pillow_not_crashed_on(tmp_path):
    path = write(tmp_path / "photo.webp", "webp", seed=7)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    from clipsearch.errors import ImageDecodeError

    with pytest.raises(ImageDecodeError):
        open_image(path, draft_size=224)


# --- embeddings through the indexer -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = get_config("tiny-vit")
    model = build_model(cfg).eval()
    pp = PreprocessConfig(image_size=cfg["vision_cfg"]["image_size"])
    return ModelBundle(
        model=model, preprocess_cfg=pp, tokenizer=None, model_id="test/decode-scaled", config=cfg
    )


def test_indexed_embeddings_of_every_format_match_full_decodes(tmp_path, tiny):
    kinds = [k for k in KINDS if (k != "heic" or _heif_available())]
    if not webpscale.available():
        kinds = [k for k in kinds if not k.endswith("webp")]
    root = tmp_path / "photos"
    root.mkdir()
    paths = [write(root / f"{i:02d}.{kind}", kind, seed=10 + i) for i, kind in enumerate(kinds)]
    with Library.open(tmp_path / "lib.db", create=True) as lib:
        report = index_paths(lib, tiny, [root], backend="torch-fp32", batch_size=4)
        assert report.new == len(paths) and not report.failed
        _, stored_paths, vectors = lib.embeddings(tiny.model_id)
    row = {str(p): i for i, p in enumerate(stored_paths)}
    stored = vectors[[row[str(p)] for p in paths]]
    with torch.no_grad():
        x = torch.stack([tiny.preprocess(reference(p)) for p in paths])  # full decodes [N, 3, 64, 64]
        want = torch.nn.functional.normalize(tiny.model.encode_image(x), dim=-1).numpy()
    cos = backends.cosine_rows(stored, want)
    assert cos.min() >= MIN_COSINE, dict(zip(kinds, cos.round(5), strict=True))
    assert backends.cosine_rows(stored, want[::-1]).min() < 0.99  # a wrong pairing fails the check
