"""Filters on what a photo is, combined with the semantic search inside the vector search.

A :class:`PhotoFilter` selects photos by when (``after``/``before``), which camera, where (``near``
a point ``within`` a distance), file type and folder. :meth:`PhotoFilter.allowed_ids` turns it into
the set of image ids the vector index may return (:meth:`clipsearch.vectors.VectorIndex.search`'s
``allowed_ids``), so ``--top 20`` still gives 20 photos whenever 20 match: the filter is not a cut
of a top N found without it.

Semantics (each condition must hold; a photo whose field is unknown does not match a condition on
that field):

- ``after`` is inclusive and ``before`` exclusive, on the wall-clock time the photo was taken
  (:mod:`clipsearch.metadata`): ``--after 2023-01-01 --before 2024-01-01`` is the year 2023. A date
  may be given as ``2024``, ``2024-06``, ``2024-06-01`` or ``2024-06-01T18:30[:00]``; a shorter form
  stands for its start (``--before 2024`` is before 1 January 2024).
- ``camera`` is a case-insensitive substring of the make or the model (``canon``, ``iphone 13``).
- ``near`` (latitude, longitude in decimal degrees) ``within`` kilometres, by great-circle distance
  (haversine, mean Earth radius); SQLite preselects a bounding box.
- ``types`` are file types by content (``jpg`` and ``jpeg`` are one; ``raw`` is every RAW format).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from clipsearch.errors import ClipsearchError
from clipsearch.raw import RAW_TYPES

EARTH_RADIUS_KM = 6371.0088  # the mean radius (IUGG)
DEFAULT_WITHIN_KM = 5.0  # a town and its surroundings, when --near comes without --within

_TYPE_ALIASES = {
    "jpg": ("jpeg",),
    "jpeg": ("jpeg",),
    "jpe": ("jpeg",),
    "jfif": ("jpeg",),
    "tif": ("tiff",),
    "tiff": ("tiff",),
    "heic": ("heif",),
    "heif": ("heif",),
    "hif": ("heif",),
    "png": ("png",),
    "webp": ("webp",),
    "gif": ("gif",),
    "bmp": ("bmp",),
    "avif": ("avif",),
    "raw": RAW_TYPES,
} | {t: (t,) for t in RAW_TYPES if t != "raw"}


class FilterError(ClipsearchError):
    """A filter option the user gave cannot be understood."""


def parse_when(text: str, option: str) -> str:
    """``2024``, ``2024-06``, ``2024-06-01`` or ``2024-06-01T18:30[:00]`` -> ``2024-06-01T18:30:00``."""
    t = text.strip()
    m = re.fullmatch(r"(\d{4})(?:-(\d{1,2})(?:-(\d{1,2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2}))?)?)?)?", t)
    if not m:
        raise FilterError(
            f"{option} {text!r}: give a date as YYYY-MM-DD (or YYYY, YYYY-MM, YYYY-MM-DDTHH:MM)"
        )
    parts = [int(m[1]), int(m[2] or 1), int(m[3] or 1), int(m[4] or 0), int(m[5] or 0), int(m[6] or 0)]
    try:
        return datetime(*parts).isoformat()
    except ValueError as e:
        raise FilterError(f"{option} {text!r}: {e}") from None


def parse_near(text: str) -> tuple[float, float]:
    """``"48.8584,2.2945"`` -> ``(48.8584, 2.2945)`` (latitude, longitude in decimal degrees)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        lat, lon = (float(p) for p in parts)
    except ValueError:
        raise FilterError(f"--near {text!r}: give LAT,LON in decimal degrees, e.g. 48.8584,2.2945") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise FilterError(f"--near {text!r}: latitude must be in [-90, 90] and longitude in [-180, 180]")
    return lat, lon


def parse_types(text: str) -> tuple[str, ...]:
    """``"jpg,png,raw"`` -> the stored file types they mean (see the module doc)."""
    out: list[str] = []
    for name in (p.strip().lower().lstrip(".") for p in text.split(",")):
        if not name:
            continue
        if name not in _TYPE_ALIASES:
            known = ", ".join(sorted(k for k in _TYPE_ALIASES if k not in RAW_TYPES or k == "raw"))
            raise FilterError(
                f"--type {name!r} is not a file type clipsearch knows: use {known} or a RAW format"
            )
        out += [t for t in _TYPE_ALIASES[name] if t not in out]
    if not out:
        raise FilterError("--type: give at least one file type, e.g. jpg,png")
    return tuple(out)


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km (haversine on a sphere of the mean Earth radius)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def bounding_box(lat: float, lon: float, km: float) -> tuple[float, float, float, float]:
    """``(lat_min, lat_max, lon_min, lon_max)`` holding every point within ``km`` of (lat, lon).

    Longitudes wrap: ``lon_min > lon_max`` means the box crosses the antimeridian."""
    dlat = math.degrees(km / EARTH_RADIUS_KM)
    lat_min, lat_max = max(-90.0, lat - dlat), min(90.0, lat + dlat)
    if lat_min <= -90 or lat_max >= 90:
        return lat_min, lat_max, -180.0, 180.0  # a pole inside: every longitude
    # the widest longitude span is at the latitude nearest a pole
    dlon = math.degrees(km / (EARTH_RADIUS_KM * math.cos(math.radians(max(abs(lat_min), abs(lat_max))))))
    if dlon >= 180:
        return lat_min, lat_max, -180.0, 180.0
    lo, hi = lon - dlon, lon + dlon
    lo = lo + 360 if lo < -180 else lo
    hi = hi - 360 if hi > 180 else hi
    return lat_min, lat_max, lo, hi


