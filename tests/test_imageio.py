"""Decoding real files written in every format we read, and every way a file can be bad."""

import io
import os
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch.errors import ClipsearchError, ImageDecodeError
from clipsearch.imageio import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    REASONS,
    open_image,
)
from clipsearch.metadata import read_metadata
from clipsearch.transform import PreprocessConfig, image_transform


def image_metadata(source, path=None) -> dict:
    """What the indexer stores of a photo's size and date (:func:`read_metadata`, headers only)."""
    meta = read_metadata(source, path)
    return {"width": meta.width, "height": meta.height, "taken_at": meta.taken_at}


def _pattern(w, h, seed=0):
    """A photo-like RGB array [H, W, 3]: smooth gradients plus blocks plus a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), ((x // 16 + y // 16) % 2) * 200], -1)
    arr = arr + rng.normal(0, 4, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _reason(path, **kwargs):
    with pytest.raises(ImageDecodeError) as info:
        open_image(path, **kwargs)
    assert info.value.reason in REASONS
    assert isinstance(info.value, ClipsearchError)
    return info.value.reason


def _mad(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


# --- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,ext,kwargs,exact",
    [
        ("PNG", ".png", {}, True),
        ("BMP", ".bmp", {}, True),
        ("TIFF", ".tiff", {}, True),
        ("TIFF", ".tif", {"compression": "tiff_deflate"}, True),
        ("WEBP", ".webp", {"lossless": True}, True),
        ("JPEG", ".jpg", {"quality": 95}, False),
        ("WEBP", ".webp", {"quality": 90}, False),
        ("AVIF", ".avif", {"quality": 90}, False),
    ],
)
def test_formats_decode_to_the_written_pixels(tmp_path, fmt, ext, kwargs, exact):
    arr = _pattern(64, 48)
    path = tmp_path / f"photo{ext}"
    Image.fromarray(arr).save(path, format=fmt, **kwargs)
    im = open_image(path)
    assert im.mode == "RGB" and im.size == (64, 48)
    if exact:
        assert np.array_equal(np.asarray(im), arr)
    else:
        assert _mad(im, arr) < 6


def test_heic_via_pillow_heif(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    arr = _pattern(64, 48)
    path = tmp_path / "IMG_0001.HEIC"
    try:
        pillow_heif.from_pillow(Image.fromarray(arr)).save(path, quality=95)
    except Exception as e:  # a pillow-heif built without an HEVC encoder
        pytest.skip(f"cannot encode HEIC here: {e}")
    im = open_image(path)  # registers the HEIF opener on first need
    assert im.mode == "RGB" and im.size == (64, 48)
    assert _mad(im, arr) < 8
    dated = tmp_path / "dated.heic"
    pillow_heif.from_pillow(Image.fromarray(arr)).save(
        dated, quality=95, exif=_exif(taken="2020:01:02 03:04:05")
    )
    assert image_metadata(dated) == {"width": 64, "height": 48, "taken_at": "2020-01-02T03:04:05"}


def test_format_comes_from_content_not_name(tmp_path):
    arr = _pattern(20, 10)
    png_named_jpg = tmp_path / "really_a_png.jpg"
    Image.fromarray(arr).save(png_named_jpg, format="PNG")
    assert np.array_equal(np.asarray(open_image(png_named_jpg)), arr)
    no_ext = tmp_path / "noextension"
    Image.fromarray(arr).save(no_ext, format="BMP")
    assert np.array_equal(np.asarray(open_image(no_ext)), arr)


def test_streams_and_bytes(tmp_path):
    arr = _pattern(16, 16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    assert np.array_equal(np.asarray(open_image(io.BytesIO(buf.getvalue()))), arr)
    assert _reason(io.BytesIO(b"plain text, not pixels")) == "not an image"
    assert _reason(io.BytesIO(b"")) == "empty file"


# --- orientation, modes, frames ---------------------------------------------------------------


def _exif(orientation=None, taken=None, offset=None):
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    if taken:
        exif.get_ifd(0x8769)[0x9003] = taken
    if offset:
        exif.get_ifd(0x8769)[0x9011] = offset
    return exif.tobytes()


@pytest.mark.parametrize("orientation,k", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, k):
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = (255, 0, 0)  # left half red
    arr[:20, 40:] = (0, 0, 255)  # top right blue, bottom right black
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, quality=95, exif=_exif(orientation))
    im = open_image(path)
    expected = np.rot90(arr, k=k)  # 6: turn clockwise to view; 8: anticlockwise; 3: half turn
    assert im.size == (expected.shape[1], expected.shape[0])
    assert _mad(im, expected) < 4
    assert im.getexif().get(0x0112) in (None, 1)  # not rotated twice by a later exif_transpose


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[:, :5] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[:, 5:] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(open_image(tmp_path / "a.png"))
    assert (out[:, :5] == 255).all()
    assert (np.abs(out[:, 5:].astype(int) - 127) <= 1).all()
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    la.save(tmp_path / "la.png")
    assert np.array_equal(np.asarray(open_image(tmp_path / "la.png")), out)


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (8, 4))
    p.putpalette([0, 255, 0] + [255, 0, 0] + [0] * 762)
    p.paste(1, (4, 0, 8, 4))  # right half index 1 (red), left half index 0 (green, transparent)
    p.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(open_image(tmp_path / "p.png"))
    assert (out[:, :4] == 255).all()
    assert (out[:, 4:] == (255, 0, 0)).all()
    p.save(tmp_path / "t.gif", transparency=0)
    assert (np.asarray(open_image(tmp_path / "t.gif"))[:, :4] == 255).all()
    p.save(tmp_path / "opaque.gif")  # no transparency: the palette colours themselves
    assert (np.asarray(open_image(tmp_path / "opaque.gif"))[:, :4] == (0, 255, 0)).all()


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")  # mode I;16
    out = np.asarray(open_image(tmp_path / "g16.png"))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def _png_rgb16(arr16):
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = arr16.shape
    rows = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_sixteen_bit_rgb(tmp_path):
    arr16 = (_pattern(12, 6).astype(np.uint16) * 257).astype(np.uint16)
    (tmp_path / "rgb16.png").write_bytes(_png_rgb16(arr16))
    out = np.asarray(open_image(tmp_path / "rgb16.png"))
    assert np.abs(out.astype(int) - arr16 / 257).max() <= 1


def test_float_tiff(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    assert np.asarray(open_image(tmp_path / "f.tif"))[0, :, 1].tolist() == [0, 128, 255]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    out = np.asarray(open_image(tmp_path / "cmyk.jpg"))
    assert np.abs(out.astype(int) - (255, 0, 0)).max() < 8  # cyan 0, magenta+yellow full: red


def test_grey_and_bilevel(tmp_path):
    Image.new("L", (5, 5), 77).save(tmp_path / "l.png")
    Image.new("1", (5, 5), 1).save(tmp_path / "one.bmp")
    assert (np.asarray(open_image(tmp_path / "l.png")) == 77).all()
    assert (np.asarray(open_image(tmp_path / "one.bmp")) == 255).all()


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = np.asarray(open_image(tmp_path / "anim.gif"))
    assert out.shape == (10, 10, 3) and (out == (255, 0, 0)).all()


def test_multipage_tiff_gives_the_first_page(tmp_path):
    pages = [Image.new("RGB", (6, 6), c) for c in ((10, 20, 30), (200, 100, 0))]
    pages[0].save(tmp_path / "pages.tiff", save_all=True, append_images=pages[1:])
    assert (np.asarray(open_image(tmp_path / "pages.tiff")) == (10, 20, 30)).all()


def test_very_wide_image(tmp_path):
    Image.new("L", (30000, 200), 90).save(tmp_path / "pano.png")
    im = open_image(tmp_path / "pano.png")
    assert im.size == (30000, 200) and im.mode == "RGB"
    assert image_transform(PreprocessConfig(32))(im).shape == (3, 32, 32)


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "dot.png")
    im = open_image(tmp_path / "dot.png")
    assert im.size == (1, 1) and im.getpixel((0, 0)) == (1, 2, 3)
    assert image_transform(PreprocessConfig(32))(im).shape == (3, 32, 32)


def test_odd_file_names(tmp_path):
    names = ["фото 東京 😀.png", "<script>alert(1)<script>.png", "100% _x_ \\ 'q'.png", " lead.png"]
    if os.name == "posix":
        names.append(os.fsdecode(b"caf\xe9-latin1.png"))  # not UTF-8: a surrogate-escaped str
    for name in names:
        path = tmp_path / name
        Image.new("RGB", (3, 2), (9, 8, 7)).save(path, format="PNG")
        assert open_image(path).size == (3, 2)
        assert open_image(str(path)).size == (3, 2)
        assert image_metadata(path)["width"] == 3
    assert open_image(os.fsencode(tmp_path / names[0])).size == (3, 2)  # a bytes path


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlinks(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "real.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    assert open_image(tmp_path / "link.png").size == (4, 4)
    (tmp_path / "dead.png").symlink_to(tmp_path / "gone.png")
    assert _reason(tmp_path / "dead.png") == "unreadable"
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    assert _reason(tmp_path / "loop.png") == "unreadable"
    (tmp_path / "folder").mkdir()
    (tmp_path / "to_folder.jpg").symlink_to(tmp_path / "folder")
    assert _reason(tmp_path / "to_folder.jpg") == "not a regular file"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "private.png")
    os.chmod(tmp_path / "private.png", 0)
    try:
        assert _reason(tmp_path / "private.png") == "unreadable"
    finally:
        os.chmod(tmp_path / "private.png", 0o644)


# --- files that are not images ----------------------------------------------------------------


def test_empty_text_and_missing_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("these are my holiday notes\n" * 20)
    assert _reason(tmp_path / "empty.jpg") == "empty file"
    assert _reason(tmp_path / "notes.jpg") == "not an image"
    assert _reason(tmp_path / "missing.jpg") == "unreadable"
    err = pytest.raises(ImageDecodeError, open_image, tmp_path / "notes.jpg").value
    assert str(tmp_path / "notes.jpg") in str(err)


def test_truncated_jpeg_and_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_pattern(200, 150)).save(buf, format="JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert _reason(tmp_path / "cut.jpg") == "truncated"
    buf = io.BytesIO()
    Image.fromarray(_pattern(200, 150)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert _reason(tmp_path / "cut.png") == "truncated"
    (tmp_path / "header_only.png").write_bytes(buf.getvalue()[:20])
    assert _reason(tmp_path / "header_only.png") in ("truncated", "corrupt")


def test_corrupt_data(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_pattern(64, 64)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[60:400] = os.urandom(340)  # scramble the compressed pixels; the header stays valid
    (tmp_path / "scrambled.png").write_bytes(bytes(data))
    assert _reason(tmp_path / "scrambled.png") in ("corrupt", "truncated")


def test_directory_named_like_an_image(tmp_path):
    (tmp_path / "album.jpg").mkdir()
    assert _reason(tmp_path / "album.jpg") == "not a regular file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result = {}

    def attempt():
        try:
            open_image(fifo)
        except ImageDecodeError as e:
            result["reason"] = e.reason

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout=10)
    if t.is_alive():  # unblock the reader so the test process can exit, then fail
        with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "wb"):
            pass
        pytest.fail("open_image blocked on a FIFO")
    assert result["reason"] == "not a regular file"


def test_device_is_refused():
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    assert _reason("/dev/zero") == "not a regular file"


# --- decompression bombs ----------------------------------------------------------------------


def _png_claiming(w, h):
    """A valid tiny PNG whose header claims ``w x h`` pixels (the data would not fill it)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_bomb_is_refused_from_the_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_claiming(60000, 60000))  # 3.6 gigapixels in 70 bytes
    assert _reason(tmp_path / "bomb.png") == "too many pixels"
    assert _reason(tmp_path / "bomb.png", max_pixels=None) == "too many pixels"  # PIL's own limit
    (tmp_path / "big.png").write_bytes(_png_claiming(13000, 14000))  # just over the default
    assert 13000 * 14000 > DEFAULT_MAX_PIXELS
    assert _reason(tmp_path / "big.png") == "too many pixels"


