"""Photo files made for the tests: JPEG/PNG/WebP with EXIF (dates, camera, GPS) written by Pillow,
and camera RAW containers built byte by byte after their published layouts:

- DNG: a TIFF whose IFD0 is a JPEG preview (YCbCr, compression 7) with ``DNGVersion``, ``Make``,
  ``Model``, ``Orientation``, an Exif IFD and a GPS IFD, and a SubIFD of 16-bit Bayer CFA sensor
  data with the colour tags LibRaw needs to develop it.
- CR3: ISO base media with brand ``crx``, a ``moov`` holding Canon's metadata ``uuid`` box with
  ``CMT1`` (IFD0), ``CMT2`` (Exif IFD), ``CMT4`` (GPS) TIFF blocks, and the preview ``uuid`` box with
  a ``PRVW`` JPEG. It carries no CRX sensor data (LibRaw could not develop it; it is not asked to).
- RAF: Fujifilm's 160-byte-aligned header with the JPEG offset and length at bytes 84 and 88.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from e2e_helpers import scene


def exif_bytes(
    taken: str | None = None,
    offset: str | None = None,
    make: str | None = None,
    model: str | None = None,
    lens: str | None = None,
    gps: tuple[float, float] | None = None,
    orientation: int | None = None,
    gps_utc: tuple[str, tuple[float, float, float]] | None = None,
) -> bytes:
    """An EXIF block (Pillow's writer) with the given fields; ``gps`` in signed decimal degrees."""
    from PIL import Image

    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    if orientation:
        exif[0x0112] = orientation
    sub = exif.get_ifd(0x8769)
    if taken:
        sub[0x9003] = taken
    if offset:
        sub[0x9011] = offset
    if lens:
        sub[0xA434] = lens
    if gps or gps_utc:
        g = exif.get_ifd(0x8825)
        if gps:
            lat, lon = gps
            g[1], g[2] = ("N" if lat >= 0 else "S"), _dms(abs(lat))
            g[3], g[4] = ("E" if lon >= 0 else "W"), _dms(abs(lon))
        if gps_utc:
            g[29], g[7] = gps_utc
    return exif.tobytes()


def _dms(value: float) -> tuple[float, float, float]:
    d = int(value)
    m = int((value - d) * 60)
    s = round((value - d - m / 60) * 3600, 4)
    return (float(d), float(m), s)


def write_exif_photo(path: Path, seed: int, size=(96, 72), fmt: str | None = None, **exif) -> Path:
    """Scene ``seed`` saved at ``path`` with an EXIF block made by :func:`exif_bytes`."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF"}[path.suffix.lower()]
    Image.fromarray(scene(seed, size)).save(path, format=fmt, exif=exif_bytes(**exif) if exif else b"")
    return path


def jpeg_bytes(seed: int, size: tuple[int, int], quality: int = 90, exif: bytes | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(scene(seed, size)).save(buf, format="JPEG", quality=quality, exif=exif or b"")
    return buf.getvalue()


# --- TIFF writing ---------------------------------------------------------------------------------

_SHORT, _LONG, _ASCII, _RATIONAL, _SRATIONAL, _BYTE, _UNDEFINED = 3, 4, 2, 5, 10, 1, 7


class _Tiff:
    """A little-endian TIFF laid out in one pass: IFDs are placed first, their data after them."""

    def __init__(self, header: bytes = b"II*\x00"):
        self.header = header
        self.blobs: list[bytes] = []

    def build(self, ifds: list[list[tuple]], blobs: dict[str, bytes]) -> bytes:
        """``ifds``: lists of ``(tag, type, values)``; a value ``("blob", name)`` or ``("ifd", k)``
        is the offset of a blob or of IFD k. IFD k+1 chains after IFD k only if ``chain`` says so."""
        # layout: header, IFDs, then every out-of-line value and blob
        sizes = [2 + 12 * len(entries) + 4 for entries in ifds]
        ifd_offsets = []
        at = 8
        for size in sizes:
            ifd_offsets.append(at)
            at += size
        blob_offsets = {}
        for name, data in blobs.items():
            at += at % 2
            blob_offsets[name] = at
            at += len(data)
        extra = bytearray()
        extra_start = at
        out = bytearray(self.header + struct.pack("<I", ifd_offsets[0]))
        for entries in ifds:
            body = struct.pack("<H", len(entries))
            for tag, typ, values in sorted(entries, key=lambda e: e[0]):
                if isinstance(values, tuple) and values and values[0] == "blob":
                    values = [blob_offsets[values[1]]]
                elif isinstance(values, tuple) and values and values[0] == "ifd":
                    values = [ifd_offsets[values[1]]]
                data = _pack(typ, values)
                count = len(values) if typ not in (_ASCII, _UNDEFINED) else len(data)
                if len(data) <= 4:
                    field = data.ljust(4, b"\x00")
                else:
                    if len(extra) % 2:
                        extra += b"\x00"
                    field = struct.pack("<I", extra_start + len(extra))
                    extra += data
                body += struct.pack("<HHI", tag, typ, count) + field
            body += struct.pack("<I", 0)
            out += body
        for name, data in blobs.items():
            out += b"\x00" * (blob_offsets[name] - len(out))
            out += data
        out += extra
        return bytes(out)


def _pack(typ: int, values) -> bytes:
    if typ == _ASCII:
        return values.encode() + b"\x00"
    if typ == _UNDEFINED:
        return bytes(values)
    if typ == _SHORT:
        return struct.pack(f"<{len(values)}H", *values)
    if typ == _LONG:
        return struct.pack(f"<{len(values)}I", *values)
    if typ == _BYTE:
        return bytes(values)
    if typ in (_RATIONAL, _SRATIONAL):
        fmt = "<ii" if typ == _SRATIONAL else "<II"
        return b"".join(struct.pack(fmt, round(v * 10000), 10000) for v in values)
    raise ValueError(typ)


def _exif_ifds(taken, make, model, gps):
    exif = [(0x9003, _ASCII, taken)] if taken else [(0x9000, _UNDEFINED, list(b"0232"))]
    lat, lon = gps if gps else (None, None)
    gps_ifd = []
    if gps:
        gps_ifd = [
            (1, _ASCII, "N" if lat >= 0 else "S"),
            (2, _RATIONAL, list(_dms(abs(lat)))),
            (3, _ASCII, "E" if lon >= 0 else "W"),
            (4, _RATIONAL, list(_dms(abs(lon)))),
        ]
    return exif, gps_ifd


def make_dng(
    path: Path,
    seed: int,
    preview_size: tuple[int, int] = (160, 120),
    sensor_size: tuple[int, int] = (96, 64),
    taken: str | None = "2021:03:04 05:06:07",
    make: str = "Leica Camera AG",
    model: str = "LEICA Q2",
    gps: tuple[float, float] | None = (51.5007, -0.1246),
    orientation: int = 1,
) -> Path:
    """A DNG with a JPEG preview of scene ``seed`` and a Bayer mosaic of the same scene."""
    preview = jpeg_bytes(seed, preview_size)
    w, h = sensor_size
    rgb = scene(seed, (w, h)).astype(np.uint16) * 257  # [H, W, 3], 16-bit
    mosaic = np.zeros((h, w), np.uint16)  # RGGB
    mosaic[0::2, 0::2] = rgb[0::2, 0::2, 0]
    mosaic[0::2, 1::2] = rgb[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = rgb[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = rgb[1::2, 1::2, 2]
    sensor = mosaic.astype("<u2").tobytes()
    exif, gps_ifd = _exif_ifds(taken, make, model, gps)
    ifd0 = [
        (0x00FE, _LONG, [1]),  # a reduced-resolution image: the preview
        (0x0100, _LONG, [preview_size[0]]),
        (0x0101, _LONG, [preview_size[1]]),
        (0x0102, _SHORT, [8, 8, 8]),
        (0x0103, _SHORT, [7]),  # JPEG
        (0x0106, _SHORT, [6]),  # YCbCr
        (0x010F, _ASCII, make),
        (0x0110, _ASCII, model),
        (0x0111, _LONG, ("blob", "preview")),
        (0x0112, _SHORT, [orientation]),
        (0x0115, _SHORT, [3]),
        (0x0116, _LONG, [preview_size[1]]),
        (0x0117, _LONG, [len(preview)]),
        (0x014A, _LONG, ("ifd", 1)),  # SubIFDs: the sensor data
        (0x8769, _LONG, ("ifd", 2)),
        (0xC612, _BYTE, [1, 4, 0, 0]),  # DNGVersion
        (0xC613, _BYTE, [1, 1, 0, 0]),
        (0xC614, _ASCII, model),  # UniqueCameraModel
        (0xC621, _SRATIONAL, [1, 0, 0, 0, 1, 0, 0, 0, 1]),  # ColorMatrix1
        (0xC628, _RATIONAL, [1, 1, 1]),  # AsShotNeutral
        (0xC65A, _SHORT, [21]),  # CalibrationIlluminant1: D65
    ]
    if gps_ifd:
        ifd0.append((0x8825, _LONG, ("ifd", 3)))
    raw_ifd = [
        (0x00FE, _LONG, [0]),
        (0x0100, _LONG, [w]),
        (0x0101, _LONG, [h]),
        (0x0102, _SHORT, [16]),
        (0x0103, _SHORT, [1]),
        (0x0106, _SHORT, [32803]),  # CFA
        (0x0111, _LONG, ("blob", "sensor")),
        (0x0115, _SHORT, [1]),
        (0x0116, _LONG, [h]),
        (0x0117, _LONG, [len(sensor)]),
        (0x011C, _SHORT, [1]),
        (0x828D, _SHORT, [2, 2]),  # CFARepeatPatternDim
        (0x828E, _BYTE, [0, 1, 1, 2]),  # CFAPattern: RGGB
        (0xC61A, _LONG, [0]),  # BlackLevel
        (0xC61D, _LONG, [65535]),  # WhiteLevel
    ]
    ifds = [ifd0, raw_ifd, exif] + ([gps_ifd] if gps_ifd else [])
    data = _Tiff().build(ifds, {"preview": preview, "sensor": sensor})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _tiff_block(entries: list[tuple]) -> bytes:
    return _Tiff().build([entries], {})


def make_cr3(
    path: Path,
    seed: int,
    preview_size: tuple[int, int] = (1620, 1080),
    taken: str = "2022:08:09 10:11:12",
    model: str = "Canon EOS R6",
    gps: tuple[float, float] | None = (40.6892, -74.0445),
) -> Path:
    """A CR3 container: metadata boxes and a PRVW preview of scene ``seed`` (no sensor data)."""
    preview = jpeg_bytes(seed, preview_size)
    exif, gps_ifd = _exif_ifds(taken, "Canon", model, gps)
    cmt1 = _tiff_block([(0x010F, _ASCII, "Canon"), (0x0110, _ASCII, model), (0x0112, _SHORT, [1])])
    meta = _box(b"CMT1", cmt1) + _box(b"CMT2", _tiff_block(exif))
    if gps_ifd:
        meta += _box(b"CMT4", _tiff_block(gps_ifd))
    moov = _box(b"moov", _box(b"uuid", bytes.fromhex("85c0b687820f11e08111f4ce462b6a48") + meta))
    prvw = _box(
        b"PRVW",
        struct.pack(">IHHHHI", 0, 1, preview_size[0], preview_size[1], 1, len(preview)) + preview,
    )
    preview_box = _box(b"uuid", bytes.fromhex("eaf42b5e1c984b88b9fbb7dc406e4d16") + b"\x00" * 8 + prvw)
    ftyp = _box(b"ftyp", b"crx \x00\x00\x00\x01crx isom")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ftyp + moov + preview_box)
    return path


def make_raf(
    path: Path,
    seed: int,
    preview_size: tuple[int, int] = (1920, 1280),
    taken: str = "2020:02:03 04:05:06",
    model: str = "X-T4",
) -> Path:
    """A RAF file: Fujifilm's header, then a JPEG preview carrying the EXIF (as the cameras do)."""
    preview = jpeg_bytes(seed, preview_size, exif=exif_bytes(taken=taken, make="FUJIFILM", model=model))
    header = bytearray(b"FUJIFILMCCD-RAW 0201FF383501" + model.encode().ljust(32, b"\x00"))
    header += b"0100" + b"\x00" * 20
    offset = 160
    header += struct.pack(">II", offset, len(preview))
    header = bytes(header).ljust(offset, b"\x00")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + preview + b"\x00" * 64)
    return path
