"""Fetching a file over HTTP(S) into place, verified against a full sha256 before anyone can see it.

The bytes stream into a fresh temporary file beside the destination
(:func:`clipsearch.atomic.atomic_path`), are hashed on the way, and are renamed into place only when
the transfer is complete and the digest is the expected one; nothing is left behind otherwise, and
the temporary of a download that was killed is removed by the next download into that folder. Only
a full 64-digit digest is accepted: a prefix or no digest would let a changed file through.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path

from clipsearch import paths
from clipsearch.atomic import atomic_path, remove_stale_temps
from clipsearch.errors import DownloadError
from clipsearch.hashing import CHUNK, write_sidecar

log = logging.getLogger(__name__)

_FULL_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def download(
    url: str,
    dest: str | Path,
    sha256: str,
    progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Fetch ``url`` to ``dest``: streamed to a temp file beside it, verified, then renamed into place.

    ``sha256`` is the full lower-case hex digest the file must have. ``progress(bytes_done, total)``
    is called after each chunk; ``total`` is None without a length. Raises :class:`DownloadError`
    when the server cannot be reached, the transfer is cut short or the checksum differs; nothing is
    left at ``dest`` or beside it in that case.
    """
    if not isinstance(sha256, str) or not _FULL_SHA256.match(sha256):
        raise ValueError(f"download needs the full 64-digit sha256 of {url}, got {sha256!r}")
    dest = Path(dest)
    log.info("downloading %s to %s", url, dest)
    # A download killed mid-way (Ctrl-C twice, kill -9, a crash) leaves its temporary: never used,
    # but as large as the part received, so each earlier one is deleted once its writer is gone.
    for stale in remove_stale_temps(dest.parent):
        log.info("removed %s, left by a download that was killed", stale)
    try:
        with atomic_path(dest) as tmp, open(tmp, "wb") as out:
            got = _fetch(url, out, dest, progress, timeout)
            if got != sha256:  # raised inside the block: the temporary goes, dest stays as it was
                raise DownloadError(
                    f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}; the file was "
                    "discarded. Try again; if it keeps failing the server is serving a different file."
                )
    except DownloadError:
        raise
    except OSError as e:  # the network's errors became DownloadError in _fetch: this is the disk
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)  # "make it writable" would send them astray
        fix = "free some space there" if full else "make it writable"
        fix += f" or point ${paths.ENV_HOME} at a directory that " + ("has room" if full else "is")
        raise DownloadError(f"cannot write to {dest.parent} ({e.strerror or e}); {fix}") from e
    write_sidecar(dest, got)
    return dest


def _fetch(url: str, out, dest: Path, progress, timeout: float) -> str:
    """Stream ``url`` into the open file ``out``; returns the sha256 of what was received."""
    import http.client
    import urllib.error
    import urllib.request

    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "clipsearch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            if progress is not None:
                progress(done, total)
            while chunk := response.read(CHUNK):
                out.write(chunk)  # a disk error here is not the network's: it passes through
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else None
        reason = reason or getattr(e, "reason", None) or e
        raise DownloadError(
            f"could not download {url} ({reason}). If this machine is offline, download that URL "
            f"elsewhere and put the file at {dest}"
        ) from e
    if total is not None and done != total:
        raise DownloadError(
            f"download of {url} stopped after {done} of {total} bytes; try again, or fetch it "
            f"yourself and put it at {dest}"
        )
    return digest.hexdigest()
