"""What a photo says about itself: when, where and with which camera it was taken, read at index time.

Sources, most trusted first: EXIF (IFD0, the Exif sub-IFD, the GPS IFD), then the XMP packet
embedded in the file (Lightroom, darktable and phones write ``exif:``/``tiff:``/``photoshop:``
properties there), then an XMP sidecar beside it (``photo.jpg.xmp`` or ``photo.xmp``), except for
the capture time, which a sidecar corrects (:func:`with_sidecar`). Only headers
are read: no pixel is decoded, so a library indexed before metadata existed fills it in on its next
index run without embedding anything again (:data:`METADATA_VERSION` says which rows are stale).

Conventions:

- ``taken_at`` is the wall-clock time the photo was taken, ISO 8601 to the second
  (``2024-06-01T18:30:00``), followed by the UTC offset when the file records it
  (``OffsetTimeOriginal``) or when the GPS clock (UTC) gives it (``+02:00``). Date filters compare
  the wall-clock part: a photo taken on the evening of 1 June in Tokyo was taken on 1 June.
- ``lat``/``lon`` are decimal degrees (WGS 84, south and west negative). A position of exactly
  (0, 0) is what cameras without a fix write, so it counts as unknown.
- ``file_type`` comes from the content (``jpeg``, ``png``, ``heif``, ``dng``, ``cr3``...), never the
  name, except for RAW formats that are plain TIFF inside (NEF, ARW, PEF...), named by extension.
- Every field is ``None`` when unknown; a malformed block loses its fields, never the photo.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

logger = logging.getLogger(__name__)

# Bump when extraction learns something new: rows read by an older version are read again (headers
# only) on the next index run.
METADATA_VERSION = 1

MAX_XMP_BYTES = 1 << 20  # an embedded packet or sidecar larger than this is not parsed

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_MAKE, _MODEL, _ORIENTATION = 0x010F, 0x0110, 0x0112
_DATE_ORIGINAL, _DATE_DIGITIZED = 0x9003, 0x9004
_OFFSET_ORIGINAL, _OFFSET_DIGITIZED = 0x9011, 0x9012
_LENS_MODEL, _LENS_MAKE = 0xA434, 0xA433
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON, _GPS_TIME, _GPS_DATE = 1, 2, 3, 4, 7, 29

# PIL's format names -> ours (what --type matches, after its own aliases)
_PIL_TYPES = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "TIFF": "tiff"}
_PIL_TYPES |= {"BMP": "bmp", "HEIF": "heif", "AVIF": "avif", "DIB": "bmp"}

_XMP_NS = {
    "exif": "http://ns.adobe.com/exif/1.0/",
    "exifEX": "http://cipa.jp/exif/1.0/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "aux": "http://ns.adobe.com/exif/1.0/aux/",
}


@dataclass(frozen=True)
class PhotoMetadata:
    """What is known about one photo; every field ``None`` when unknown (see the module doc)."""

    taken_at: str | None = None
    make: str | None = None
    model: str | None = None
    lens: str | None = None
    lat: float | None = None
    lon: float | None = None
    orientation: int | None = None
    width: int | None = None  # upright, in pixels
    height: int | None = None
    file_type: str | None = None
    sidecar_mtime_ns: int | None = None  # :func:`sidecar_stamp` as the metadata was read

    @classmethod
    def from_fields(cls, fields: dict, **known) -> PhotoMetadata:
        """The header fields that :func:`merge` gathered, with what the caller knows beside them
        (``width``, ``height``, ``file_type``, and ``orientation`` where it has a better source)."""
        names = ("taken_at", "make", "model", "lens", "lat", "lon", "orientation")
        return cls(**{name: fields.get(name) for name in names}, **known)

    @property
    def camera(self) -> str | None:
        return camera_name(self.make, self.model)


def camera_name(make: str | None, model: str | None) -> str | None:
    """``Canon`` + ``Canon EOS R5`` -> ``Canon EOS R5``; ``Apple`` + ``iPhone 13`` -> ``Apple iPhone 13``.

    The make is left out when the model already starts with its first word (``NIKON CORPORATION``
    + ``NIKON D850`` -> ``NIKON D850``)."""
    if not model:
        return make or None
    if not make:
        return model
    first = make.split()[0].lower()
    return model if model.lower().startswith(first) else f"{make} {model}"


# --- EXIF -----------------------------------------------------------------------------------------


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", " ").strip()
    return value or None


def _parse_exif_datetime(raw) -> datetime | None:
    text = _text(raw)
    if text is None:
        return None
    try:
        return datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None  # "0000:00:00 00:00:00" or blanks: the camera's clock was never set


def _offset(raw) -> str | None:
    text = _text(raw)
    if text and re.fullmatch(r"[+-]\d\d:\d\d", text) and int(text[1:3]) <= 14:
        return text
    return None


def _float(value) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if math.isfinite(f) else None


def _dms(value, ref) -> float | None:
    """An EXIF GPS coordinate (degrees, minutes, seconds as rationals) and its N/S/E/W reference."""
    if not isinstance(value, tuple | list) or not value:
        return None
    parts = [_float(v) for v in value[:3]]
    if any(p is None for p in parts):
        return None
    parts += [0.0] * (3 - len(parts))
    degrees = parts[0] + parts[1] / 60 + parts[2] / 3600
    if (_text(ref) or "").upper()[:1] in ("S", "W"):
        degrees = -degrees
    return degrees


def _position(lat: float | None, lon: float | None) -> tuple[float | None, float | None]:
    if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180) or (lat == lon == 0):
        return None, None
    return round(lat, 7), round(lon, 7)


def _gps_offset(local: datetime, gps: dict) -> str | None:
    """The UTC offset implied by the GPS clock (UTC) and the camera's local time, to 15 minutes."""
    date = _text(gps.get(_GPS_DATE))
    hms = gps.get(_GPS_TIME)
    if not date or not isinstance(hms, tuple | list) or len(hms) != 3:
        return None
    parts = [_float(v) for v in hms]
    if any(p is None for p in parts):
        return None
    try:
        utc = datetime.strptime(date[:10], "%Y:%m:%d") + timedelta(
            hours=parts[0], minutes=parts[1], seconds=parts[2]
        )
    except (ValueError, OverflowError):
        return None
    minutes = round((local - utc).total_seconds() / 900) * 15
    if abs(minutes) > 14 * 60:
        return None  # not the same moment: a GPS fix from another day
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def exif_taken_at(exif) -> str | None:
    """When the photo was taken, from a PIL ``Exif``: ISO 8601, with the UTC offset when known."""
    if exif is None:
        return None
    sub = exif.get_ifd(_EXIF_IFD)
    local = _parse_exif_datetime(sub.get(_DATE_ORIGINAL))
    offset = _offset(sub.get(_OFFSET_ORIGINAL))
    if local is None:
        local = _parse_exif_datetime(sub.get(_DATE_DIGITIZED))
        offset = _offset(sub.get(_OFFSET_DIGITIZED))
    if local is None:
        return None
    if offset is None:
        try:
            offset = _gps_offset(local, exif.get_ifd(_GPS_IFD))
        except Exception:  # a broken GPS block only costs the offset
            offset = None
    return local.isoformat() + (offset or "")


