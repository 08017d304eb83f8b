"""Fetching a file over HTTP(S) into place, verified against a full sha256 before anyone can see it.

The bytes stream into a fresh temporary file beside the destination, are hashed on the way, and are
renamed into place only when the transfer is complete and the digest is the expected one; nothing is
left behind otherwise. Only a full 64-digit digest is accepted: a prefix or no digest would let a
changed file through.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from clipsearch import paths
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
    import http.client
    import urllib.error
    import urllib.request

    if not isinstance(sha256, str) or not _FULL_SHA256.match(sha256):
        raise ValueError(f"download needs the full 64-digit sha256 of {url}, got {sha256!r}")
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DownloadError(
            f"cannot write to {dest.parent} ({e.strerror or e}); make it writable or point "
            f"${paths.ENV_HOME} at a directory that is"
        ) from e
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    log.info("downloading %s to %s", url, dest)
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "clipsearch"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                done = 0
                if progress is not None:
                    progress(done, total)
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        if total is not None and done != total:
            raise DownloadError(
                f"download of {url} stopped after {done} of {total} bytes; try again, or fetch it "
                f"yourself and put it at {dest}"
            )
        got = digest.hexdigest()
        if got != sha256:
            raise DownloadError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}; the file was "
                "discarded. Try again; if it keeps failing the server is serving a different file."
            )
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes it private; weights are not secret
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        write_sidecar(dest, got)
        return dest
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else None
        reason = reason or getattr(e, "reason", None) or e
        raise DownloadError(
            f"could not download {url} ({reason}). If this machine is offline, download that URL "
            f"elsewhere and put the file at {dest}"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
