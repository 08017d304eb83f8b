"""Camera RAW files: found by content, indexed from the JPEG preview the camera embedded when it
covers the model's input, else developed by LibRaw (``rawpy``).

Containers understood here, without LibRaw:

- TIFF-based: DNG (``DNGVersion`` tag), CR2 (``CR`` after the TIFF header), NEF, ARW, PEF, SRW and
  other TIFFs holding sensor data (a CFA or LinearRaw image, or a raw codec), ORF (``IIRO``/``MMOR``
  header) and RW2 (``IIU`` header). Previews are JPEGs referenced by ``JPEGInterchangeFormat``, or
  JPEG-compressed RGB/YCbCr strips, in IFD0, its chain and its SubIFDs; RW2's ``JpgFromRaw``.
- CR3 (ISO base media, brand ``crx``): the ``PRVW`` box (1620x1080 on Canon's cameras); its EXIF
  from the ``CMT1`` (IFD0), ``CMT2`` (Exif IFD) and ``CMT4`` (GPS) boxes.
- RAF (``FUJIFILMCCD-RAW``): the JPEG whose offset and length the header gives at bytes 84 and 88.

Why the preview first: a 24 MP RAW developed by LibRaw takes about a second and hundreds of MB;
its preview (at least 1620 px wide on every recent camera) decodes in milliseconds at the scale the
model needs, and is the camera's own rendering of the scene. LibRaw (``rawpy``, a dependency)
develops the files whose preview is smaller than the model's input, and finds the previews of
formats whose layout is not parsed here (ORF keeps its preview in the maker notes).

Every problem a file can cause is an :class:`~clipsearch.errors.ImageDecodeError`; offsets and
counts from the file are bounds-checked before use, and IFD loops end.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

from clipsearch.errors import ImageDecodeError

logger = logging.getLogger(__name__)

# The file types of camera RAW photos (``file_type`` in the library: the format from the content,
# named after its extension; "raw" for a TIFF-based raw no camera maker's name fits), and the
# extensions the indexer looks at (the format itself comes from the content). The one list: filters
# (``--type raw``) and the duplicates ranking read it too.
RAW_TYPES = ("dng", "cr2", "cr3", "crw", "nef", "nrw", "arw", "srf", "sr2", "orf", "rw2", "raf", "pef")
RAW_TYPES += ("srw", "rwl", "3fr", "iiq", "erf", "mef", "mos", "x3f", "raw")
RAW_EXTENSIONS = frozenset("." + t for t in RAW_TYPES if t != "raw")

MAX_IFDS = 64  # more than any camera writes; a longer chain is a loop or a hostile file
MAX_ENTRIES = 4096
_CR3_META_UUID = bytes.fromhex("85c0b687820f11e08111f4ce462b6a48")
_CR3_PREVIEW_UUID = bytes.fromhex("eaf42b5e1c984b88b9fbb7dc406e4d16")
_RAF_MAGIC = b"FUJIFILMCCD-RAW "
_RAW_COMPRESSIONS = {34713, 32767, 32769, 32770, 32773, 34316, 65000, 65535, 34892}
_CFA, _LINEAR_RAW = 32803, 34892
_JPEG_SOFS = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive: what PIL decodes (not lossless SOF3)


@dataclass
class RawFile:
    """What :func:`sniff` found: the format, the previews' ``(offset, length)`` and EXIF sources."""

    kind: str  # dng, cr2, cr3, nef, arw, orf, rw2, raf, ... or "raw" for an unnamed TIFF raw
    previews: list[tuple[int, int]] = field(default_factory=list)
    sensor_size: tuple[int, int] | None = None  # (width, height) of the sensor data, as stored
    orientation: int | None = None
    exif_blobs: list[bytes] = field(default_factory=list)  # TIFF blocks whose IFD0 is EXIF (CR3)
    inline_previews: list[bytes] = field(default_factory=list)  # JPEGs stored inside a tag (RW2)


# --- reading the containers -----------------------------------------------------------------------


def _read_at(f, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def _file_size(f) -> int:
    here = f.tell()
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(here)
    return size


_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}


