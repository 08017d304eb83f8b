"""WebP decoded straight to a reduced size by libwebp's own scaler (``WebPDecode`` with ``use_scaling``).

Pillow's WebP plugin always decodes at full size; libwebp can write its output rows through a
rescaler instead, so a 4 MP WebP meant for a 224 px model never exists at full size in memory and
the colour conversion runs on the small image only (``benchmarks/mixed_formats.md``). libwebp is
reached through ``ctypes`` (no compiled extension of ours): the system's ``libwebp.so.7``, else the
copy that Pillow's wheel ships in ``pillow.libs``. Where neither loads, or the library's decoder ABI
is not the one the structures below describe, :func:`decode_scaled` returns ``None`` and the caller
decodes with Pillow (logged once).

The structures mirror ``src/webp/decode.h`` of libwebp 1.x (decoder ABI ``0x02xx``): the field
order and types must match exactly, which the fidelity tests check by decoding real files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_DECODER_ABI = 0x0209  # WEBP_DECODER_ABI_VERSION of libwebp >= 1.1; only the major byte must match
_MODE_RGB = 0  # WEBP_CSP_MODE
_MODE_RGBA_PREMULTIPLIED = 7  # MODE_rgbA: colour already multiplied by alpha (what resampling needs)
_VP8_STATUS_OK = 0


class _Features(ctypes.Structure):  # WebPBitstreamFeatures
    _fields_ = [
        ("width", ctypes.c_int),
        ("height", ctypes.c_int),
        ("has_alpha", ctypes.c_int),
        ("has_animation", ctypes.c_int),
        ("format", ctypes.c_int),  # 0 mixed/undefined, 1 lossy, 2 lossless
        ("pad", ctypes.c_uint32 * 5),
    ]


class _RGBABuffer(ctypes.Structure):  # WebPRGBABuffer
    _fields_ = [("rgba", ctypes.c_void_p), ("stride", ctypes.c_int), ("size", ctypes.c_size_t)]


class _YUVABuffer(ctypes.Structure):  # WebPYUVABuffer: only here so the union has its real size
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("y", "u", "v", "a")),
        *((name, ctypes.c_int) for name in ("y_stride", "u_stride", "v_stride", "a_stride")),
        *((name, ctypes.c_size_t) for name in ("y_size", "u_size", "v_size", "a_size")),
    ]


class _BufferUnion(ctypes.Union):
    _fields_ = [("RGBA", _RGBABuffer), ("YUVA", _YUVABuffer)]


class _DecBuffer(ctypes.Structure):  # WebPDecBuffer
    _fields_ = [
        ("colorspace", ctypes.c_int),
        ("width", ctypes.c_int),
        ("height", ctypes.c_int),
        ("is_external_memory", ctypes.c_int),
        ("u", _BufferUnion),
        ("pad", ctypes.c_uint32 * 4),
        ("private_memory", ctypes.c_void_p),
    ]


class _Options(ctypes.Structure):  # WebPDecoderOptions
    _fields_ = [
        *(
            (name, ctypes.c_int)
            for name in (
                "bypass_filtering",
                "no_fancy_upsampling",
                "use_cropping",
                "crop_left",
                "crop_top",
                "crop_width",
                "crop_height",
                "use_scaling",
                "scaled_width",
                "scaled_height",
                "use_threads",
                "dithering_strength",
                "flip",
                "alpha_dithering_strength",
            )
        ),
        ("pad", ctypes.c_uint32 * 5),
    ]


class _Config(ctypes.Structure):  # WebPDecoderConfig
    _fields_ = [("input", _Features), ("output", _DecBuffer), ("options", _Options)]


def _candidates() -> list[str]:
    """Where libwebp may be: the system's, then the copy inside Pillow's wheel."""
    found = []
    name = ctypes.util.find_library("webp")
    if name:
        found.append(name)
    try:
        import PIL

        libs = Path(PIL.__file__).resolve().parent.parent / "pillow.libs"
        found.extend(str(p) for p in sorted(libs.glob("libwebp-*.so*")))
    except (ImportError, OSError):
        pass
    return found


@functools.cache
def _library():
    """The loaded libwebp with its argument types declared, or None (then Pillow decodes WebP)."""
    for candidate in _candidates():
        try:
            lib = ctypes.CDLL(candidate)
            version = lib.WebPGetDecoderVersion()
        except (OSError, AttributeError) as e:
            log.debug("libwebp at %s not usable: %s", candidate, e)
            continue
        if version >> 16 != 1:  # the structures above are libwebp 1.x's
            log.debug("libwebp at %s is version %#x, not 1.x", candidate, version)
            continue
        lib.WebPInitDecoderConfigInternal.argtypes = [ctypes.POINTER(_Config), ctypes.c_int]
        lib.WebPGetFeaturesInternal.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.POINTER(_Features),
            ctypes.c_int,
        ]
        lib.WebPDecode.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_Config)]
        probe = _Config()
        if not lib.WebPInitDecoderConfigInternal(ctypes.byref(probe), _DECODER_ABI):
            log.debug("libwebp at %s refuses decoder ABI %#x", candidate, _DECODER_ABI)
            continue
        log.debug("scaled WebP decoding with libwebp %#x from %s", version, candidate)
        return lib
    log.info("libwebp not found for scaled decoding: WebP photos decode at full size with Pillow")
    return None


def available() -> bool:
    """Whether :func:`decode_scaled` can run on this machine."""
    return _library() is not None


def decode_scaled(data: bytes, min_side: int):
    """Decode the WebP ``data`` at an integer reduction that keeps its shorter side >= ``min_side``.

    Returns a ``PIL.Image`` (``RGB``, or ``RGBa``, premultiplied, when the file has alpha), or
    ``None`` when this path does not apply and Pillow should decode instead: no usable libwebp, an
    animation (Pillow gives its first frame), a picture too small to reduce, or a file libwebp
    refuses (Pillow then reports why in its own words).
    """
    import numpy as np
    from PIL import Image

    lib = _library()
    if lib is None:
        return None
    config = _Config()
    if not lib.WebPInitDecoderConfigInternal(ctypes.byref(config), _DECODER_ABI):
        return None
    if (
        lib.WebPGetFeaturesInternal(data, len(data), ctypes.byref(config.input), _DECODER_ABI)
        != _VP8_STATUS_OK
    ):
        return None
    w, h = config.input.width, config.input.height
    factor = min(w, h) // max(int(min_side), 1)
    if config.input.has_animation or factor < 2:
        return None
    sw, sh = -(-w // factor), -(-h // factor)  # rounded up, as PIL's reduce and JPEG's draft
    alpha = bool(config.input.has_alpha)
    channels = 4 if alpha else 3
    pixels = np.empty((sh, sw, channels), np.uint8)  # [H, W, C], written by libwebp in place
    config.options.use_scaling = 1
    config.options.scaled_width = sw
    config.options.scaled_height = sh
    config.output.colorspace = _MODE_RGBA_PREMULTIPLIED if alpha else _MODE_RGB
    config.output.is_external_memory = 1
    config.output.u.RGBA.rgba = pixels.ctypes.data
    config.output.u.RGBA.stride = sw * channels
    config.output.u.RGBA.size = pixels.size
    if lib.WebPDecode(data, len(data), ctypes.byref(config)) != _VP8_STATUS_OK:
        return None
    return Image.frombytes("RGBa" if alpha else "RGB", (sw, sh), pixels.tobytes())
