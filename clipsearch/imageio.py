"""Reading one photo safely: a path (or binary stream) in, an upright RGB ``PIL.Image`` out.

Every failure a file can cause is an :class:`~clipsearch.errors.ImageDecodeError` whose ``reason``
is one of :data:`REASONS`, so the indexer can count and report them. The format comes from the
file's content, never its name; only regular files are opened (a FIFO named ``x.jpg`` would
block a reader forever); the pixel count is checked from the header before anything is decoded.
"""

from __future__ import annotations

import functools
import os
import stat

from clipsearch.errors import ImageDecodeError
from clipsearch.raw import RAW_EXTENSIONS

# PIL's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS): about 13k x 13k.
DEFAULT_MAX_PIXELS = 178_956_970

# Names the indexer looks at; the decoder itself goes by content. RAW names: clipsearch.raw.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp"}
    | {".heic", ".heif", ".hif", ".avif"}
    | RAW_EXTENSIONS
)

REASONS = (
    "not a regular file",  # a directory, FIFO, socket or device
    "empty file",
    "unreadable",  # missing, no permission, I/O error
    "not an image",  # no decoder recognises the content
    "too many pixels",  # over max_pixels: a possible decompression bomb
    "truncated",  # the data ends early
    "corrupt",  # the decoder failed for another reason
    "unsupported mode",  # decoded, but in a colour mode with no RGB conversion
    "unsupported RAW",  # a camera RAW file without a usable preview, and no LibRaw to develop it
)

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@functools.cache
def _pil():
    """PIL, set up once: our own pixel limit replaces its bomb warning (the library never prints)."""
    import warnings

    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return Image