@dataclass(frozen=True)
class PhotoFilter:
    """Conditions on the photos a search may return (see the module doc). Build it with
    :meth:`parse` from user text, or directly with parsed values."""

    after: str | None = None  # ISO wall-clock time, inclusive
    before: str | None = None  # exclusive
    camera: str | None = None
    near: tuple[float, float] | None = None
    within_km: float = DEFAULT_WITHIN_KM
    types: tuple[str, ...] | None = None
    under: Path | None = None

    @classmethod
    def parse(
        cls,
        *,
        after: str | None = None,
        before: str | None = None,
        camera: str | None = None,
        near: str | None = None,
        within_km: float | None = None,
        types: str | None = None,
        under: Path | str | None = None,
    ) -> PhotoFilter:
        """A filter from the command line's text; :class:`FilterError` says what is wrong."""
        if within_km is not None and near is None:
            raise FilterError("--within needs --near LAT,LON")
        if within_km is not None and not (within_km > 0 and math.isfinite(within_km)):
            raise FilterError(f"--within {within_km}: give a distance in km greater than 0")
        f = cls(
            after=parse_when(after, "--after") if after is not None else None,
            before=parse_when(before, "--before") if before is not None else None,
            camera=camera.strip() if camera is not None and camera.strip() else None,
            near=parse_near(near) if near is not None else None,
            within_km=within_km if within_km is not None else DEFAULT_WITHIN_KM,
            types=parse_types(types) if types is not None else None,
            under=Path(under).expanduser().resolve() if under is not None else None,
        )
        if camera is not None and f.camera is None:
            raise FilterError("--camera: give part of a camera's make or model, e.g. canon")
        if f.after is not None and f.before is not None and f.after >= f.before:
            raise FilterError(f"--after {after} is not before --before {before}: no photo can match")
        if f.under is not None and not f.under.is_dir():
            raise FilterError(
                f"--in {under}: " + ("a file, not a folder" if f.under.exists() else "no such folder")
            )
        return f

    def is_empty(self) -> bool:
        return self == PhotoFilter(within_km=self.within_km)

    def describe(self) -> str:
        """The conditions in words, e.g. ``taken from 2024-06-01, camera ~ 'canon'``."""
        parts = []
        if self.after:
            parts.append(f"taken from {self.after}")
        if self.before:
            parts.append(f"taken before {self.before}")
        if self.camera:
            parts.append(f"camera ~ {self.camera!r}")
        if self.near:
            parts.append(f"within {self.within_km:g} km of {self.near[0]:g},{self.near[1]:g}")
        if self.types:
            parts.append("type " + "/".join(self.types))
        if self.under:
            parts.append(f"in {self.under}")
        return ", ".join(parts)

    def allowed_ids(self, library) -> set[int] | None:
        """The ids of the photos in ``library`` that pass, or None when the filter is empty."""
        from clipsearch.store import PhotoConditions

        if self.is_empty():
            return None
        cond = PhotoConditions(
            taken_from=self.after,
            taken_before=self.before,
            camera=self.camera,
            box=bounding_box(*self.near, self.within_km) if self.near else None,
            types=self.types,
            under=self.under,
        )
        rows = library.photo_ids_where(cond)
        if self.near is None:
            return {i for i, _, _ in rows}
        lat0, lon0 = self.near
        return {i for i, lat, lon in rows if distance_km(lat0, lon0, lat, lon) <= self.within_km}

    def to_json(self) -> dict:
        """A JSON-safe form (the query daemon's protocol); :meth:`from_json` reads it back."""
        return {
            "after": self.after,
            "before": self.before,
            "camera": self.camera,
            "near": list(self.near) if self.near else None,
            "within_km": self.within_km,
            "types": list(self.types) if self.types else None,
            "under": None if self.under is None else str(self.under),
        }

    @classmethod
    def from_json(cls, data: dict | None) -> PhotoFilter:
        data = data or {}
        return cls(
            after=data.get("after"),
            before=data.get("before"),
            camera=data.get("camera"),
            near=tuple(data["near"]) if data.get("near") else None,
            within_km=float(data.get("within_km", DEFAULT_WITHIN_KM)),
            types=tuple(data["types"]) if data.get("types") else None,
            under=Path(data["under"]) if data.get("under") else None,
        )
