import os

import pytest

# A model's one-time work (clipsearch.settle) runs inside the command that needs it, not in a detached
# process that would outlive the test; set at import so module-scoped fixtures and subprocesses see it
# too. tests/test_settle.py drives the background path on purpose.
os.environ["CLIPSEARCH_BACKGROUND"] = "0"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own CLIPSEARCH_HOME, so nothing touches the user's files."""
    home = tmp_path_factory.mktemp("clipsearch_home")
    monkeypatch.setenv("CLIPSEARCH_HOME", str(home))
    return home
