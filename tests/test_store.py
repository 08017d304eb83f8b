"""The library database: opening, migrations, errors, literal subtree filters, labels, concurrency."""

import sqlite3
import threading

import numpy as np
import pytest

from clipsearch.errors import LibraryError
from clipsearch.store import MIGRATIONS, Library


def _add(lib, path, vector=None, model="m", h=None):
    with lib.transaction():
        image_id = lib.add_image(path, size=1, mtime_ns=1, content_hash=h or str(path))
        if vector is not None:
            lib.put_embedding(image_id, model, np.asarray(vector, np.float32))
    return image_id


@pytest.fixture
def lib(tmp_path):
    library = Library.open(tmp_path / "lib.db", create=True)
    library.register_model("m", "source-of-m", 2)
    yield library
    library.close()


def test_missing_library_says_what_to_do(tmp_path):
    with pytest.raises(LibraryError, match=r"no library at .*run `clipsearch index PATH` first"):
        Library.open(tmp_path / "nope.db")
    assert not (tmp_path / "nope.db").exists()


def test_default_path_is_under_clipsearch_home(_isolated_home):
    with Library.open(create=True) as lib:
        assert lib.path == (_isolated_home / "library.db").resolve()


def test_new_library_is_wal_with_recorded_migrations(tmp_path):
    with Library.open(tmp_path / "lib.db", create=True) as lib:
        assert lib.applied_migrations() == [name for name, _ in MIGRATIONS]
    # Reopening applies nothing twice.
    with Library.open(tmp_path / "lib.db") as lib:
        assert lib.applied_migrations() == [name for name, _ in MIGRATIONS]
    conn = sqlite3.connect(tmp_path / "lib.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # as another program sees it
    conn.close()


@pytest.mark.parametrize(
    "content",
    [b"this is not a database at all" * 100, b"SQLite format 3\x00" + b"\xff" * 4000],
    ids=["text", "corrupt-header"],
)
def test_corrupt_file_is_a_library_error(tmp_path, content):
    path = tmp_path / "lib.db"
    path.write_bytes(content)
    with pytest.raises(LibraryError, match="not a clipsearch library or is corrupt"):
        Library.open(path)


def test_other_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE things (x)")
    conn.commit()
    conn.close()
    with pytest.raises(LibraryError, match="not a clipsearch library"):
        Library.open(path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "lib.db"
    Library.open(path, create=True).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO migrations (name, applied_at) VALUES ('999_future', 'x')")
    conn.close()
    with pytest.raises(LibraryError, match="newer clipsearch.*999_future"):
        Library.open(path)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(LibraryError, match="is a folder"):
        Library.open(tmp_path, create=True)


def test_readonly_refuses_writes_and_creation(tmp_path, lib):
    with pytest.raises(LibraryError, match="no library"):
        Library.open(tmp_path / "new.db", create=True, readonly=True)
    _add(lib, tmp_path / "a.jpg", [1, 0])
    with Library.open(lib.path, readonly=True) as ro:
        assert ro.embeddings("m")[0].tolist() == [1]
        with pytest.raises(LibraryError, match="read-only"):
            ro.replace_labels("m", ["x"], [])


def test_paths_relative_inside_root_absolute_outside(tmp_path, lib):
    inside = tmp_path / "photos" / "a.jpg"
    outside = tmp_path.parent / "elsewhere" / "b.jpg"
    assert lib.stored_path(inside) == "photos/a.jpg"
    assert lib.stored_path(outside) == str(outside)
    assert lib.abspath("photos/a.jpg") == inside
    assert lib.abspath(str(outside)) == outside


def test_embeddings_round_trip_in_id_order(tmp_path, lib):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(5, 2)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [_add(lib, tmp_path / f"{i}.jpg", v) for i, v in enumerate(vecs)]
    got_ids, paths, got = lib.embeddings("m")
    assert got_ids.dtype == np.int64 and got.dtype == np.float32
    assert got_ids.tolist() == ids
    assert paths == [tmp_path / f"{i}.jpg" for i in range(5)]
    np.testing.assert_array_equal(got, vecs)
    sub_ids, _, sub = lib.embeddings("m", ids=[ids[3], ids[1]])
    assert sub_ids.tolist() == [ids[1], ids[3]]
    np.testing.assert_array_equal(sub, vecs[[1, 3]])
    assert lib.image_paths([ids[0], 12345]) == {ids[0]: tmp_path / "0.jpg"}


def test_subtree_filter_is_literal_for_percent_underscore_and_backslash(tmp_path, lib):
    names = ["100%/a.jpg", "1000/a.jpg", "a_b/a.jpg", "axb/a.jpg", "back\\slash/a.jpg", "a_b2/a.jpg"]
    ids = {n: _add(lib, tmp_path / n, [1, 0]) for n in names}
    for folder, expected in [
        ("100%", ["100%/a.jpg"]),
        ("a_b", ["a_b/a.jpg"]),
        ("back\\slash", ["back\\slash/a.jpg"]),
        ("10", []),
    ]:
        assert lib.image_ids_under(tmp_path / folder) == {ids[n] for n in expected}, folder
        got = lib.embeddings("m", under=tmp_path / folder)[0].tolist()
        assert got == sorted(ids[n] for n in expected), folder
    # The root itself and a folder above it contain everything.
    assert lib.image_ids_under(tmp_path) == set(ids.values())
    assert lib.image_ids_under(tmp_path.parent) == set(ids.values())
    # A file path selects just that file.
    assert lib.image_ids_under(tmp_path / "axb" / "a.jpg") == {ids["axb/a.jpg"]}


def test_subtree_filter_on_absolute_paths_outside_root(tmp_path):
    with Library.open(tmp_path / "db" / "lib.db", create=True) as lib:
        lib.register_model("m", "s", 2)
        a = _add(lib, tmp_path / "p%" / "x.jpg", [1, 0])
        _add(lib, tmp_path / "pX" / "x.jpg", [1, 0])
        assert lib.image_ids_under(tmp_path / "p%") == {a}


def test_models_default_and_source(tmp_path, lib):
    assert lib.model_ids() == ["m"]
    assert lib.default_model_id() == "m"
    assert lib.model_source("m") == "source-of-m"
    lib.register_model("other", "path/to/other", 4)
    assert lib.default_model_id() == "other"
    with pytest.raises(LibraryError, match="no embeddings of model 'ghost'"):
        lib.model_source("ghost")
    with Library.open(tmp_path / "empty.db", create=True) as empty:
        assert empty.default_model_id() is None


def test_replace_labels_replaces_only_the_same_class_set(tmp_path, lib):
    a = _add(lib, tmp_path / "a.jpg", [1, 0])
    b = _add(lib, tmp_path / "b.jpg", [0, 1])
    lib.replace_labels("m", ["cat", "dog"], [(a, "cat", 0.9, 1), (b, "dog", 0.8, 1)])
    lib.replace_labels("m", ["indoor", "outdoor"], [(a, "indoor", 0.6, 1)])
    # Same set in another order: the old rows of that set go, the other set stays.
    lib.replace_labels("m", ["dog", "cat"], [(a, "dog", 0.7, 1), (99999, "cat", 0.5, 1)])
    rows = lib.labels("m", ["cat", "dog"])
    assert [(r.image_id, r.label, r.score) for r in rows] == [(a, "dog", 0.7)]
    assert rows[0].path == tmp_path / "a.jpg" and rows[0].classes == ["cat", "dog"]
    assert [r.label for r in lib.labels("m", ["outdoor", "indoor"])] == ["indoor"]
    assert len(lib.labels()) == 2 and lib.labels("nobody") == []


def test_top_label_counts_and_pages_of_a_label(tmp_path, lib):
    a, b, c = (_add(lib, tmp_path / f"{n}.jpg", [1, 0]) for n in "abc")
    lib.replace_labels(
        "m", ["cat", "dog"], [(a, "cat", 0.9, 1), (a, "dog", 0.1, 2), (b, "cat", 0.6, 1), (c, "dog", 0.7, 1)]
    )
    lib.replace_labels("m", ["cat", "car"], [(c, "cat", 0.95, 1), (a, "cat", 0.5, 1)])
    counts = [(r.classes, r.label, r.photos) for r in lib.top_label_counts("m")]
    assert counts == [(["car", "cat"], "cat", 2), (["cat", "dog"], "cat", 2), (["cat", "dog"], "dog", 1)]
    # `a` is cat in both sets: once, with its higher score; rank-2 labels never count
    assert lib.top_labelled("m", "cat", 10) == [(c, 0.95), (a, 0.9), (b, 0.6)]
    assert lib.top_labelled("m", "cat", 2, offset=1) == [(a, 0.9), (b, 0.6)]
    assert lib.top_labelled("m", "dog", 10) == [(c, 0.7)] and lib.top_label_counts("other") == []
    assert [(r.label, r.rank) for r in lib.labels("m", image_id=a)] == [("cat", 1), ("cat", 1), ("dog", 2)]


def test_replace_labels_is_one_transaction(tmp_path, lib):
    a = _add(lib, tmp_path / "a.jpg", [1, 0])
    lib.replace_labels("m", ["x", "y"], [(a, "x", 0.9, 1)])

    def rows():
        yield (a, "y", 0.5, 1)
        raise RuntimeError("the classifier failed half-way")

    with pytest.raises(RuntimeError):
        lib.replace_labels("m", ["x", "y"], rows())
    assert [r.label for r in lib.labels("m", ["x", "y"])] == ["x"]


def test_removing_an_image_removes_its_embeddings_and_labels(tmp_path, lib):
    a = _add(lib, tmp_path / "a.jpg", [1, 0])
    lib.replace_labels("m", ["x"], [(a, "x", 1.0, 1)])
    g = lib.generation()
    with lib.transaction():
        assert lib.remove_images([a]) == 1
    assert lib.generation() > g
    assert lib.embedding_count("m") == 0 and lib.labels() == []
    # Ids are never reused, so a derived index keyed on them cannot confuse two images.
    assert _add(lib, tmp_path / "b.jpg", [0, 1]) > a


def test_errors_listed_newest_first_with_limit(tmp_path, lib):
    with lib.transaction():
        lib.record_error(tmp_path / "a.jpg", "truncated", "image file is truncated")
        lib.record_error(tmp_path / "b.jpg", "not an image", "")
        lib.record_error(tmp_path / "a.jpg", "corrupt", "again")  # replaces, not duplicates
    errs = lib.errors()
    assert {(e.path, e.reason) for e in errs} == {
        (tmp_path / "a.jpg", "corrupt"),
        (tmp_path / "b.jpg", "not an image"),
    }
    assert len(lib.errors(limit=1)) == 1
    # A file that indexes later clears its error.
    _add(lib, tmp_path / "a.jpg", [1, 0])
    assert [e.path for e in lib.errors()] == [tmp_path / "b.jpg"]
    assert lib.stats().errors == 1


def test_stats_counts(tmp_path, lib):
    a = _add(lib, tmp_path / "a.jpg", [1, 0])
    _add(lib, tmp_path / "b.jpg")
    lib.replace_labels("m", ["x"], [(a, "x", 1.0, 1)])
    s = lib.stats()
    assert s.images == 2 and s.embedded == {"m": 1} and s.labels == 1 and s.class_sets == 1
    assert s.models[0].source == "source-of-m" and s.models[0].dim == 2


def test_reader_sees_committed_state_during_a_write_transaction(tmp_path, lib):
    a = _add(lib, tmp_path / "a.jpg", [1, 0])
    entered, release = threading.Event(), threading.Event()

    def writer():
        with Library.open(lib.path) as w, w.transaction():
            w.add_image(tmp_path / "b.jpg", size=1, mtime_ns=1, content_hash="b")
            entered.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert entered.wait(10)
        with Library.open(lib.path, readonly=True) as reader:
            assert reader.embeddings("m")[0].tolist() == [a]  # no 'database is locked'
            assert reader.stats().images == 1  # the uncommitted row is invisible
    finally:
        release.set()
        t.join()
    assert lib.stats().images == 2


def test_second_writer_lock_is_refused_with_a_clear_message(tmp_path, lib):
    with Library.open(lib.path) as other:
        with lib.writer_lock():
            with pytest.raises(LibraryError, match="another clipsearch index is running on"):
                other.acquire_writer_lock()
        other.acquire_writer_lock()  # free again once released
        other.release_writer_lock()


def test_embeddings_of_the_wrong_size_are_a_library_error(tmp_path, lib):
    _add(lib, tmp_path / "a.jpg", [1, 0])
    _add(lib, tmp_path / "b.jpg", [1, 0, 0])  # a damaged or foreign row: 3 values for a 2-d model
    with pytest.raises(LibraryError, match="wrong size"):
        lib.embeddings("m")


def test_an_older_library_is_migrated_on_open(tmp_path):
    """A library written before 002 existed: 002 is applied on open and old rows survive."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE migrations (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE, applied_at TEXT)"
    )
    conn.executescript(MIGRATIONS[0][1])
    conn.execute("INSERT INTO migrations (name, applied_at) VALUES ('001_initial', 'then')")
    conn.execute("INSERT INTO errors (path, reason, detail, seen_at) VALUES ('a.jpg', 'corrupt', '', 'then')")
    conn.commit()
    conn.close()
    with pytest.raises(LibraryError, match="needs a schema upgrade"):
        Library.open(path, readonly=True)
    with Library.open(path) as lib:
        assert lib.applied_migrations() == [
            "001_initial",
            "002_error_file_state",
            "003_library_id",
            "004_folder_devices",
            "005_photo_metadata",
            "006_sidecar_stamp",
        ]
        assert [e.reason for e in lib.errors()] == ["corrupt"]
        identity = lib.library_id()
        assert len(identity) == 32 and int(identity, 16) >= 0  # 128 random bits, made once
    with Library.open(path) as lib:
        assert lib.library_id() == identity
    other = tmp_path / "other.db"
    with Library.open(other, create=True) as lib:
        assert lib.library_id() != identity
        assert lib.known_failures() == {}  # no file state recorded then: such files are retried
