"""``clipsearch web``: the library in a browser, on this machine.

:func:`make_server` opens the library (:class:`~clipsearch.web.live.LiveLibrary`), builds the Flask
app (:mod:`clipsearch.web.app`) and binds it with waitress, a maintained pure-Python WSGI server
with a thread pool; the caller prints the address and calls ``server.run()``. Loopback only unless
``allow_remote``; then every request needs the returned access token.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path

from clipsearch.errors import ClipsearchError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
THREADS = 4  # tiles load in parallel; searches share one lock, thumbnails decode side by side


class WebError(ClipsearchError):
    """The web server cannot start as asked (a taken port, a non-loopback address without consent)."""


@dataclass
class WebServer:
    """A bound server: ``url`` to open, ``run()`` until ``close()`` (from another thread) or Ctrl-C."""

    url: str
    host: str
    port: int
    access_token: str | None
    live: object
    _server: object

    def run(self) -> None:
        self._server.run()

    def close(self) -> None:
        self._server.close()
        self.live.close()


def make_server(
    library_path: Path | str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    allow_remote: bool = False,
    thumbs_max_bytes: int | None = None,
) -> WebServer:
    """Open the library, warm its search, and bind ``host:port`` (0 picks a free port)."""
    from clipsearch.paths import home
    from clipsearch.web import security
    from clipsearch.web.app import create_app
    from clipsearch.web.live import LiveLibrary
    from clipsearch.web.thumbs import DEFAULT_MAX_BYTES, ThumbnailCache

    remote = not security.is_loopback(host)
    if remote and not allow_remote:
        raise WebError(
            f"--host {host} would let other machines reach your photos: "
            "add --allow-remote if that is what you want"
        )
    if host == "localhost":  # one socket, as printed (waitress would bind ::1 and 127.0.0.1 apart)
        host = "127.0.0.1"
    live = LiveLibrary(library_path)
    try:
        live.warm_up()
        thumbs = ThumbnailCache(home() / "thumbnails", thumbs_max_bytes or DEFAULT_MAX_BYTES)
        token = security.new_token() if remote else None
        server = _bind(host, port)
        bound_port = int(server.effective_port)
        server.application = create_app(
            live, thumbs, host=host, port=bound_port, uploads_dir=home() / "uploads", access_token=token
        )
    except BaseException:
        live.close()
        raise
    shown = "localhost" if host in ("127.0.0.1", "localhost") else (f"[{host}]" if ":" in host else host)
    url = f"http://{shown}:{bound_port}/"
    log.info("serving %s at %s", live.path, url)
    return WebServer(url, host, bound_port, token, live, server)


def _bind(host: str, port: int):
    """waitress bound to ``host:port``, or a :class:`WebError` saying whether the address or the port is wrong."""
    import waitress.server

    try:
        return waitress.server.create_server(
            _Deferred(), host=host, port=port, threads=THREADS, ident="clipsearch"
        )
    except ValueError as e:  # waitress's getaddrinfo failed; it re-raises as "Invalid host/port specified."
        why = getattr(e.__context__, "strerror", None) or str(e)
        raise WebError(
            f"cannot listen on {host}: not a name this machine can resolve ({why}); "
            "give one of this machine's addresses or names with --host"
        ) from e
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise WebError(
                f"cannot listen on {host}: not an address of this machine; give one of its own "
                "addresses with --host (or leave --host out to serve this machine only)"
            ) from e
        advice = "; try another --port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else ""
        raise WebError(f"cannot listen on {host}:{port}: {e.strerror}{advice}") from e


class _Deferred:
    """Stands in for the app until the port is known (the Host check needs the bound port)."""

    def __call__(self, environ, start_response):  # pragma: no cover - replaced before serving
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"starting\n"]
