"""Thumbnails and previews of library photos, made once and kept in a size-bounded folder.

A picture is keyed by the photo's content hash and the requested size, so a moved or duplicated
file reuses it and an edited file (new content, new hash) gets a new one. Made with the library's
own decoder (:func:`clipsearch.imageio.open_image`: EXIF orientation applied, JPEG draft decoding),
written atomically and readable by the user only. When the folder grows past ``max_bytes``, the least recently used pictures are
deleted until it is back under 90% of the bound (a hit refreshes a file's mtime).
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

from clipsearch.atomic import write_bytes
from clipsearch.errors import ImageDecodeError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # about 40,000 grid thumbnails of ~12 KB
JPEG_QUALITY = 85  # no visible blocking at thumbnail sizes, a third the bytes of 95
SIZES = {"thumb": 320, "preview": 1600}  # grid tiles (sharp at 2x on ~160 px tiles); the large view


class ThumbnailCache:
    """``cache.get(path, content_hash, size)`` -> the JPEG file of that photo at that size."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._making: dict[Path, threading.Lock] = {}
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.total = sum(size for _, _, size in self._files())

    def file_for(self, content_hash: str, size: int) -> Path:
        name = "".join(c for c in content_hash if c.isalnum())[:64] or "unknown"
        return self.directory / name[:2] / f"{name}-{int(size)}.jpg"

    def get(self, path: Path, content_hash: str, size: int) -> Path | None:
        """The cached picture, made now if needed; None when the photo cannot be decoded."""
        target = self.file_for(content_hash, size)
        if self._touch(target):
            return target
        with self._lock:
            making = self._making.setdefault(target, threading.Lock())
        with making:  # two requests for one new thumbnail decode the photo once
            if not self._touch(target):
                data = render_jpeg(path, size)
                if data is None:
                    return None
                write_bytes(target, data, private=True)  # pictures of the user's photos: theirs only
                self._grew(len(data))
        with self._lock:
            self._making.pop(target, None)
        return target

    def _touch(self, target: Path) -> bool:
        try:
            os.utime(target)  # the mtime is the last use: eviction goes by it
            return True
        except FileNotFoundError:
            return False

    def _grew(self, n: int) -> None:
        with self._lock:
            self.total += n
            if self.total <= self.max_bytes:
                return
            files = sorted(self._files())  # oldest use first
            goal = int(self.max_bytes * 0.9)
            removed = 0
            for _, path, size in files:
                if self.total <= goal:
                    break
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                self.total -= size
                removed += 1
            log.info("thumbnail cache over %d bytes: removed %d least recently used", self.max_bytes, removed)

    def _files(self):
        for sub in self.directory.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.name.endswith(".jpg") and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    yield st.st_mtime, Path(entry.path), st.st_size


def render_jpeg(path: Path, size: int) -> bytes | None:
    """``path`` upright, fitted inside ``size`` x ``size``, as JPEG bytes; None if undecodable."""
    from clipsearch.imageio import open_image

    try:
        img = open_image(path, draft_size=size)
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    except (ImageDecodeError, OSError, ValueError) as e:
        log.info("no thumbnail of %s: %s", path, e)
        return None
    return buf.getvalue()