def _ifd(f, offset: int, endian: str, size: int) -> tuple[dict[int, tuple], int]:
    """One IFD: ``{tag: values}`` (integers only; other types as their raw bytes) and the next offset."""
    if offset <= 0 or offset + 2 > size:
        return {}, 0
    (count,) = struct.unpack(endian + "H", _read_at(f, offset, 2))
    if count > MAX_ENTRIES or offset + 2 + 12 * count > size:
        return {}, 0
    data = _read_at(f, offset + 2, 12 * count + 4)
    tags: dict[int, tuple] = {}
    for i in range(count):
        tag, typ, n, value = struct.unpack(endian + "HHI4s", data[12 * i : 12 * i + 12])
        width = _TYPE_SIZES.get(typ)
        if width is None or n > 1 << 20:
            continue
        nbytes = width * n
        if nbytes <= 4:
            raw = value[:nbytes]
        else:
            (where,) = struct.unpack(endian + "I", value)
            if where + nbytes > size:
                continue
            raw = _read_at(f, where, nbytes)
        if typ in (3, 8):
            tags[tag] = struct.unpack(f"{endian}{n}H", raw)
        elif typ in (4, 9, 13):
            tags[tag] = struct.unpack(f"{endian}{n}I", raw)
        elif typ == 1:
            tags[tag] = tuple(raw)
        else:
            tags[tag] = (raw,)
    (next_ifd,) = struct.unpack(endian + "I", data[12 * count : 12 * count + 4])
    return tags, next_ifd


def _first(tags: dict, tag: int, default=None):
    v = tags.get(tag)
    return v[0] if v and isinstance(v[0], int) else default


def _jpeg_is_decodable(head: bytes) -> bool:
    """A JPEG PIL can decode: SOI, then a baseline/extended/progressive frame (lossless is raw data)."""
    if not head.startswith(b"\xff\xd8"):
        return False
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return False
        marker = head[i + 1]
        if marker in _JPEG_SOFS:
            return True
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return False  # lossless or arithmetic: sensor data, not a picture
        (length,) = struct.unpack(">H", head[i + 2 : i + 4])
        i += 2 + length
    return False


def _tiff_raw(f, head: bytes, path: Path | None) -> RawFile | None:
    endian = "<" if head[:2] == b"II" else ">"
    magic = struct.unpack(endian + "H", head[2:4])[0]
    kind = {0x4F52: "orf", 0x5352: "orf", 0x55: "rw2"}.get(magic)
    if magic != 42 and kind is None:
        return None
    size = _file_size(f)
    (first,) = struct.unpack(endian + "I", head[4:8])
    todo, seen = [first], set()
    ifds: list[dict] = []
    while todo and len(ifds) < MAX_IFDS:
        offset = todo.pop(0)
        if offset in seen or not offset:
            continue
        seen.add(offset)
        tags, following = _ifd(f, offset, endian, size)
        if not tags:
            continue
        ifds.append(tags)
        todo.append(following)
        todo += [o for o in tags.get(0x014A, ()) if isinstance(o, int)]  # SubIFDs
    if not ifds:
        return None
    ifd0 = ifds[0]
    is_raw = kind is not None
    if 0xC612 in ifd0:
        kind = "dng"
    elif head[8:10] == b"CR":
        kind = "cr2"
    found = RawFile(kind or "raw", orientation=_first(ifd0, 0x0112))
    for tags in ifds:
        photometric = _first(tags, 0x0106)
        compression = _first(tags, 0x0103)
        w, h = _first(tags, 0x0100), _first(tags, 0x0101)
        sensor = photometric in (_CFA, _LINEAR_RAW) or compression in _RAW_COMPRESSIONS
        if sensor:
            is_raw = True
            if w and h and (found.sensor_size is None or w * h > found.sensor_size[0] * found.sensor_size[1]):
                found.sensor_size = (w, h)
        if 0x0201 in tags and 0x0202 in tags:
            found.previews.append((_first(tags, 0x0201, 0), _first(tags, 0x0202, 0)))
        elif compression in (6, 7) and photometric in (2, 6) and 0x0111 in tags and 0x0117 in tags:
            offsets, counts = tags[0x0111], tags[0x0117]
            if len(offsets) == 1 and len(counts) == 1:
                found.previews.append((offsets[0], counts[0]))
    if kind == "rw2" and 0x002E in ifd0:  # JpgFromRaw, stored inline as UNDEFINED
        blob = ifd0[0x002E][0]
        if isinstance(blob, bytes):
            found.inline_previews.append(blob)
    if not is_raw:
        return None  # a plain TIFF (scanner, export): PIL reads it
    if found.kind == "raw" and path is not None and Path(path).suffix.lower() in RAW_EXTENSIONS:
        found.kind = Path(path).suffix.lower()[1:]
    found.previews = [(o, n) for o, n in found.previews if 0 < o and 0 < n and o + n <= size]
    return found


def _boxes(f, start: int, end: int):
    """ISO base media boxes ``(type, payload offset, payload end)`` between two offsets."""
    at = start
    while at + 8 <= end:
        f.seek(at)
        size, kind = struct.unpack(">I4s", f.read(8))
        header = 8
        if size == 1:
            size = struct.unpack(">Q", f.read(8))[0]
            header = 16
        elif size == 0:
            size = end - at
        if size < header or at + size > end:
            return
        yield kind, at + header, at + size
        at += size