@functools.cache
def _register_heif() -> bool:
    """Teach PIL HEIC/HEIF (phones' format) on first need; importing pillow-heif is not free."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _looks_like_heif(head: bytes) -> bool:
    # ISO base media file: a box size, then "ftyp", then a brand such as heic, heix, mif1, avif
    return len(head) >= 12 and head[4:8] == b"ftyp"


def _open_regular_file(path):
    """A binary file object for ``path``, refusing anything but a non-empty regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise ImageDecodeError(path, "unreadable", "no such file") from e
    except OSError as e:
        raise ImageDecodeError(path, "unreadable", e.strerror or str(e)) from e
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageDecodeError(path, "empty file")
    try:
        # O_NONBLOCK: should the path be swapped for a FIFO after the stat, open() still returns
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageDecodeError(path, "unreadable", e.strerror or str(e)) from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageDecodeError(path, "not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open_stream(source):
    """``(file object, name for messages, whether we own it)`` for a path or a binary stream."""
    if hasattr(source, "read"):
        return source, getattr(source, "name", "<stream>"), False
    return _open_regular_file(source), source, True


def _identify(f, name, max_pixels):
    """Open (header only) and check the pixel count; nothing is decoded yet."""
    from PIL import UnidentifiedImageError

    Image = _pil()
    try:
        start = f.tell() if f.seekable() else 0
        head = f.read(16)
        f.seek(start)
    except OSError as e:  # an I/O error on a failing disk, or a file that vanished underneath
        raise ImageDecodeError(name, "unreadable", e.strerror or str(e)) from e
    if not head:
        raise ImageDecodeError(name, "empty file")
    try:
        try:
            im = Image.open(f)
        except UnidentifiedImageError:
            if not (_looks_like_heif(head) and _register_heif()):
                raise
            f.seek(start)
            im = Image.open(f)
    except UnidentifiedImageError as e:
        raise ImageDecodeError(name, "not an image") from e
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(name, "too many pixels", str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a recognised header that is broken
        raise ImageDecodeError(name, _failure_reason(e), str(e)) from e
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageDecodeError(name, "too many pixels", f"{w}x{h} is over the limit of {max_pixels:,}")
    return im


def check_header(f, name, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Read only the header of the open binary file ``f``: :class:`ImageDecodeError` unless it is an
    image with at most ``max_pixels`` pixels, so a caller can check a file before reading the whole
    of it into memory. A camera RAW file passes (its preview is checked when it is decoded).
    ``f``'s position afterwards is unspecified."""
    from clipsearch import raw

    start = f.tell()
    if raw.sniff(f) is not None:
        return
    f.seek(start)
    _identify(f, name, max_pixels)  # not closed: PIL would close the caller's file with it


def _failure_reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return "unreadable"  # the system's I/O error (EIO...), not the decoder's complaint
    text = str(e).lower()
    if isinstance(e, EOFError) or "truncat" in text or "premature end" in text or "broken data" in text:
        return "truncated"
    return "corrupt"


FULL_SIZE_KEY = "clipsearch.full_size"  # im.info entry: (width, height) upright, at full scale
# im.info entry of an image decoded at a reduced scale: the box (x0, y0, x1, y1) of the upright
# full-scale image that its pixels span, so that a resize can keep the full image's exact geometry
# (clipsearch.transform uses it; a box may reach past the image where the last pixel is partial).
COVERS_KEY = "clipsearch.covers"


def open_image(source, max_pixels: int | None = DEFAULT_MAX_PIXELS, draft_size: int | None = None):
    """Decode ``source`` (a path, or a binary stream) to an upright RGB ``PIL.Image``.

    ``max_pixels``: refuse images with more pixels than this (checked before decoding); ``None``
    leaves only PIL's own limit. ``draft_size``: the image may come out smaller than stored, by an
    integer factor that keeps its shorter side >= ``draft_size`` (much faster for a model that
    resizes to that size anyway): JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling), WebPs through libwebp's scaler (:mod:`clipsearch.webpscale`), and every other format
    is decoded in full (8-bit PNGs by libvips where it is installed, :mod:`clipsearch.pngvips`:
    the same pixels, faster) and then box-reduced before anything else touches its pixels (transparency,
    orientation, the model's bicubic resize). Orientation from EXIF is applied; transparency is
    flattened on white; an animation gives its first frame. Raises :class:`ImageDecodeError` with a
    ``reason`` in :data:`REASONS`.
    """
    from clipsearch import raw

    f, name, owned = _open_stream(source)
    try:
        found = raw.sniff(f)
        if found is not None:  # camera RAW: its embedded preview, or LibRaw
            return raw.open_raw(f, found, name, max_pixels, draft_size)
        start = f.tell() if f.seekable() else 0
        im = _identify(f, name, max_pixels)
        full_size = im.size  # as stored, before any draft scaling
        factor = 1  # integer reduction so far: pixel i spans [factor * i, factor * (i + 1)) at full scale
        covers = None  # for a non-integer scaler (libwebp's): the stored box the pixels span
        if draft_size and im.format == "JPEG":
            w, h = im.size
            d = int(draft_size)
            # PIL keeps each side >= the requested one; ask for the shorter side = d, aspect kept
            request = (d, -(-h * d // w)) if w <= h else (-(-w * d // h), d)
            drafted = im.draft(None, request)
            if drafted is not None:
                factor = round(w / drafted[1][2])  # libjpeg's DCT scale: 1, 2, 4 or 8
        elif draft_size and im.format == "WEBP":
            im = _webp_scaled(im, f, start, draft_size)
            if im.size != full_size:
                covers = (0, 0, *full_size)  # libwebp's rescaler spans the whole picture evenly
        elif im.format == "PNG":
            im, factor = _png_by_vips(im, f, start, draft_size)
        try:
            im.load()
        except _pil().DecompressionBombError as e:  # a frame or tile larger than the header said
            raise ImageDecodeError(name, "too many pixels", str(e)) from e
        except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error...
            raise ImageDecodeError(name, _failure_reason(e), str(e)) from e
        if draft_size:
            before = im.size
            im = reduce_to_cover(im, draft_size)
            if im.size != before:
                factor *= min(before) // int(draft_size)  # reduce_to_cover's factor
        if covers is None and factor > 1:
            covers = (0, 0, factor * im.size[0], factor * im.size[1])  # the last pixel may be partial
        orientation = _orientation(im)
        stored = im
        im = _upright(im)
        if im is stored:
            orientation = 1  # a malformed EXIF block: left as stored
        turned = orientation in (5, 6, 7, 8)  # a 90-degree orientation was applied
        exif = im.info.get("exif")  # orientation now cleared; the capture date is for metadata.from_image
        im = _to_rgb(im, name)
        if exif is not None:
            im.info["exif"] = exif
        # metadata.from_image reports the photo's upright size, not the draft's
        im.info[FULL_SIZE_KEY] = full_size[::-1] if turned else full_size
        if covers is not None:
            im.info[COVERS_KEY] = _turn_box(covers, orientation, *full_size)
        return im
    finally:
        if owned:
            f.close()


# Modes PIL's box reduction handles (LA and RGBA premultiplied, so transparent pixels do not bleed).
_REDUCIBLE = {"RGB", "RGBA", "RGBa", "L", "LA", "La"}


def reduce_to_cover(im, min_side: int):
    """Box-reduce ``im`` by the largest integer factor that keeps its shorter side >= ``min_side``.

    For decoders that cannot scale while decoding (PNG, HEIC, TIFF...): every later step then works
    on a few hundred thousand pixels instead of millions, and a model resizing to ``min_side`` sees
    the same picture (cosine >= 0.995 to the full-size path, tested). A palette image becomes RGB(A)
    first; 16-bit and float images are left as they are (rare, and their own conversion scales them).
    """
    factor = min(im.size) // max(int(min_side), 1)
    if factor < 2:
        return im
    if "transparency" in im.info and im.mode in ("P", "L", "RGB"):
        im = im.convert("RGBA")  # a colour key means nothing once pixels are averaged: real alpha
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA" if im.mode == "PA" else "RGB")
    if im.mode not in _REDUCIBLE:
        return im
    info = {k: v for k, v in im.info.items() if k != "transparency"}  # EXIF, ICC... go along
    out = im.reduce(factor)
    out.info.update(info)
    return out


_PNG_LATE_CHUNKS_MAX = 1 << 16  # chunks walked after the image data before giving up (a crafted file)
_LATE_CHUNK_MAX_BYTES = 1 << 20  # a larger eXIf or XMP chunk is skipped (as metadata.MAX_XMP_BYTES)


def read_png_late_chunks(im) -> None:
    """Put the eXIf and XMP chunks that follow a PNG's image data into ``im.info``, as Pillow does
    when it decodes the pixels, but by seeking over the compressed data instead of inflating it.

    The walk starts at the first IDAT chunk (the offset of Pillow's decoder tile) and stops at IEND,
    at the first malformed chunk header, or at an APNG frame (``fcTL``: later frames' chunks are no
    metadata of the picture shown). Chunk CRCs are not checked, as Pillow does not check them there.
    """
    import struct

    fp = getattr(im, "fp", None)
    if fp is None or not im.tile:
        return
    pos = im.tile[0][2] - 8  # the tile starts at the first IDAT chunk's data, after length and type
    for _ in range(_PNG_LATE_CHUNKS_MAX):
        fp.seek(pos)
        header = fp.read(8)
        if len(header) < 8:
            return
        length, kind = struct.unpack(">I4s", header)
        if kind in (b"IEND", b"fcTL") or length > 0x7FFFFFFF:
            return
        if kind == b"eXIf" and "exif" not in im.info and length <= _LATE_CHUNK_MAX_BYTES:
            im.info["exif"] = b"Exif\x00\x00" + fp.read(length)
        elif kind == b"iTXt" and "xmp" not in im.info and length <= _LATE_CHUNK_MAX_BYTES:
            xmp = _png_xmp(fp.read(length))
            if xmp:
                im.info["xmp"] = xmp
        pos += 12 + length  # length, type, data, CRC


def _png_xmp(chunk: bytes) -> bytes | None:
    """The XMP packet of an iTXt chunk's data, or None when the chunk holds other text."""
    import zlib

    keyword, _, rest = chunk.partition(b"\0")
    if keyword != b"XML:com.adobe.xmp" or len(rest) < 2:
        return None
    compressed, method = rest[0], rest[1]
    parts = rest[2:].split(b"\0", 2)  # language tag, translated keyword, text
    if len(parts) < 3:
        return None
    if not compressed:
        return parts[2]
    if method != 0:
        return None
    try:  # bounded: a small chunk must not inflate into gigabytes
        return zlib.decompressobj().decompress(parts[2], _LATE_CHUNK_MAX_BYTES)
    except zlib.error:
        return None


def _png_by_vips(im, f, start: int, draft_size: int | None):
    """``(image, factor)``: the PNG ``im`` decoded by libvips when it takes it
    (:mod:`clipsearch.pngvips`), already reduced by ``factor`` (the factor of
    :func:`reduce_to_cover`) when ``draft_size`` asks for it; else ``(im, 1)``."""
    from clipsearch import pngvips

    if not pngvips.takes(im) or not pngvips.available():
        return im, 1
    try:
        read_png_late_chunks(im)  # an eXIf after the pixels (orientation), as Pillow's load reads it
        f.seek(start)
        data = f.read()
    except OSError:
        return im, 1  # Pillow reads it again below and reports the I/O error in its words
    shrink = max(1, min(im.size) // int(draft_size)) if draft_size else 1
    decoded = pngvips.decode(data, im, shrink)
    if decoded is None:
        return im, 1
    decoded.info.update(im.info)  # EXIF, ICC profile, text chunks
    return decoded, shrink


def _webp_scaled(im, f, start: int, draft_size: int):
    """``im`` decoded by libwebp at a reduced scale when it can (:mod:`clipsearch.webpscale`), else ``im``."""
    from clipsearch import webpscale

    try:
        f.seek(start)
        data = f.read()
    except OSError:
        return im  # Pillow reads it again below and reports the I/O error in its words
    scaled = webpscale.decode_scaled(data, draft_size)
    if scaled is None:
        return im
    scaled.info.update(im.info)  # EXIF (orientation, date taken) and ICC profile from the container
    return scaled


def _orientation(im) -> int:
    """The EXIF orientation (1-8) the image is stored with; 1 when absent or unreadable."""
    try:
        value = im.getexif().get(0x0112)
    except Exception:  # EXIF parsers raise many types; such a block is ignored by _upright too
        return 1
    return value if value in range(1, 9) else 1


def _turn_box(box, orientation: int, width: int, height: int):
    """``box`` in the stored image (``width x height``) as the same region of the upright image."""
    x0, y0, x1, y1 = box
    w, h = width, height
    return {
        1: (x0, y0, x1, y1),
        2: (w - x1, y0, w - x0, y1),  # mirrored left-right
        3: (w - x1, h - y1, w - x0, h - y0),  # turned 180 degrees
        4: (x0, h - y1, x1, h - y0),  # mirrored top-bottom
        5: (y0, x0, y1, x1),  # transposed
        6: (h - y1, x0, h - y0, x1),  # turned 90 degrees clockwise to be upright
        7: (h - y1, w - x1, h - y0, w - x0),  # transverse
        8: (y0, w - x1, y1, w - x0),  # turned 90 degrees anticlockwise to be upright
    }[orientation]


def _upright(im):
    """Apply the EXIF orientation; a malformed EXIF block leaves the image as stored."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # EXIF parsers raise many types; the pixels are still good
        return im


def _to_rgb(im, name):
    """Any PIL mode -> RGB: alpha over white, 16-bit and float scaled, not clipped."""
    Image = _pil()
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _deep_to_rgb(im)
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageDecodeError(name, "unsupported mode", mode) from e


def _deep_to_rgb(im):
    """16/32-bit integer or float grey -> 8-bit RGB, scaling the full range (PIL would clip)."""
    import numpy as np

    Image = _pil()
    arr = np.asarray(im)
    if im.mode == "F":
        top = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 255.0
        grey = np.nan_to_num(arr, nan=0.0) / top * 255.0
    else:
        arr = arr.astype(np.float64)
        top = 65535.0 if float(arr.max(initial=0)) > 255 or im.mode.startswith("I;16") else 255.0
        grey = arr / top * 255.0
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
