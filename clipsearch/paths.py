"""Where clipsearch keeps its files: everything lives under one directory.

``$CLIPSEARCH_HOME`` overrides it (tests redirect it with an autouse fixture); otherwise the
platform's user data directory (e.g. ``~/.local/share/clipsearch`` on Linux).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from clipsearch.atomic import atomic_path  # noqa: F401  (the one atomic write; imported from here too)

ENV_HOME = "CLIPSEARCH_HOME"


def home() -> Path:
    """The clipsearch home directory, made private (0700) when it does not exist yet.

    Everything under it says what the user has (paths of photos, what they searched for), so it is
    created readable by its owner only; a home that exists is left as its owner set it.
    """
    env = os.environ.get(ENV_HOME)
    if env:
        path = Path(env).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_data_dir("clipsearch", appauthor=False))
    if not os.path.isdir(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, 0o700)
        except OSError:
            pass  # read-only or forbidden: whoever writes there first reports it
    return path


USER_KEY = "user.key"
_KEY_BYTES = 32


def user_key() -> bytes:
    """A random secret of this user (``home()/user.key``, 0600), made once.

    Files clipsearch derives and may load again unverified (FAISS indexes) carry a MAC with it, so a
    file this user's clipsearch did not write (a library copied from elsewhere) is rebuilt rather
    than parsed. Made by linking a finished temporary into place, so two processes agree on one key.
    """
    import secrets

    path = home() / USER_KEY
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            pass
        else:
            with os.fdopen(fd, "rb") as f:
                key = f.read(_KEY_BYTES + 1)
            if len(key) == _KEY_BYTES:
                return key
            raise OSError(f"{path} is not a clipsearch key ({len(key)} bytes): delete it to make a new one")
        staging = path.with_name(f".{USER_KEY}.new")
        with atomic_path(staging, private=True) as tmp:
            tmp.write_bytes(secrets.token_bytes(_KEY_BYTES))
        try:
            os.link(staging, path)  # complete and fsync'd; if another process won, its key is read
        except FileExistsError:
            pass
        finally:
            staging.unlink(missing_ok=True)
    raise OSError(f"cannot make {path}")


def models_dir() -> Path:
    """Downloaded pretrained checkpoints."""
    return home() / "models"


def default_library_path() -> Path:
    """The default library database."""
    return home() / "library.db"


def cache_dir(model_id: str) -> Path:
    """The directory for files derived from model ``model_id`` (exports, verdicts); not created here.

    Model ids contain ``/`` and ``:``, so the name is a readable slug plus a hash of the full id.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)[:48].strip("._") or "model"
    digest = hashlib.sha256(model_id.encode("utf-8")).hexdigest()[:12]
    return home() / "backends" / f"{slug}-{digest}"