def test_max_pixels_is_configurable(tmp_path):
    Image.fromarray(_pattern(100, 50)).save(tmp_path / "small.png")
    assert _reason(tmp_path / "small.png", max_pixels=4999) == "too many pixels"
    assert open_image(tmp_path / "small.png", max_pixels=5000).size == (100, 50)


# --- draft decoding ---------------------------------------------------------------------------


def test_draft_keeps_the_shorter_side_at_least_the_target(tmp_path):
    Image.new("RGB", (2000, 1500), (90, 140, 200)).save(tmp_path / "big.jpg", quality=90)
    assert open_image(tmp_path / "big.jpg", draft_size=224).size == (500, 375)  # 1/4: 1500/8 < 224
    assert open_image(tmp_path / "big.jpg", draft_size=400).size == (1000, 750)  # 1/2
    assert open_image(tmp_path / "big.jpg", draft_size=1000).size == (2000, 1500)  # no reduction
    assert open_image(tmp_path / "big.jpg", draft_size=187).size == (250, 188)  # 1/8
    Image.new("RGB", (2000, 1500), (90, 140, 200)).save(tmp_path / "big.png")
    # a PNG cannot be decoded smaller: it is box-reduced by 1500 // 224 = 6 after decoding
    assert open_image(tmp_path / "big.png", draft_size=224).size == (334, 250)
    assert open_image(tmp_path / "big.png", draft_size=1000).size == (2000, 1500)  # 1500 // 1000 = 1