def _from_exif(exif) -> dict:
    out: dict = {}
    if exif is None:
        return out
    out["make"] = _text(exif.get(_MAKE))
    out["model"] = _text(exif.get(_MODEL))
    orientation = exif.get(_ORIENTATION)
    out["orientation"] = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else None
    try:
        out["taken_at"] = exif_taken_at(exif)
    except Exception:
        logger.debug("unreadable EXIF date", exc_info=True)
    try:
        sub = exif.get_ifd(_EXIF_IFD)
        lens = _text(sub.get(_LENS_MODEL))
        lens_make = _text(sub.get(_LENS_MAKE))
        if lens and lens_make and not lens.lower().startswith(lens_make.split()[0].lower()):
            lens = f"{lens_make} {lens}"
        out["lens"] = lens
    except Exception:
        logger.debug("unreadable EXIF lens", exc_info=True)
    try:
        gps = exif.get_ifd(_GPS_IFD)
        lat = _dms(gps.get(_GPS_LAT), gps.get(_GPS_LAT_REF))
        lon = _dms(gps.get(_GPS_LON), gps.get(_GPS_LON_REF))
        out["lat"], out["lon"] = _position(lat, lon)
    except Exception:
        logger.debug("unreadable EXIF GPS block", exc_info=True)
    return {k: v for k, v in out.items() if v is not None}


# --- XMP ------------------------------------------------------------------------------------------


