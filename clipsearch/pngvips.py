"""PNG pixels decoded by libvips (through pyvips), the same pixels as Pillow's decoder in less time.

A PNG cannot be decoded at a reduced scale: zlib has to inflate every row. What differs between
decoders is the cost of that work; libvips reads PNGs with libspng, which inflates and unfilters in
about two thirds of the CPU time Pillow's decoder takes (``benchmarks/mixed_formats.md``), and PNGs
are the slowest common format to index. The pixels are the same bytes, so everything after the
decode (alpha, orientation, the reduction, the model's resize) is unchanged.

Only the plain 8-bit layouts are taken (grey, grey+alpha, RGB, RGBA without a colour key); a
palette, 1/2/4/16-bit samples, a ``tRNS`` colour key or an animation go to Pillow as before, whose
conversions the rest of :mod:`clipsearch.imageio` is written for. :func:`decode` returns ``None``
whenever libvips is absent (``pyvips`` not installed or its library missing: logged once) or the
file makes it warn or fail, and Pillow then decodes the file and words any error.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

# Pillow's raw modes of 8-bit PNGs libvips gives the same way: raw mode -> bands
_PLAIN = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


@functools.cache
def _pyvips():
    """pyvips with its cache off (each file is decoded once), or None where it cannot load."""
    try:
        import pyvips
    except (ImportError, OSError) as e:  # not installed, or no libvips beside it
        log.info("PNG photos decode with Pillow (libvips not available: %s)", e)
        return None
    pyvips.cache_set_max(0)
    log.debug("PNG photos decode with libvips %s", ".".join(str(pyvips.version(i)) for i in range(3)))
    return pyvips


def available() -> bool:
    """Whether :func:`decode` can run on this machine."""
    return _pyvips() is not None


# Smaller PNGs stay with Pillow: libvips costs about 1 ms of CPU per file before it inflates a
# row, more than Pillow's whole decode of a small image (a 64 x 64 training image: 6x Pillow's CPU;
# benchmarks/train_throughput.md). Its faster inflate only pays from about this size on.
MIN_PIXELS = 512 * 512


def takes(im) -> bool:
    """Whether the PNG ``im`` (opened by Pillow, header only) is one :func:`decode` handles: a plain
    8-bit layout of at least :data:`MIN_PIXELS` pixels."""
    if im.format != "PNG" or getattr(im, "is_animated", False) or len(im.tile) != 1:
        return False
    if im.size[0] * im.size[1] < MIN_PIXELS:
        return False
    rawmode = im.tile[0][3]
    return rawmode == im.mode and rawmode in _PLAIN and "transparency" not in im.info


def decode(data: bytes, im, shrink: int = 1):
    """The pixels of the PNG ``data`` (whose Pillow header image is ``im``, see :func:`takes`) as a
    ``PIL.Image`` in ``im``'s mode, or ``None`` when Pillow should decode it instead.

    ``shrink`` > 1: box-averaged by that integer factor inside libvips as the rows are inflated
    (sizes rounded up, as Pillow's ``reduce``), so the full-size picture is never held; a picture
    with alpha is first flattened on white and comes out without it (``RGB`` or ``L``). That is the
    picture :func:`clipsearch.imageio.open_image` makes from a full decode (Pillow averages the
    premultiplied pixels, then flattens on white): flattening is linear, so averaging before or
    after it gives the same values, up to rounding.
    """
    from PIL import Image

    pyvips = _pyvips()
    if pyvips is None:
        return None
    try:
        # fail_on="warning": a truncated or damaged file goes to Pillow, which says what is wrong
        v = pyvips.Image.pngload_buffer(data, access="sequential", fail_on="warning")
        if (v.width, v.height) != im.size or v.bands != _PLAIN[im.mode] or v.format != "uchar":
            return None
        mode = im.mode
        if shrink > 1:
            if mode in ("LA", "RGBA"):
                v = v.flatten(background=[255] * (v.bands - 1)).cast("uchar")
                mode = mode[:-1] if mode == "RGBA" else "L"
            v = v.shrink(shrink, shrink, ceil=True)
        pixels = v.write_to_memory()
    except pyvips.Error as e:
        log.debug("libvips did not decode a PNG (%s): Pillow decodes it", str(e).strip()[:200])
        return None
    return Image.frombuffer(mode, (v.width, v.height), pixels, "raw", mode, 0, 1)