def test_draft_on_a_rotated_portrait(tmp_path):
    Image.new("RGB", (1800, 1200), (90, 140, 200)).save(tmp_path / "portrait.jpg", exif=_exif(6))
    im = open_image(tmp_path / "portrait.jpg", draft_size=224)
    assert im.size == (300, 450)  # rotated to portrait, 1/4 scale, shorter side 300 >= 224
    assert min(im.size) >= 224


def _photo_like(w, h, seed=0):
    """Smooth colour waves, sharp-edged 128-pixel blocks and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    waves = np.stack([np.sin(x / 150.0), np.cos(y / 110.0), np.sin((x + y) / 90.0)], -1) * 90 + 127
    blocks = ((x // 128 + y // 128) % 2)[..., None] * 60
    return np.clip(waves + blocks + rng.normal(0, 4, waves.shape), 0, 255).astype(np.uint8)


def test_draft_pixels_after_the_clip_transform_are_close_to_full_decode(tmp_path):
    # (a fine 16-pixel checkerboard, an aliasing worst case, differs by ~0.055: benchmarks/decode.md)
    Image.fromarray(_photo_like(2400, 1600, seed=3)).save(tmp_path / "photo.jpg", quality=92)
    t = image_transform(PreprocessConfig(224))
    full = t(open_image(tmp_path / "photo.jpg"))
    draft = t(open_image(tmp_path / "photo.jpg", draft_size=224))
    assert full.shape == draft.shape == (3, 224, 224)
    diff = (full - draft).abs().mean().item()  # normalised units; one 8-bit level is ~0.015
    assert diff < 0.03, diff
    cosine = torch.nn.functional.cosine_similarity(full.flatten(), draft.flatten(), dim=0).item()
    assert cosine > 0.999


# --- metadata and names -----------------------------------------------------------------------


def test_metadata_from_a_path_and_from_the_bytes(tmp_path):
    path = tmp_path / "dated.jpg"
    exif = _exif(orientation=6, taken="2021:05:06 07:08:09", offset="+02:00")
    Image.fromarray(_pattern(60, 40)).save(path, exif=exif)
    expected = {"width": 40, "height": 60, "taken_at": "2021-05-06T07:08:09+02:00"}
    assert image_metadata(path) == expected
    assert image_metadata(io.BytesIO(path.read_bytes()), path) == expected  # as the indexer reads it
    assert open_image(path).size == (40, 60)  # the decoded pixels agree


@pytest.mark.parametrize("orientation, upright", [(None, (1600, 1200)), (6, (1200, 1600)), (3, (1600, 1200))])
def test_metadata_of_a_big_jpeg_is_the_full_upright_size(tmp_path, orientation, upright):
    path = tmp_path / "big.jpg"
    Image.fromarray(_pattern(1600, 1200)).save(
        path, exif=_exif(orientation=orientation, taken="2020:01:02 03:04:05")
    )
    im = open_image(path, draft_size=100)
    assert sorted(im.size) == [150, 200]  # decoded at 1/8 scale
    assert image_metadata(path) == {
        "width": upright[0],
        "height": upright[1],
        "taken_at": "2020-01-02T03:04:05",
    }
    assert im.size == (upright[0] // 8, upright[1] // 8)  # the draft is upright as the metadata says


def test_metadata_of_an_image_stored_on_its_side(tmp_path):
    Image.fromarray(_pattern(60, 40)).save(tmp_path / "r.jpg", exif=_exif(orientation=8))
    assert image_metadata(tmp_path / "r.jpg") == {"width": 40, "height": 60, "taken_at": None}


def test_metadata_without_or_with_bad_dates(tmp_path):
    Image.fromarray(_pattern(30, 20)).save(tmp_path / "plain.png")
    assert image_metadata(tmp_path / "plain.png") == {"width": 30, "height": 20, "taken_at": None}
    Image.fromarray(_pattern(30, 20)).save(tmp_path / "zero.jpg", exif=_exif(taken="0000:00:00 00:00:00"))
    assert image_metadata(tmp_path / "zero.jpg")["taken_at"] is None
    Image.fromarray(_pattern(30, 20)).save(tmp_path / "naive.jpg", exif=_exif(taken="2019:12:31 23:59:58"))
    assert image_metadata(tmp_path / "naive.jpg")["taken_at"] == "2019-12-31T23:59:58"


def test_metadata_errors_are_typed(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ImageDecodeError):
        image_metadata(tmp_path / "notes.jpg")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageDecodeError):
        image_metadata(tmp_path / "dir.png")


def test_extensions():
    required = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".heic", ".heif", ".avif"}
    assert required <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


class _FailingDisk(io.BytesIO):
    """A stream whose reads fail with EIO after ``ok`` bytes, like a dying external drive."""

    def __init__(self, data, ok):
        super().__init__(data)
        self.ok = ok

    def read(self, n=-1):
        if self.tell() >= self.ok:
            raise OSError(5, "Input/output error")
        return super().read(n if n is not None and 0 <= n <= self.ok - self.tell() else self.ok - self.tell())


def test_io_errors_are_unreadable_not_corrupt():
    buf = io.BytesIO()
    Image.fromarray(_pattern(300, 200)).save(buf, format="PNG")
    assert _reason(_FailingDisk(buf.getvalue(), ok=0)) == "unreadable"
    assert _reason(_FailingDisk(buf.getvalue(), ok=200)) == "unreadable"
    assert open_image(_FailingDisk(buf.getvalue(), ok=len(buf.getvalue()) + 1)).size == (300, 200)
