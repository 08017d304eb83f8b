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
    """The clipsearch home directory (not created here)."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("clipsearch", appauthor=False))


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
