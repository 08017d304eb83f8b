"""``clipsearch serve``: a local daemon that keeps one library's text queries warm.

A text query process spends most of its time starting: importing numpy and FAISS, loading the text
tower, opening the vector index. The daemon does that once and then answers queries of texts and
indexed photos at once; :meth:`clipsearch.search.Searcher.run` asks it first (see :func:`ask`) and,
when no daemon answers for its library, does the work itself (and logs why, shown with ``--verbose``).

- One daemon per library, on a unix socket ``home()/serve/<hash of the library path>.sock``. The
  folder is made private (0700) and the socket 0600: only the same user can connect. No network port.
- It answers queries of texts and indexed photos with the library's own model through the same
  pipeline as the in-process path, a :class:`clipsearch.search.Searcher` kept warm (the torch-free
  text encoder, the same text-feature cache); a query with image files is the client's to run.
- Before each query it checks the library's generation (bumped by every index run), the database
  file's identity and the text export's stamp, and reloads what changed, so a re-index is noticed.
- A socket left behind by a killed daemon is stale: clients fail to connect and fall back; the next
  daemon replaces it.

The protocol is one JSON line each way per connection: a request ``{"version", "library", "parts":
[[kind, value, weight], ...], "top", "filters": PhotoFilter.to_json() or null, "threshold",
"index_kind"}`` and
a reply ``{"ok": true, "hits": [[path, score, image_id], ...]}`` or ``{"ok": false, "error": message}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from clipsearch.errors import ClipsearchError

log = logging.getLogger(__name__)

PROTOCOL = 2  # 2: filters as an object, indexed-photo parts
MAX_REQUEST = 1 << 20  # a query is a few hundred bytes; anything near this is not a client of ours
CONNECT_TIMEOUT_S = 1.0  # a live daemon accepts at once; a hung one must not hold a query up long
REPLY_TIMEOUT_S = 10.0  # a reload after a large re-index takes seconds; a stuck daemon is given up on
_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the final NUL
ASKED_KINDS = ("text", "indexed")  # the query parts a daemon answers (the rest need the model)


class ServeError(ClipsearchError):
    """The daemon cannot start: one is already serving the library, or the socket cannot be made."""


def socket_path(library_path: Path | str | None = None) -> Path:
    """Where the daemon of the library at ``library_path`` (default: the default library) listens."""
    from clipsearch import paths
    from clipsearch.store import resolve_path

    key = hashlib.sha256(os.fsencode(resolve_path(library_path))).hexdigest()[:16]
    return paths.home() / "serve" / f"{key}.sock"


# --------------------------------------------------------------------------------------------------
# The client side (``clipsearch query``): no numpy, no torch, nothing heavy


def ask(
    library_path: Path | str | None,
    query,
    top: int = 20,
    filters=None,
    threshold: float | None = None,
    index_kind: str = "auto",
    timeout: float = REPLY_TIMEOUT_S,
):
    """The hits of ``query`` from the daemon serving this library, or None (then logs why).

    Arguments as for :func:`clipsearch.search.search`. None when the query has image files, no
    daemon is running, its socket is stale, it does not answer in time, or it cannot answer this
    query (an error, which the caller then meets itself): the caller runs the query in-process.
    Returns ``list[clipsearch.search.Hit]``.
    """
    from clipsearch.search import Hit
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
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
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
        hits = [Hit(Path(p), float(s), int(i)) for p, s, i in reply["hits"]]
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


# --------------------------------------------------------------------------------------------------
# The daemon


class QueryServer:
    """Serves text queries on one library over its unix socket; see the module doc.

    ``QueryServer(library_path).serve_forever()`` until :meth:`shutdown` (from another thread) or
    Ctrl-C; :meth:`close` removes the socket. Everything the queries need is loaded before the
    socket is bound, so a client that can connect gets an answer at once.
    """

    def __init__(
        self,
        library_path: Path | str | None = None,
        *,
        socket: Path | str | None = None,
        log: Callable[[str], None] | None = None,
    ):
        from clipsearch.search import Searcher

        # the one query pipeline, kept warm; never asks a daemon (this is it) nor loads the model
        self.searcher = Searcher(library_path, warm=True, ask_daemon=False, allow_model=False)
        self.library_path = self.searcher.library_path
        self.socket_path = Path(socket) if socket is not None else socket_path(self.library_path)
        self.answered = 0  # queries answered
        self.refused = 0  # requests answered with an error (the client then runs the query itself)
        self.log = log or (lambda message: None)  # one line per refused request, with the reason
        self._server = None
        try:
            self.searcher.warm_up(say=self.log)  # everything the queries need, before the socket is bound
            self._bind()
        except BaseException:  # e.g. another daemon already serves this library
            self.close()
            raise

    @property
    def reloads(self) -> int:
        """Times the library, the index or the text encoder were reloaded after a change."""
        return self.searcher.reloads

    def answer(self, request: dict) -> list:
        """The hits of one request, as the pipeline gives them in-process."""
        from clipsearch.filters import PhotoFilter
        from clipsearch.search import Query, QueryError, QueryPart

        if request.get("version") != PROTOCOL:
            raise ValueError(f"protocol version {request.get('version')!r}, this daemon speaks {PROTOCOL}")
        if request.get("library") != os.fsdecode(self.library_path):
            raise ValueError(f"this daemon serves {self.library_path}, not {request.get('library')!r}")
        parts = [QueryPart(str(k), str(v), float(w)) for k, v, w in request["parts"]]
        if any(p.kind not in ASKED_KINDS for p in parts):
            raise QueryError("image files and vectors are the client's to encode (they need the model)")
        threshold = request.get("threshold")
        return self.searcher.run(
            Query(parts),
            int(request.get("top", 20)),
            PhotoFilter.from_json(request.get("filters")),
            None if threshold is None else float(threshold),
            str(request.get("index_kind", "auto")),
        ).hits

    # --- the socket -----------------------------------------------------------------------------

    def _bind(self) -> None:
        import socketserver

        path = self.socket_path
        if not hasattr(socket, "AF_UNIX") or not hasattr(os, "getuid"):
            raise ServeError("clipsearch serve needs unix sockets, which this system does not have")
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise ServeError(
                f"the socket path {path} is longer than unix sockets allow: set CLIPSEARCH_HOME to a shorter folder"
            )
        _private_folder(path.parent)
        if os.path.lexists(path):
            if _answers(path):
                raise ServeError(f"a clipsearch daemon is already serving {self.library_path} ({path})")
            path.unlink()  # stale: left by a daemon that was killed
        owner = self

        class Server(socketserver.UnixStreamServer):
            def handle_error(self, request, client_address):  # a bug of ours: counted and logged
                import sys

                owner.refused += 1
                kind, error = sys.exc_info()[:2]
                owner.log(f"request failed: {kind.__name__}: {error}")

        umask = os.umask(0o177)  # the socket is born 0600: no moment where others could connect
        try:
            self._server = Server(os.fspath(path), _handler(self))
        except OSError as e:
            raise ServeError(f"cannot listen on {path}: {e.strerror or e}") from e
        finally:
            os.umask(umask)
        os.chmod(path, 0o600)
        self._inode = os.stat(path).st_ino

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` (call from another thread); then :meth:`close`."""
        if self._server is not None:
            self._server.shutdown()

    def close(self) -> None:
        """Close the socket and remove it if it is still ours; close the library."""
        if self._server is not None:
            self._server.server_close()
            try:
                if os.stat(self.socket_path).st_ino == self._inode:
                    self.socket_path.unlink()
            except OSError:
                pass  # already gone
            self._server = None
        self.searcher.close()

    def __enter__(self) -> QueryServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _handler(server: QueryServer):
    import socketserver

    class Handler(socketserver.StreamRequestHandler):
        timeout = 10  # a client that connects and says nothing must not block the others

        def handle(self):
            try:
                line = self.rfile.readline(MAX_REQUEST)
            except OSError:
                return  # the client went away or said nothing in time
            if not line.strip():
                return  # a probe (another daemon checking this one is alive) or a client that left
            try:
                hits = server.answer(json.loads(line))
                reply = {"ok": True, "hits": [[os.fspath(h.path), h.score, h.image_id] for h in hits]}
                server.answered += 1
            except ClipsearchError as e:  # the client runs the query itself and meets the error there
                reply = {"ok": False, "error": str(e)}
            except (ValueError, TypeError, KeyError) as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
            if not reply["ok"]:
                server.refused += 1
                server.log(f"query refused: {reply['error']}")
            try:
                # ensure_ascii keeps file names that are not UTF-8 (lone surrogates) exact
                self.wfile.write(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass  # the client gave up waiting: it runs the query itself

    return Handler


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(os.fspath(path))
        except OSError:
            return False
    return True


def _private_folder(folder: Path) -> None:
    """Make ``folder`` (0700, ours) or refuse one that others could write to or read."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(folder)
        if st.st_uid != os.getuid():
            raise ServeError(f"{folder} belongs to another user: set CLIPSEARCH_HOME to a folder of yours")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(folder, 0o700)
    except OSError as e:
        raise ServeError(f"cannot make the socket folder {folder}: {e.strerror or e}") from e
