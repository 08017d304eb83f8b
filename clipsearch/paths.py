"""Where clipsearch keeps its files: everything lives under one directory.

``$CLIPSEARCH_HOME`` overrides it (tests redirect it with an autouse fixture); otherwise the
platform's user data directory (e.g. ``~/.local/share/clipsearch`` on Linux).
"""

from __future__ import annotations

import os
from pathlib import Path

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
