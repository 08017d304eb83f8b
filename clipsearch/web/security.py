"""The web interface's security policy, as pure functions the app applies to every request.

- **Host check** (DNS rebinding): a page on another site whose name is re-pointed at 127.0.0.1 sends
  its own name in ``Host``. Only the loopback names, the bound address and, when bound to every
  interface, IP literals and this machine's own name are accepted, each with the bound port.
- **CSRF**: every request that writes is a POST carrying the server's random token (a form field or
  the ``X-CSRF-Token`` header); another site cannot read the token, because it cannot read our pages.
  A POST whose ``Origin`` names another site is refused as well.
- **Access token**: bound beyond loopback, every request needs the token printed at start-up (given
  once as ``?token=``, then kept in an HttpOnly, SameSite=Strict cookie).
- **Headers**: a Content-Security-Policy allowing only our own scripts, styles and images (no inline
  script can run, even if an escape were missed), no framing, no MIME sniffing, a referrer only to ourselves.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
TOKEN_COOKIE = "clipsearch_token"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make form POSTs send `Origin: null`
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def new_token() -> str:
    """A random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def same_token(given: str | None, expected: str) -> bool:
    """Whether ``given`` is ``expected``, compared in constant time."""
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """Whether ``host`` means every interface (``0.0.0.0``, ``::``)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def split_host(header: str) -> tuple[str, int | None] | None:
    """``Host`` header -> (lower-case name without brackets, port or None); None when malformed."""
    header = header.strip().lower()
    if not header:
        return None
    if header.startswith("["):
        end = header.find("]")
        if end < 0:
            return None
        name, rest = header[1:end], header[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text = header.partition(":")
        if not sep:
            port_text = None
        if ":" in (port_text or ""):
            return None
    if port_text is None:
        return name, None
    if not port_text.isdigit() or len(port_text) > 5:
        return None
    return name, int(port_text)


class HostPolicy:
    """Which ``Host`` headers a server bound to ``bound_host:port`` answers."""

    def __init__(self, bound_host: str, port: int):
        self.port = port
        self.wildcard = is_wildcard(bound_host)
        names = set(LOOPBACK_NAMES)
        names.add(bound_host.strip("[]").lower())
        if self.wildcard:
            names.add(socket.gethostname().lower())
        self.names = frozenset(names)

    def allows(self, header: str | None) -> bool:
        parsed = split_host(header or "")
        if parsed is None:
            return False
        name, port = parsed
        if port != self.port:
            return False
        if name in self.names:
            return True
        if self.wildcard:  # any address of this machine typed as a number: no DNS to rebind
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def allows_origin(self, origin: str | None) -> bool:
        """A POST's ``Origin``: absent (old browsers, curl) or one of our own addresses."""
        if origin is None:
            return True
        if origin == "null":
            return False
        parts = urlsplit(origin)
        return parts.scheme == "http" and self.allows(parts.netloc)