def _xmp_coordinate(text: str | None) -> float | None:
    """XMP's ``"51,30.25N"`` or ``"51,30,15N"`` (degrees, minutes[, seconds], direction)."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?),(\d+(?:\.\d+)?)(?:,(\d+(?:\.\d+)?))?\s*([NSEWnsew])\s*", text)
    if not m:
        return None
    value = float(m[1]) + float(m[2]) / 60 + float(m[3] or 0) / 3600
    return -value if m[4].upper() in "SW" else value


def _xmp_date(text: str | None) -> str | None:
    """An XMP date (ISO 8601, maybe without seconds, maybe with ``Z`` or an offset) in our form."""
    if not text:
        return None
    m = re.fullmatch(
        r"\s*(\d{4})-(\d\d)-(\d\d)(?:T(\d\d):(\d\d)(?::(\d\d))?(?:\.\d+)?)?(Z|[+-]\d\d:\d\d)?\s*", text
    )
    if not m:
        return None
    try:
        local = datetime(int(m[1]), int(m[2]), int(m[3]), int(m[4] or 0), int(m[5] or 0), int(m[6] or 0))
    except ValueError:
        return None
    zone = m[7]
    if zone == "Z":
        zone = "+00:00"
    return local.isoformat() + (zone if zone and m[4] else "")


def parse_xmp(packet: bytes | str | None) -> dict:
    """Metadata fields found in an XMP packet (attributes or elements of ``rdf:Description``)."""
    import xml.etree.ElementTree as ET

    if not packet:
        return {}
    if isinstance(packet, str):
        packet = packet.encode("utf-8", "replace")
    if len(packet) > MAX_XMP_BYTES or b"<!ENTITY" in packet or b"<!DOCTYPE" in packet:
        return {}  # real packets have neither; entity definitions are how XML bombs expand
    start = packet.find(b"<x:xmpmeta")
    if start < 0:
        start = packet.find(b"<rdf:RDF")
    end_meta = packet.rfind(b"</x:xmpmeta>")
    if start < 0:
        return {}
    body = packet[start : end_meta + len(b"</x:xmpmeta>")] if end_meta > start else packet[start:]
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return {}
    values: dict[str, str] = {}
    for element in root.iter():
        for key, value in element.attrib.items():
            values.setdefault(key, value)
        if element.text and element.text.strip() and not len(element):
            values.setdefault(element.tag, element.text.strip())

    def get(prefix: str, name: str) -> str | None:
        return values.get(f"{{{_XMP_NS[prefix]}}}{name}")

    out: dict = {
        "taken_at": _xmp_date(get("exif", "DateTimeOriginal"))
        or _xmp_date(get("photoshop", "DateCreated"))
        or _xmp_date(get("xmp", "CreateDate")),
        "make": _text(get("tiff", "Make")),
        "model": _text(get("tiff", "Model")),
        "lens": _text(get("exifEX", "LensModel")) or _text(get("aux", "Lens")),
    }
    out["lat"], out["lon"] = _position(
        _xmp_coordinate(get("exif", "GPSLatitude")), _xmp_coordinate(get("exif", "GPSLongitude"))
    )
    return {k: v for k, v in out.items() if v is not None}


def _embedded_xmp(im) -> bytes | None:
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    if xmp is None and hasattr(im, "tag_v2"):
        xmp = im.tag_v2.get(700)  # TIFF's XMP tag
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "replace")
    return xmp if isinstance(xmp, bytes) else None


def sidecar_candidates(path: Path) -> list[Path]:
    """The XMP sidecars programs write for ``path``: ``photo.jpg.xmp`` (darktable, digiKam) and
    ``photo.xmp`` (Lightroom, Capture One, for RAW files above all)."""
    path = Path(path)
    return [path.with_name(path.name + ".xmp"), path.with_suffix(".xmp")]


def sidecar_stamp(path: Path | str, mtimes: Mapping[str, int] | None = None) -> int | None:
    """When the newest of ``path``'s XMP sidecars (:func:`sidecar_candidates`, regular files) last
    changed, ``st_mtime_ns``; None when it has none. Stored with the metadata read from them, so an
    index run that finds a sidecar edited since (another program fixed a date) reads it again.
    ``mtimes``: the sidecars a walk found (path -> mtime), looked up instead of asking the disk."""
    stamps = []
    for side in sidecar_candidates(Path(path)):
        if mtimes is not None:
            stamp = mtimes.get(str(side))
        else:
            try:
                st = os.stat(side)
            except OSError:
                continue
            stamp = st.st_mtime_ns if stat.S_ISREG(st.st_mode) else None
        if stamp is not None:
            stamps.append(stamp)
    return max(stamps, default=None)


def read_sidecar(side: Path | str, max_bytes: int) -> bytes:
    """The bytes of the sidecar ``side``, never blocking: anything but a regular file (a FIFO, a
    device, a socket; a folder raises ``IsADirectoryError``) raises ``OSError`` before a byte is
    read, and so does a file larger than ``max_bytes`` (``EFBIG``)."""

    def check(st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(side))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(side))
        if st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", str(side))

    check(os.stat(side))  # before opening: opening a device may do something
    # O_NONBLOCK: should the path be swapped for a FIFO after the stat, open() still returns
    fd = os.open(side, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        check(os.fstat(fd))
        return f.read(max_bytes + 1)  # one byte more: a file grown since the check stays too large


def _sidecar_xmp(path: Path | None) -> dict:
    if path is None:
        return {}
    for side in sidecar_candidates(path):
        try:
            return parse_xmp(read_sidecar(side, MAX_XMP_BYTES))
        except OSError:
            continue  # none there, a FIFO or folder in its place, too large: the next candidate
    return {}


# --- putting it together --------------------------------------------------------------------------


def with_sidecar(sources: list[dict], side: dict) -> dict:
    """The fields of the file's own ``sources`` (:func:`merge`d, most trusted first) completed by
    its XMP sidecar ``side``, whose capture time wins when it names another moment.

    Programs that keep their edits in sidecars (Lightroom, darktable, digiKam) write a corrected
    capture time there and leave the file as the camera wrote it. The same moment is not another:
    the file's is kept when the sidecar's has the same wall-clock time (it may lack the UTC offset)
    or is the same day at midnight (a date-only ``photoshop:DateCreated``)."""
    fields = merge(*sources)
    out = merge(fields, side)
    own, edited = fields.get("taken_at"), side.get("taken_at")
    if own and edited and own[:19] != edited[:19]:
        same_day_only = edited[10:19] == "T00:00:00" and own[:10] == edited[:10]
        if not same_day_only:
            out["taken_at"] = edited
    return out


def merge(*sources: dict) -> dict:
    """The first non-None value of each field, sources in order of trust."""
    out: dict = {}
    for source in sources:
        for key, value in source.items():
            if value is not None and out.get(key) is None:
                out[key] = value
    if out.get("lat") is None or out.get("lon") is None:  # a position comes whole from one source
        out["lat"] = out["lon"] = None
        for source in sources:
            if source.get("lat") is not None and source.get("lon") is not None:
                out["lat"], out["lon"] = source["lat"], source["lon"]
                break
    return out


def from_image(im, path: Path | None = None) -> PhotoMetadata:
    """The metadata of a PIL image opened (header only is enough) from the file at ``path``.

    ``path`` is used for the XMP sidecar; the size is the upright one (EXIF orientation applied).
    """
    from PIL import Image

    from clipsearch.imageio import FULL_SIZE_KEY, read_png_late_chunks

    try:
        if im.format == "PNG" and "exif" not in im.info:
            # Pillow's PNG getexif() decodes every pixel to look for an eXIf chunk after the image
            # data; the chunks there are read here without inflating anything, then Pillow's own
            # getexif() of the base class runs on what was found.
            read_png_late_chunks(im)
            exif = Image.Image.getexif(im)
        else:
            exif = im.getexif()
    except Exception:  # a broken EXIF block means no EXIF metadata, not no photo
        logger.debug("unreadable EXIF block in %s", path, exc_info=True)
        exif = None
    fields = with_sidecar([_from_exif(exif), parse_xmp(_embedded_xmp(im))], _sidecar_xmp(path))
    if FULL_SIZE_KEY in im.info:  # open_image's result: upright already
        w, h = im.info[FULL_SIZE_KEY]
    else:
        w, h = im.size
        if fields.get("orientation") in (5, 6, 7, 8):
            w, h = h, w
    file_type = _PIL_TYPES.get(im.format or "", (im.format or "").lower() or None)
    return PhotoMetadata.from_fields(fields, width=w, height=h, file_type=file_type)


def read_metadata(source, path: Path | str | None = None) -> PhotoMetadata:
    """The metadata of a photo file (a path, or a seekable binary stream of its bytes with its
    ``path`` for the sidecar and the name of TIFF-based RAW formats). Reads headers only.

    Raises :class:`~clipsearch.errors.ImageDecodeError` when the file is no image at all.
    """
    from clipsearch import raw
    from clipsearch.imageio import _identify, _open_stream

    f, name, owned = _open_stream(source)
    path = Path(path) if path is not None else (Path(source) if not hasattr(source, "read") else None)
    stamp = (
        sidecar_stamp(path) if path is not None else None
    )  # before reading: an edit meanwhile shows next run
    try:
        found = raw.sniff(f, path)
        if found is not None:
            meta = raw.read_metadata(f, found, path)
        else:
            meta = from_image(_identify(f, name, max_pixels=None), path)
        return dataclasses.replace(meta, sidecar_mtime_ns=stamp)
    finally:
        if owned:
            f.close()