def _cr3(f) -> RawFile:
    size = _file_size(f)
    found = RawFile("cr3")
    for kind, start, end in _boxes(f, 0, size):
        if kind == b"moov":
            for sub, s2, e2 in _boxes(f, start, end):
                if sub == b"uuid" and _read_at(f, s2, 16) == _CR3_META_UUID:
                    for box, s3, e3 in _boxes(f, s2 + 16, e2):
                        if box in (b"CMT1", b"CMT2", b"CMT4") and e3 - s3 <= 1 << 20:
                            found.exif_blobs.append(box + _read_at(f, s3, e3 - s3))
        elif kind == b"uuid" and _read_at(f, start, 16) == _CR3_PREVIEW_UUID:
            for box, s2, e2 in _boxes(f, start + 24, end):  # the uuid, then 8 bytes of Canon's own
                if box == b"PRVW" and e2 - s2 > 16:
                    (length,) = struct.unpack(">I", _read_at(f, s2 + 12, 4))
                    if s2 + 16 + length <= e2:
                        found.previews.append((s2 + 16, length))
    return found


def _raf(f) -> RawFile | None:
    header = _read_at(f, 0, 92)
    if len(header) < 92:
        return None
    offset, length = struct.unpack(">II", header[84:92])
    found = RawFile("raf")
    if offset and length and offset + length <= _file_size(f):
        found.previews.append((offset, length))
    return found


def sniff(f, path: Path | str | None = None) -> RawFile | None:
    """The RAW container in the seekable binary file ``f``, or None when it is not a RAW file.

    ``path`` only names TIFF-based formats that nothing inside names (``.nef``, ``.arw``...).
    Leaves ``f`` where it was.
    """
    start = f.tell()
    try:
        head = f.read(16)
        if head[:2] in (b"II", b"MM") and len(head) >= 8:
            return _tiff_raw(f, head, Path(path) if path is not None else None)
        if head[4:12] == b"ftypcrx ":
            return _cr3(f)
        if head.startswith(_RAF_MAGIC):
            return _raf(f)
        return None
    except (OSError, struct.error, ValueError):
        return None  # not a container we can walk: the regular decoders have their say
    finally:
        f.seek(start)


# --- previews, metadata and pixels ----------------------------------------------------------------


def _previews(f, found: RawFile) -> list[tuple[int, int, bytes]]:
    """Decodable previews ``(width, height, jpeg bytes)``, largest first."""
    from PIL import Image

    out = []
    blobs = [_read_at(f, *where) for where in found.previews] + found.inline_previews
    for data in blobs:
        if not _jpeg_is_decodable(data[:65536]):
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                out.append((im.size[0], im.size[1], data))
        except Exception:  # a broken preview: the next one, or LibRaw
            logger.debug("an unreadable preview in a %s file", found.kind, exc_info=True)
    return sorted(out, key=lambda p: -p[0] * p[1])


class _SplitExif:
    """IFD0, Exif and GPS IFDs read from separate TIFF blocks (CR3), shaped like a PIL ``Exif``."""

    def __init__(self, ifd0: dict, exif: dict, gps: dict):
        self._ifds = {0x8769: exif, 0x8825: gps}
        self._ifd0 = ifd0

    def get(self, tag, default=None):
        return self._ifd0.get(tag, default)

    def get_ifd(self, tag):
        return self._ifds.get(tag, {})


def _exif_of(f, found: RawFile):
    """The container's EXIF as a PIL ``Exif`` (or look-alike), None when it has none."""
    from PIL import Image

    if found.kind == "cr3":
        parts = {}
        for blob in found.exif_blobs:
            exif = Image.Exif()
            try:
                exif.load(blob[4:])
            except Exception:
                continue
            parts[blob[:4]] = dict(exif)
        if not parts:
            return None
        return _SplitExif(parts.get(b"CMT1", {}), parts.get(b"CMT2", {}), parts.get(b"CMT4", {}))
    if found.kind == "raf":
        return None  # its EXIF is in the preview JPEG
    f.seek(0)
    data = f.read()
    exif = Image.Exif()
    exif.load(b"II*\x00" + data[4:] if data[:2] == b"II" else b"MM\x00*" + data[4:])  # ORF/RW2 magic
    return exif


