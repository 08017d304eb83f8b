import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own CLIPSEARCH_HOME, so nothing touches the user's files."""
    home = tmp_path_factory.mktemp("clipsearch_home")
    monkeypatch.setenv("CLIPSEARCH_HOME", str(home))
    return home
