import os
import tempfile
from pathlib import Path

import pytest

# A model's one-time work (clipsearch.settle) runs inside the command that needs it, not in a detached
# process that would outlive the test; set at import so module-scoped fixtures and subprocesses see it
# too. tests/test_settle.py drives the background path on purpose.
os.environ["CLIPSEARCH_BACKGROUND"] = "0"


# One user key for the whole run, as one user has (clipsearch.paths.user_key): a FAISS index saved
# under one test's home is this user's own under the next one's too.
_USER_KEY = os.urandom(32)


def _home_with_key(home: Path) -> Path:
    fd = os.open(home / "user.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, _USER_KEY)
    os.close(fd)
    return home


# Module-scoped fixtures run before the per-test home below is set: they get this one, never the
# real user's home.
os.environ["CLIPSEARCH_HOME"] = str(_home_with_key(Path(tempfile.mkdtemp(prefix="clipsearch-home-"))))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own CLIPSEARCH_HOME, so nothing touches the user's files."""
    home = _home_with_key(tmp_path_factory.mktemp("clipsearch_home"))
    monkeypatch.setenv("CLIPSEARCH_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def _clipsearch_logger_reset():
    """A CLI run in this process (CliRunner, also from module-scoped fixtures) points the ``clipsearch``
    logger at its stderr, at WARNING, without propagation; each test starts from the library's own state
    (no CLI handler, level unset, propagating), so ``caplog`` sees the library's log lines."""
    import logging

    logger = logging.getLogger("clipsearch")
    for handler in [h for h in logger.handlers if getattr(h, "_clipsearch_cli", False)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
