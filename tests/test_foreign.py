"""Foreign and hostile files, and media that cannot be written, as a user meets them: another
program's SQLite file passed as --db, a library copied from elsewhere with its FAISS index, the
privacy of what clipsearch keeps, and a library on a read-only mount."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
from test_reliability import invoke, make_photos, one_line_error, tiny_model_dir

from clipsearch import paths
from clipsearch.store import Library


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def library(tmp_path, tmp_path_factory):
    photos = make_photos(tmp_path / "photos", 3)
    db = tmp_path / "lib" / "library.db"
    model = tiny_model_dir(tmp_path_factory)
    result = invoke("index", "--model", model, tmp_path / "photos", "--json", db=db)
    assert result.exit_code == 0, result.output
    return db, photos, model


# --- another program's database ---------------------------------------------------------------------


@pytest.mark.parametrize("journal", ["delete", "wal"])
@pytest.mark.parametrize("with_migrations_table", [False, True])
def test_a_foreign_sqlite_file_is_byte_identical_after_being_refused(
    tmp_path, tmp_path_factory, journal, with_migrations_table
):
    foreign = tmp_path / "places.sqlite"  # e.g. a browser's or a photo manager's database
    conn = sqlite3.connect(foreign)
    conn.execute(f"PRAGMA journal_mode = {journal}")
    conn.execute("CREATE TABLE moz_places (id INTEGER PRIMARY KEY, url TEXT)")
    conn.execute("INSERT INTO moz_places (url) VALUES ('https://example.org')")
    if with_migrations_table:  # another program that also keeps a table named "migrations"
        conn.execute("CREATE TABLE migrations (id INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)")
        conn.execute("INSERT INTO migrations (name, applied_at) VALUES ('0001_create_places', 'then')")
    conn.commit()
    conn.close()
    before = _digest(foreign)
    names_before = sorted(p.name for p in tmp_path.iterdir())
    make_photos(tmp_path / "photos", 1)
    for args in (
        ["index", "--model", tiny_model_dir(tmp_path_factory), tmp_path / "photos"],
        ["status"],
        ["query", "a photo"],
        ["label", "--classes", "a,b"],
    ):
        line = one_line_error(invoke(*args, db=foreign))
        assert "not a clipsearch library" in line, line
        assert _digest(foreign) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "photos") == names_before


def test_a_non_database_file_is_refused_unchanged(tmp_path):
    notes = tmp_path / "notes.db"
    notes.write_text("my notes, not a database\n" * 100)
    before = _digest(notes)
    line = one_line_error(invoke("status", db=notes))
    assert "not a clipsearch library" in line and _digest(notes) == before


# --- privacy ----------------------------------------------------------------------------------------


def test_the_home_library_and_query_cache_are_private(tmp_path, tmp_path_factory, monkeypatch):
    home = tmp_path / "fresh-home"
    monkeypatch.setenv(paths.ENV_HOME, str(home))
    old = os.umask(0o022)  # a usual umask: files readable by everyone unless made private
    try:
        make_photos(tmp_path / "photos", 2)
        model = tiny_model_dir(tmp_path_factory)
        assert invoke("index", "--model", model, tmp_path / "photos").exit_code == 0  # default library
        assert invoke("query", "my secret search").exit_code == 0
    finally:
        os.umask(old)
    assert _mode(home) == 0o700
    assert _mode(home / "library.db") == 0o600
    for side in ("-wal", "-shm"):
        if Path(f"{home / 'library.db'}{side}").exists():
            assert _mode(Path(f"{home / 'library.db'}{side}")) == 0o600
    caches = list(home.rglob("text-cache.sqlite"))
    assert caches and all(_mode(c) == 0o600 for c in caches)
    assert _mode(home / paths.USER_KEY) == 0o600


def test_the_user_key_is_made_once(tmp_path):
    key = paths.user_key()
    assert len(key) == 32 and paths.user_key() == key
    assert sorted(p.name for p in paths.home().iterdir() if "key" in p.name) == [paths.USER_KEY]


# --- a FAISS index the user did not write -----------------------------------------------------------


def test_a_faiss_index_copied_from_elsewhere_is_rebuilt_not_parsed(library, tmp_path, monkeypatch):
    import faiss

    from clipsearch.vectors import VectorIndex

    db, photos, model = library
    copy = tmp_path / "copied"
    shutil.copytree(db.parent, copy, copy_function=shutil.copy2)  # as from another machine (mtimes kept)
    index_dir = copy / "library.db.faiss"
    (index_file,) = index_dir.glob("*.index")
    read = []
    real_read = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda *a, **k: read.append(a[0]) or real_read(*a, **k))
    with Library.open(copy / "library.db") as lib:
        model_id = lib.default_model_id()
        index = VectorIndex.for_library(lib, model_id)
        assert read == [] and index.rebuilt  # its sidecar's MAC does not match: never parsed
        assert len(index) == 3
    # Saved again by this user, it is trusted (mapped) from now on.
    read.clear()
    with Library.open(copy / "library.db") as lib:
        index = VectorIndex.for_library(lib, model_id)
        assert read and not index.rebuilt
    # The original, untouched, is still this user's own.
    read.clear()
    with Library.open(db) as lib:
        assert not VectorIndex.for_library(lib, model_id).rebuilt
    # A sidecar edited to match a planted file does not help without the key.
    meta = json.loads((index_file.with_suffix(".json")).read_text())
    planted = index_file.read_bytes()
    index_file.write_bytes(planted)
    st = index_file.stat()
    meta.update(file_size=st.st_size, file_mtime_ns=st.st_mtime_ns)
    index_file.with_suffix(".json").write_text(json.dumps(meta))
    read.clear()
    with Library.open(copy / "library.db") as lib:
        assert VectorIndex.for_library(lib, model_id).rebuilt and read == []


# --- a library on read-only media ----------------------------------------------------------------------


def _bind_readonly(source: Path, target: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    target.mkdir()
    steps = (["mount", "--bind", str(source), str(target)], ["mount", "-o", "remount,ro,bind", str(target)])
    for step in steps:
        if subprocess.run(step, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(target)], capture_output=True)
            return False
    return True


def test_a_library_on_a_read_only_mount_opens_for_query_status_and_export(library, tmp_path):
    db, photos, model = library
    mount = tmp_path / "archive"
    if not _bind_readonly(db.parent, mount):
        pytest.skip("cannot make a read-only bind mount here (needs root with CAP_SYS_ADMIN)")
    try:
        ro_db = mount / db.name
        before = {p.name: _digest(p) for p in db.parent.iterdir() if p.is_file()}
        status = invoke("status", "--json", db=ro_db)
        assert status.exit_code == 0, status.output
        assert json.loads(status.stdout)["images"] == 3
        hits = invoke("query", "a photo", "--json", db=ro_db)
        assert hits.exit_code == 0, hits.output
        assert sorted(Path(h["path"]).name for h in json.loads(hits.stdout)) == sorted(p.name for p in photos)
        out = tmp_path / "emb.npz"
        assert invoke("export", out, db=ro_db).exit_code == 0 and out.stat().st_size > 0
        line = one_line_error(invoke("index", "--model", model, tmp_path / "photos", db=ro_db))
        assert "read-only" in line and "corrupt" not in line
        line = one_line_error(invoke("label", "--classes", "a,b", db=ro_db))
        assert "read-only" in line
        assert "corrupt" not in status.output + hits.output
        assert {p.name: _digest(p) for p in db.parent.iterdir() if p.is_file()} == before
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_doctor_on_a_read_only_mount_says_it_could_not_repair(library, tmp_path):
    # It used to print "rebuilt from SQLite" and OK, on every run, although nothing could be saved.
    db, _, _ = library
    shutil.rmtree(db.parent / (db.name + ".faiss"))  # the index is gone: doctor would rebuild it
    mount = tmp_path / "archive"
    if not _bind_readonly(db.parent, mount):
        pytest.skip("cannot make a read-only bind mount here (needs root with CAP_SYS_ADMIN)")
    try:
        result = invoke("doctor", db=mount / db.name)
        assert "in memory only (the library is read-only here: nothing was saved)" in result.stdout
        assert "OK" not in result.stdout.split()
        line = one_line_error(result)
        assert "read-only here" in line and "could not be repaired" in line and "queries still work" in line
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_read_only_library_with_a_wal_left_behind_says_why_it_cannot_be_opened(library, tmp_path):
    """A library copied (or mounted) read-only while its -wal still held commits: every command said
    only "cannot open the library ...: unable to open database file"."""
    db, _, _ = library
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    # a commit that stays in the WAL (what clipsearch's own writes do to the generation)
    conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    conn.commit()
    copy = tmp_path / "copy"
    shutil.copytree(db.parent, copy)  # while it is open: -wal holds the commit
    conn.close()
    (copy / (db.name + "-shm")).unlink(missing_ok=True)
    assert (copy / (db.name + "-wal")).stat().st_size > 0
    mount = tmp_path / "archive"
    if not _bind_readonly(copy, mount):
        pytest.skip("cannot make a read-only bind mount here (needs root with CAP_SYS_ADMIN)")
    try:
        line = one_line_error(invoke("status", db=mount / db.name))
        assert "library.db-wal (it was not closed cleanly)" in line and "read-only" in line
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
