"""Vanished is not deleted: a folder whose drive is not mounted keeps its photos, as a user meets it.

An index run over an emptied or a missing folder keeps every row and embedding and says so in one
line; a run after the folder is back re-embeds nothing; ``--prune`` removes them on request; a file
that cannot be read this time keeps its row; photos the user really deleted still go; a first run
that fails leaves no library behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from test_indexer import FakeBundle, write_image
from test_reliability import db_rows, invoke, make_photos, one_line_error, tiny_model_dir

from clipsearch.indexer import MASS_REMOVAL_MIN, index_paths, removal_hold
from clipsearch.store import Library


@pytest.fixture
def indexed(tmp_path, tmp_path_factory):
    photos = make_photos(tmp_path / "photos", 4)
    db = tmp_path / "lib.db"
    model = tiny_model_dir(tmp_path_factory)
    result = invoke("index", "--model", model, tmp_path / "photos", "--json", db=db)
    assert result.exit_code == 0, result.output
    return db, tmp_path / "photos", photos, model


def _unchanged_run(db, folder, model) -> dict:
    result = invoke("index", "--model", model, folder, "--json", db=db)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_an_emptied_folder_keeps_every_photo_and_nothing_is_re_embedded_when_it_is_back(indexed, tmp_path):
    db, folder, photos, model = indexed
    before = db_rows(db)
    away = tmp_path / "away"
    shutil.move(folder, away)
    folder.mkdir()  # the mount point, without its drive
    result = invoke("index", "--model", model, folder, db=db)
    line = one_line_error(result)
    assert "Kept 4 photo(s)" in line and "holds no photos" in line and "--prune" in line
    assert db_rows(db)["paths"] == before["paths"] and db_rows(db)["embeddings"] == before["embeddings"]
    folder.rmdir()
    shutil.move(away, folder)  # the drive is back
    report = _unchanged_run(db, folder, model)
    assert (report["new"], report["updated"], report["unchanged"], report["removed"]) == (0, 0, 4, 0)
    assert db_rows(db)["embedding_ids"] == before["embedding_ids"]


def test_a_missing_folder_keeps_every_photo_and_prune_removes_them(indexed, tmp_path):
    db, folder, photos, model = indexed
    before = db_rows(db)
    shutil.move(folder, tmp_path / "away")
    result = invoke("index", "--model", model, folder, "--json", db=db)
    assert result.exit_code != 0
    out = json.loads(result.stdout)
    assert out["kept"] == [{"path": str(folder), "photos": 4, "reason": out["kept"][0]["reason"]}]
    assert "missing" in out["kept"][0]["reason"]
    assert db_rows(db)["embedding_ids"] == before["embedding_ids"]
    shutil.move(tmp_path / "away", folder)
    assert _unchanged_run(db, folder, model)["unchanged"] == 4
    shutil.rmtree(folder)  # now really gone: the user asks for its photos to go
    result = invoke("index", "--model", model, folder, "--prune", "--json", db=db)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["removed"] == 4
    assert db_rows(db)["paths"] == []


def test_a_missing_folder_never_indexed_is_still_an_error(indexed, tmp_path):
    db, folder, photos, model = indexed
    line = one_line_error(invoke("index", "--model", model, tmp_path / "nope", db=db))
    assert "no such file or folder" in line


def test_photos_the_user_deleted_still_go(indexed):
    db, folder, photos, model = indexed
    photos[0].unlink()
    report = _unchanged_run(db, folder, model)
    assert (report["removed"], report["unchanged"], report["kept"]) == (1, 3, [])
    assert len(db_rows(db)["paths"]) == 3


# --- the policy and the device check, on the library directly --------------------------------------


def test_removal_hold_policy():
    base = dict(exists=True, known=100, found=90, gone=10, device=5, device_before=5)
    assert removal_hold(**base) is None  # a user's deletion
    assert removal_hold(**{**base, "gone": 0, "exists": False}) is None  # nothing to remove anyway
    assert "missing" in removal_hold(**{**base, "exists": False})
    assert "no photos" in removal_hold(**{**base, "found": 0})
    assert "another device" in removal_hold(**{**base, "device": 6})
    assert removal_hold(**{**base, "device_before": None}) is None  # never recorded: nothing to compare
    assert "51 of its 100" in removal_hold(**{**base, "gone": 51, "found": 49})
    assert removal_hold(**{**base, "gone": 50, "found": 50}) is None  # half is not most
    small = dict(exists=True, known=MASS_REMOVAL_MIN, found=0 + 1, gone=MASS_REMOVAL_MIN - 1)
    assert removal_hold(**small, device=1, device_before=1) is None  # a few photos always go freely


def _index(lib, folder, **kw):
    return index_paths(lib, FakeBundle(), [folder], update_vectors=False, **kw)


def test_a_folder_on_another_device_than_last_time_keeps_its_photos(tmp_path):
    folder = tmp_path / "mnt"
    for i in range(3):
        write_image(folder / f"{i}.png", i)
    with Library.open(tmp_path / "lib.db", create=True) as lib:
        _index(lib, folder)
        real = os.stat(folder).st_dev
        assert lib.folder_device(folder) == real
        # What the folder looks like when its drive is not mounted: another device, other files.
        lib.record_folder_device(folder, real + 1)
        (folder / "0.png").unlink()
        (folder / "1.png").unlink()
        report = _index(lib, folder)
        assert report.removed == 0 and [k.photos for k in report.kept] == [2]
        assert "another device" in report.kept[0].reason
        assert lib.stats().images == 3 and lib.folder_device(folder) == real + 1  # not adopted
        report = _index(lib, folder, prune=True)
        assert report.removed == 2 and lib.folder_device(folder) == real


def test_most_of_a_folder_gone_at_once_is_kept(tmp_path):
    folder = tmp_path / "photos"
    n = MASS_REMOVAL_MIN + 3
    for i in range(n):
        write_image(folder / f"{i}.png", i)
    with Library.open(tmp_path / "lib.db", create=True) as lib:
        _index(lib, folder)
        for i in range(n - 1):
            (folder / f"{i}.png").unlink()
        report = _index(lib, folder)
        assert report.removed == 0 and report.kept[0].photos == n - 1
        assert f"{n - 1} of its {n}" in report.kept[0].reason
        assert _index(lib, folder, prune=True).removed == n - 1


def test_a_file_that_cannot_be_read_this_time_keeps_its_row_and_embedding(tmp_path, monkeypatch):
    from clipsearch import indexer

    folder = tmp_path / "photos"
    for i in range(3):
        write_image(folder / f"{i}.png", i)
    with Library.open(tmp_path / "lib.db", create=True) as lib:
        _index(lib, folder)
        before = lib.embeddings("fake/v1")
        os.utime(folder / "0.png", ns=(7, 7))  # changed on disk, so this run reads it
        real_open = os.open

        def io_error(path, *args, **kwargs):  # os itself is patched: pytest may pass descriptors meanwhile
            if not isinstance(path, int) and os.fspath(path) == str(folder / "0.png"):
                raise OSError(errno.EIO, "Input/output error", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(indexer.os, "open", io_error)
        report = _index(lib, folder)
        assert report.failed == [(folder / "0.png", "unreadable")] and report.removed == 0
        after = lib.embeddings("fake/v1")
        assert after[0].tolist() == before[0].tolist() and (after[2] == before[2]).all()


def test_a_photo_cut_short_keeps_its_row_and_one_overwritten_by_text_is_counted_removed(tmp_path):
    # A photo half-written by a copy or sync in progress reads as truncated: its row waits for the
    # next run. A photo whose file now holds something else entirely is no photo any more: its row
    # goes, and the run's report counts it as removed.
    folder = tmp_path / "photos"
    for i in range(3):
        write_image(folder / f"{i}.png", i)
    whole = (folder / "0.png").read_bytes()
    with Library.open(tmp_path / "lib.db", create=True) as lib:
        _index(lib, folder)
        before = lib.embeddings("fake/v1")
        (folder / "0.png").write_bytes(whole[: len(whole) // 2])
        (folder / "1.png").write_text("not a photo any more")
        report = _index(lib, folder)
        assert sorted(report.failed) == [(folder / "0.png", "truncated"), (folder / "1.png", "not an image")]
        assert report.removed == 1
        rows = {Path(r.path).name for r in lib.images()}
        assert rows == {"0.png", "2.png"}
        ids, _, vectors = lib.embeddings("fake/v1")
        assert ids.tolist() == [before[0][0], before[0][2]]  # 0.png's embedding is the one it had
        assert vectors[0].tolist() == before[2][0].tolist()
        (folder / "0.png").write_bytes(whole)  # the copy completes
        report = _index(lib, folder)
        assert report.failed == [(folder / "1.png", "not an image")] and report.removed == 0
        assert {Path(r.path).name for r in lib.images()} == {"0.png", "2.png"}


# --- first runs that fail leave nothing behind ------------------------------------------------------


def test_a_first_run_without_photos_leaves_no_library(tmp_path, tmp_path_factory):
    (tmp_path / "empty").mkdir()
    db = tmp_path / "new.db"
    line = one_line_error(
        invoke("index", "--model", tiny_model_dir(tmp_path_factory), tmp_path / "empty", db=db)
    )
    assert "no images found" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_first_run_whose_model_fails_to_load_leaves_no_library(tmp_path):
    make_photos(tmp_path / "photos", 1)
    (tmp_path / "weights.pt").write_bytes(b"not a model")  # like a download cut off by going offline
    db = tmp_path / "new.db"
    result = invoke("index", "--model", tmp_path / "weights.pt", tmp_path / "photos", db=db)
    assert result.exit_code != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "weights.pt"]


def test_a_failed_run_on_an_existing_library_keeps_it(indexed, tmp_path):
    db, folder, photos, model = indexed
    (tmp_path / "empty").mkdir()
    assert invoke("index", "--model", model, tmp_path / "empty", db=db).exit_code != 0
    assert len(db_rows(db)["paths"]) == 4
