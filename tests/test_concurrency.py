"""Commands while ``clipsearch index`` runs in another process: queries, labels and status answer
from what is committed (never 'database is locked'); a second index run gets one clear line about
the lock and changes nothing; the first run then completes as if alone."""

from __future__ import annotations

import json
import time

from test_crash import committed, spawn_cli
from test_reliability import assert_complete, db_rows, invoke, make_photos, one_line_error, tiny_model_dir

N_PHOTOS = 10
HELD_AFTER = 2  # batches of 2 committed while the run is held


def test_commands_during_an_index_run(tmp_path, tmp_path_factory):
    model = tiny_model_dir(tmp_path_factory)
    db = tmp_path / "lib.db"
    first = make_photos(tmp_path / "photos", 2)
    # A library with two photos already, so the model is known to query and label with.
    assert invoke("index", "--model", model, tmp_path / "photos", "--json", db=db).exit_code == 0
    photos = first + make_photos(tmp_path / "photos", N_PHOTOS - 2, start=2)
    release = tmp_path / "release"
    proc = spawn_cli(
        ["--db", db, "index", tmp_path / "photos", "--batch-size", "2", "--workers", "1", "--json"],
        hold_after=HELD_AFTER,
        release=release,
    )
    try:
        expected = 2 + 2 * HELD_AFTER  # the old photos and the batches committed before the hold
        deadline = time.monotonic() + 120
        while committed(db) < expected and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
        assert committed(db) == expected

        hits = invoke("query", "a photo", "--json", "--top", "100", db=db)
        assert hits.exit_code == 0, hits.output
        assert len(json.loads(hits.stdout)) == expected

        labels = invoke("label", "--classes", "red,blue", "--template", "a {} photo", "--json", db=db)
        assert labels.exit_code == 0, labels.output
        assert len(json.loads(labels.stdout)) == expected

        status = invoke("status", "--json", db=db)
        assert status.exit_code == 0 and json.loads(status.stdout)["images"] == expected

        second = invoke("index", tmp_path / "photos", db=db)
        line = one_line_error(second)
        assert "another clipsearch index is running" in line and str(db) in line
        assert committed(db) == expected  # the refused run wrote nothing

        for result in (hits, labels, status, second):
            assert "locked" not in result.output.lower()
        assert proc.poll() is None, "the run must still be going for this test to mean anything"
    finally:
        release.touch()
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert (report["new"], report["unchanged"], report["failed"]) == (N_PHOTOS - 2, 2, [])
    assert_complete(db, photos)
    rows = db_rows(db)
    assert rows["errors"] == {}
    # The labels written during the run are still there, for the photos that existed then.
    after = invoke("status", "--json", db=db)
    assert json.loads(after.stdout)["labels"] == expected
