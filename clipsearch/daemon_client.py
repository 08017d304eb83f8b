"""Asking a running ``clipsearch serve`` (the client side): where its socket is, and the protocol.

:meth:`clipsearch.search.Searcher.run` asks first; None means "answer here". Nothing heavy is
imported here (no numpy, no torch), and nothing above: this module knows queries only by their
parts, and hands back plain ``(path, score, image_id)`` tuples. The daemon itself is
:mod:`clipsearch.serve`.

The protocol is one JSON line each way per connection: a request ``{"version", "library", "parts":
[[kind, value, weight], ...], "top", "filters": PhotoFilter.to_json() or null, "threshold",
"index_kind"}`` and a reply ``{"ok": true, "hits": [[path, score, image_id], ...]}`` or
``{"ok": false, "error": message}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PROTOCOL = 2  # 2: filters as an object, indexed-photo parts
MAX_REQUEST = 1 << 20  # a query is a few hundred bytes; anything near this is not a client of ours
CONNECT_TIMEOUT_S = 1.0  # a live daemon accepts at once; a hung one must not hold a query up long
REPLY_TIMEOUT_S = 10.0  # a reload after a large re-index takes seconds; a stuck daemon is given up on
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the final NUL
ASKED_KINDS = ("text", "indexed")  # the query parts a daemon answers (the rest need the model)


def socket_path(library_path: Path | str | None = None) -> Path:
    """Where the daemon of the library at ``library_path`` (default: the default library) listens."""
    from clipsearch import paths
    from clipsearch.store import resolve_path

    key = hashlib.sha256(os.fsencode(resolve_path(library_path))).hexdigest()[:16]
    return paths.home() / "serve" / f"{key}.sock"


def ask(
    library_path: Path | str | None,
    query,
    top: int = 20,
    filters=None,
    threshold: float | None = None,
    index_kind: str = "auto",
    timeout: float = REPLY_TIMEOUT_S,
):
    """The hits of ``query`` from the daemon serving this library, or None (then says why).

    Arguments as for :func:`clipsearch.search.search`. None when the query has image files or
    vectors, no daemon is running, its socket is stale, it does not answer in time, or it cannot
    answer this query (an error, which the caller then meets itself): the caller runs the query
    in-process. Returns ``[(path, score, image_id)]``, best first.
    """
    from clipsearch.store import resolve_path

    if any(p.kind not in ASKED_KINDS for p in query.parts):
        log.info("daemon: not asked (the query has image files or vectors, which need the model here)")
        return None
    if not hasattr(socket, "AF_UNIX"):
        return None
    library = resolve_path(library_path)
    path = socket_path(library)
    request = {
        "version": PROTOCOL,
        "library": os.fsdecode(library),
        "parts": [[p.kind, p.value, p.weight] for p in query.parts],
        "top": top,
        "filters": None if filters is None else filters.to_json(),
        "threshold": threshold,
        "index_kind": index_kind,
    }
    try:
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            log.info("daemon: none can serve here (the socket path %s is too long for unix sockets)", path)
            return None
        if not _ours(path):
            log.warning("daemon: %s is not a private socket of this user: not asked", path)
            return None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(os.fspath(path))
            sock.settimeout(timeout)
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(_read_line(sock))
        if not reply.get("ok"):
            log.info("daemon: refused the query (%s); answering here", reply.get("error"))
            return None
        hits = [(Path(p), float(s), int(i)) for p, s, i in reply["hits"]]
    except FileNotFoundError:
        log.info("daemon: none serves this library (no %s); answering here", path)
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:  # a stale socket, a timeout, garbage
        log.info("daemon: no answer (%s: %s); answering here", type(e).__name__, e)
        return None
    log.info("daemon: answered (%s)", path)
    return hits


def _ours(path: Path) -> bool:
    """Whether ``path`` is a socket of this user in a folder only this user can open: anything else
    (another user's daemon on a shared home, a planted socket) is never asked."""
    folder, sock = os.stat(path.parent), os.stat(path)
    uid = os.getuid()
    return (
        stat.S_ISSOCK(sock.st_mode)
        and sock.st_uid == uid
        and folder.st_uid == uid
        and stat.S_IMODE(folder.st_mode) & 0o077 == 0
    )


def _read_line(sock) -> bytes:
    chunks = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
        if size > 64 * MAX_REQUEST:
            raise ValueError("reply too long")
    return b"".join(chunks)