def read_metadata(f, found: RawFile, path: Path | None):
    """:class:`clipsearch.metadata.PhotoMetadata` of a RAW file: the container's EXIF, then the
    preview's, then XMP sidecars; the size is the sensor's (else the largest preview's), upright."""
    from PIL import Image

    from clipsearch import metadata

    sources = []
    try:
        sources.append(metadata._from_exif(_exif_of(f, found)))
    except Exception:
        logger.debug("unreadable EXIF in RAW file %s", path, exc_info=True)
    previews = _previews(f, found)
    if previews:
        try:
            with Image.open(io.BytesIO(previews[0][2])) as im:
                sources.append(metadata._from_exif(im.getexif()))
        except Exception:
            logger.debug("unreadable EXIF in the preview of %s", path, exc_info=True)
    fields = metadata.with_sidecar(sources, metadata._sidecar_xmp(path))
    orientation = found.orientation or fields.get("orientation")
    size = found.sensor_size or (previews[0][:2] if previews else None)
    w, h = size if size else (None, None)
    if w and orientation in (5, 6, 7, 8):
        w, h = h, w
    fields["orientation"] = orientation if orientation in range(1, 9) else None
    return metadata.PhotoMetadata.from_fields(fields, width=w, height=h, file_type=found.kind)


def rawpy_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("rawpy") is not None


def open_raw(f, found: RawFile, name, max_pixels: int | None, draft_size: int | None):
    """An upright RGB ``PIL.Image`` of the RAW file ``f``: the largest embedded preview when its
    shorter side covers ``draft_size`` (any preview when ``draft_size`` is None), else LibRaw's
    development (at half size when that still covers it). Logs which way answered."""
    previews = _previews(f, found)
    best = previews[0] if previews else None
    if best is not None and (draft_size is None or min(best[:2]) >= draft_size):
        logger.debug("%s: %s preview %dx%d", name, found.kind, best[0], best[1])
        return _decode_preview(best, found, name, max_pixels, draft_size)
    if rawpy_available():
        logger.debug(
            "%s: %s preview too small (%s); developing with LibRaw", name, found.kind, best and best[:2]
        )
        return _develop(f, found, name, max_pixels, draft_size)
    if best is not None:
        logger.info(
            "%s: preview %dx%d is below the model's input and rawpy is missing: using it", name, *best[:2]
        )
        return _decode_preview(best, found, name, max_pixels, draft_size)
    raise ImageDecodeError(name, "unsupported RAW", "no usable preview inside; install rawpy to develop it")


def _decode_preview(best, found: RawFile, name, max_pixels, draft_size):
    from clipsearch.imageio import open_image

    data = best[2]
    im = open_image(io.BytesIO(data), max_pixels=max_pixels, draft_size=draft_size)
    try:
        has_own = _pil_orientation(data) is not None
    except Exception:
        has_own = False
    if not has_own and found.orientation in range(2, 9):
        im = _orient(im, found.orientation)
    return im


def _pil_orientation(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.getexif().get(0x0112)


def _orient(im, orientation: int):
    """Apply an EXIF orientation (1-8) that lives in the container, not in the preview."""
    from PIL import Image

    ops = {
        2: [Image.Transpose.FLIP_LEFT_RIGHT],
        3: [Image.Transpose.ROTATE_180],
        4: [Image.Transpose.FLIP_TOP_BOTTOM],
        5: [Image.Transpose.TRANSPOSE],
        6: [Image.Transpose.ROTATE_270],
        7: [Image.Transpose.TRANSVERSE],
        8: [Image.Transpose.ROTATE_90],
    }[orientation]
    info = dict(im.info)
    for op in ops:
        im = im.transpose(op)
    im.info.update(info)
    turned = orientation in (5, 6, 7, 8)
    from clipsearch.imageio import FULL_SIZE_KEY

    if FULL_SIZE_KEY in info and turned:
        im.info[FULL_SIZE_KEY] = tuple(info[FULL_SIZE_KEY])[::-1]
    return im


def _develop(f, found: RawFile, name, max_pixels, draft_size):
    import rawpy
    from PIL import Image

    from clipsearch.imageio import FULL_SIZE_KEY

    f.seek(0)
    try:
        with rawpy.imread(io.BytesIO(f.read())) as raw:
            sizes = raw.sizes
            if max_pixels is not None and sizes.raw_width * sizes.raw_height > max_pixels:
                raise ImageDecodeError(name, "too many pixels", f"{sizes.raw_width}x{sizes.raw_height}")
            half = draft_size is not None and min(sizes.width, sizes.height) // 2 >= draft_size
            rgb = raw.postprocess(use_camera_wb=True, half_size=half, output_bps=8)  # [H, W, 3] uint8
    except ImageDecodeError:
        raise
    except Exception as e:  # LibRawError subclasses, MemoryError on absurd headers
        raise ImageDecodeError(name, "corrupt", f"LibRaw: {type(e).__name__}: {e}") from e
    im = Image.fromarray(rgb, "RGB")
    full = (sizes.width, sizes.height) if sizes.flip not in (5, 6) else (sizes.height, sizes.width)
    im.info[FULL_SIZE_KEY] = full
    return im
