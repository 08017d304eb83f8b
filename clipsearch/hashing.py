"""Content hashes of model files, computed once per file version (torch-free).

Weights are hundreds of megabytes, so a hash is cached by the file's ``(size, mtime_ns)``: in a
``.sha256`` sidecar for files in the models directory (clipsearch owns that folder), and in
``models/.file-hashes.json`` for a user's own files (nothing is ever written beside those).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from clipsearch import paths

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read per step when hashing and downloading
_USER_CACHE_ENTRIES = 256  # a cache, not a record: the oldest entries are forgotten


def sha256_file(path: str | Path) -> str:
    """The full hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_sidecar(path: Path, digest: str) -> None:
    """Record ``digest`` as the hash of ``path`` as it is now (size and mtime)."""
    st = path.stat()
    record = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _write_json(sidecar(path), record)


def recorded_sha256(path: str | Path) -> str | None:
    """The sha256 the ``.sha256`` sidecar records for ``path`` as it is now (same size and mtime), or
    None when there is none or the file changed since: known without reading the file."""
    path = Path(path)
    try:
        st = path.stat()
        record = json.loads(sidecar(path).read_text())
        if record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns:
            digest = record["sha256"]
            return digest if isinstance(digest, str) else None
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass
    return None


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file in the models directory, cached in a ``.sha256`` sidecar by size+mtime."""
    path = Path(path)
    recorded = recorded_sha256(path)
    if recorded is not None:
        return recorded
    digest = sha256_file(path)
    write_sidecar(path, digest)
    return digest


def user_file_sha256(path: str | Path) -> str:
    """A user's file hashed once per (path, size, mtime); the cache lives in the models directory."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = paths.models_dir() / ".file-hashes.json"
    try:
        cache = json.loads(cache_path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    digest = sha256_file(path)
    fresh = {k: v for k, v in cache.items() if k != key}
    fresh[key] = digest
    _write_json(cache_path, dict(list(fresh.items())[-_USER_CACHE_ENTRIES:]))
    return digest


def _write_json(target: Path, data: dict) -> None:
    """Best effort: a read-only models directory only costs a re-hash next time (logged)."""
    try:
        with paths.atomic_path(target) as tmp:
            tmp.write_text(json.dumps(data))
    except OSError as e:
        log.info("hash cache %s not written (%s); the file will be hashed again next time", target, e)
