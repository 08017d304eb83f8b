"""``clipsearch serve``: a local daemon that keeps one library's text queries warm.

A text query process spends most of its time starting: importing numpy and FAISS, loading the text
tower, opening the vector index. The daemon does that once and then answers queries of texts and
indexed photos at once; :meth:`clipsearch.search.Searcher.run` asks it first (through
:func:`clipsearch.daemon_client.ask`) and, when no daemon answers for its library, does the work
itself (and logs why, shown with ``--verbose``).

- One daemon per library, on a unix socket ``home()/serve/<hash of the library path>.sock``. The
  folder is made private (0700) and the socket 0600: only the same user can connect. No network port.
- It answers queries of texts and indexed photos with the library's own model through the same
  pipeline as the in-process path, a :class:`clipsearch.search.Searcher` kept warm (the torch-free
  text encoder, the same text-feature cache); a query with image files is the client's to run.
- Before each query it checks the library's generation (bumped by every index run), the database
  file's identity and the text export's stamp, and reloads what changed, so a re-index is noticed.
- A socket left behind by a killed daemon is stale: clients fail to connect and fall back; the next
  daemon replaces it. Only the holder of ``<socket>.lock`` (an flock) binds, so of two daemons
  started at once one serves and the other is refused before it loads anything.

The socket's place and the protocol (one JSON line each way) are :mod:`clipsearch.daemon_client`'s.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from clipsearch.daemon_client import (
    ASKED_KINDS,
    CONNECT_TIMEOUT_S,
    MAX_REQUEST,
    MAX_SOCKET_PATH,
    PROTOCOL,
    socket_path,
)
from clipsearch.errors import ClipsearchError

log = logging.getLogger(__name__)


class ServeError(ClipsearchError):
    """The daemon cannot start: one is already serving the library, or the socket cannot be made."""


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
        self._lock = None
        try:
            self._claim()  # before the warm-up, which can take a while: a second daemon is told at once
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

    def _claim(self) -> None:
        """Check the socket can be made, and hold the library's daemon lock for as long as this runs.

        Only the holder of ``<socket>.lock`` (an flock, released when the process dies) binds the
        socket, so two daemons started at once cannot both take an old socket for stale: the second
        would unlink the first's live socket and leave it serving nobody.
        """
        from clipsearch.atomic import SymlinkLockError, open_lock

        path = self.socket_path
        if not hasattr(socket, "AF_UNIX") or not hasattr(os, "getuid"):
            raise ServeError("clipsearch serve needs unix sockets, which this system does not have")
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ServeError(
                f"the socket path {path} is longer than unix sockets allow: set CLIPSEARCH_HOME to a shorter folder"
            )
        _private_folder(path.parent)
        lock = path.with_name(path.name + ".lock")
        try:
            self._lock = open_lock(lock)
        except (SymlinkLockError, OSError) as e:
            raise ServeError(f"cannot open the daemon's lock {lock}: {e.strerror or e}") from e
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ServeError(
                f"a clipsearch daemon is already serving {self.library_path} (or starting to): {path}"
            ) from None
        if os.path.lexists(path) and _answers(path):  # one of a clipsearch that did not take the lock
            raise ServeError(f"a clipsearch daemon is already serving {self.library_path} ({path})")

    def _bind(self) -> None:
        import socketserver

        path = self.socket_path
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
        if self._lock is not None:
            os.close(self._lock)  # releases the flock; the empty lock file stays for the next daemon
            self._lock = None
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
