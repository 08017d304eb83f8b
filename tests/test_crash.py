"""Crash safety of ``clipsearch index`` in real processes: SIGKILL early and after some committed
batches, and a disk that fills up while the library is written. Afterwards the library opens,
answers queries from what was committed, and the next run completes with every photo exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_helpers import REPO
from test_reliability import assert_complete, db_rows, faiss_files, invoke, make_photos, tiny_model_dir

N_PHOTOS = 14

# The real CLI, with two test hooks set from the environment: TEST_HOLD_AFTER=N makes the indexer
# stop before its (N+1)-th batch until the file TEST_RELEASE exists (so exactly N batches
# are committed while the run is held: a kill or a concurrent command lands at a known moment), and
# TEST_HOLD_IN_FAISS_SAVE leaves half a FAISS temp file and stops there; TEST_FILE_SIZE_CAP caps the size of any file the process writes (RLIMIT_FSIZE: a disk that fills
# up; SIGXFSZ ignored so a write past it fails, as a full disk fails with ENOSPC).
CLI_UNDER_TEST = """
import os, resource, runpy, signal, sys, time
hold = int(os.environ.get("TEST_HOLD_AFTER", "-1"))
if hold >= 0:
    from clipsearch import indexer
    embed = indexer._Run._embed  # whatever inference backend runs the batch
    calls = [0]
    def held(self, results):
        if calls[0] >= hold:
            release = os.environ.get("TEST_RELEASE", "")
            while not (release and os.path.exists(release)):
                time.sleep(0.02)
        calls[0] += 1
        return embed(self, results)
    indexer._Run._embed = held
if os.environ.get("TEST_HOLD_IN_FAISS_SAVE"):
    import faiss
    write = faiss.write_index
    def half_written(index, path):
        write(index, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        while True:  # killed here, with half a temporary file on disk
            time.sleep(0.05)
    faiss.write_index = half_written
cap = int(os.environ.get("TEST_FILE_SIZE_CAP", "0"))
if cap:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))
sys.argv = ["clipsearch", *sys.argv[1:]]
runpy.run_module("clipsearch", run_name="__main__", alter_sys=True)
"""


def spawn_cli(
    args,
    hold_after: int = -1,
    release: Path | None = None,
    cap: int = 0,
    plain: bool = False,
    hold_in_faiss_save: bool = False,
):
    """Start ``clipsearch ARGS`` in a real process (see CLI_UNDER_TEST for the hooks)."""
    env = dict(os.environ, TEST_HOLD_AFTER=str(hold_after), TEST_FILE_SIZE_CAP=str(cap))
    env["TEST_HOLD_IN_FAISS_SAVE"] = "1" if hold_in_faiss_save else ""
    env["TEST_RELEASE"] = str(release or "")
    cmd = [sys.executable, "-m", "clipsearch"] if plain else [sys.executable, "-c", CLI_UNDER_TEST]
    return subprocess.Popen(
        [*cmd, *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def committed(db: Path) -> int:
    """Embeddings committed so far, read without clipsearch (0 while the schema does not exist)."""
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return 0


def _tables(db: Path) -> set[str]:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not ready() and time.monotonic() < deadline:
            assert proc.poll() is None, f"the run ended before the kill: {proc.communicate()}"
            time.sleep(0.02)
        assert ready(), "the moment to kill never came"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("moment", ["early", "after 3 batches"])
def test_sigkill_during_index_loses_nothing_and_the_next_run_completes(tmp_path, tmp_path_factory, moment):
    model = tiny_model_dir(tmp_path_factory)
    photos = make_photos(tmp_path / "photos", N_PHOTOS)
    db = tmp_path / "lib.db"
    args = ["--db", db, "index", "--model", model, tmp_path / "photos", "--batch-size", "2", "--workers", "1"]
    if moment == "early":
        # The untouched CLI, killed as soon as the library file appears (opening, migrating, or
        # loading the model).
        proc = spawn_cli(args, plain=True)
        _kill_when(proc, db.exists)
    else:
        batches = int(moment.split()[1])
        proc = spawn_cli(args, hold_after=batches)  # never released: held until killed
        _kill_when(proc, lambda: committed(db) >= 2 * batches)
        time.sleep(0.2)  # held now: nothing more can be committed
        assert committed(db) == 2 * batches

    done = committed(db)
    assert done < N_PHOTOS, "the run finished before the kill: nothing was tested"
    if db.exists() and db.stat().st_size and not _tables(db):
        # Killed while the first migration ran: it is one transaction, so no table at all; the
        # next run must migrate this empty database.
        assert done == 0
    elif db.exists() and db.stat().st_size:
        rows = db_rows(db)
        assert rows["integrity"] == "ok"
        # Each batch commits its images and their embeddings together: no image without its vector.
        assert len(rows["paths"]) == sum(rows["embeddings"].values()) == done
        assert len(set(rows["paths"])) == len(rows["paths"])
    if done:
        # The library opens and answers queries from what was committed.
        status = invoke("status", "--json", db=db)
        assert status.exit_code == 0, status.output
        assert json.loads(status.stdout)["images"] == done
        hits = invoke("query", "a photo", "--json", "--top", "100", db=db)
        assert hits.exit_code == 0, hits.output
        assert len(json.loads(hits.stdout)) == done

    result = invoke("index", "--model", model, tmp_path / "photos", "--json", db=db)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["new"], report["unchanged"], report["failed"]) == (N_PHOTOS - done, done, [])
    assert_complete(db, photos)
    hits = invoke("query", "a photo", "--json", "--top", "100", db=db)
    assert sorted(Path(h["path"]) for h in json.loads(hits.stdout)) == sorted(photos)


def test_sigkill_while_saving_the_faiss_index(tmp_path, tmp_path_factory):
    """Every batch is committed, the FAISS file of the previous run is still in place and half of
    the new one is written to its temporary name when the process dies."""
    model = tiny_model_dir(tmp_path_factory)
    db = tmp_path / "lib.db"
    photos = make_photos(tmp_path / "photos", 3)
    assert invoke("index", "--model", model, tmp_path / "photos", "--json", db=db).exit_code == 0
    (index_file,) = faiss_files(db)
    before = index_file.read_bytes()
    photos += make_photos(tmp_path / "photos", 4, start=3)
    proc = spawn_cli(["--db", db, "index", tmp_path / "photos"], hold_in_faiss_save=True)
    temps = lambda: [p for p in index_file.parent.iterdir() if p.name.endswith(".tmp")]  # noqa: E731
    _kill_when(proc, lambda: bool(temps()) and committed(db) == len(photos))
    time.sleep(0.1)
    assert index_file.read_bytes() == before  # the rename never happened: the old index stands

    hits = invoke("query", "a photo", "--json", "--top", "100", db=db)
    assert hits.exit_code == 0, hits.output
    assert sorted(Path(h["path"]) for h in json.loads(hits.stdout)) == sorted(photos)
    result = invoke("index", tmp_path / "photos", "--json", db=db)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["new"], report["unchanged"], report["failed"]) == (0, len(photos), [])
    assert_complete(db, photos)
    doctor = invoke("doctor", db=db)
    assert doctor.exit_code == 0 and "in step with SQLite (7 vectors" in doctor.stdout, doctor.output


def test_full_disk_while_indexing_is_a_clear_error_and_loses_nothing(tmp_path, tmp_path_factory):
    model = tiny_model_dir(tmp_path_factory)
    db = tmp_path / "lib.db"
    first = make_photos(tmp_path / "photos", 4)
    assert invoke("index", "--model", model, tmp_path / "photos", "--json", db=db).exit_code == 0
    before = db_rows(db)
    more = make_photos(tmp_path / "photos", 20, start=4)

    # No file may grow past the library's current size: the WAL fills up a few batches in.
    cap = db.stat().st_size
    proc = spawn_cli(
        ["--db", db, "index", tmp_path / "photos", "--batch-size", "1", "--workers", "1"], cap=cap
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, (out, err)
    # One error line (besides the progress bar's last frame) naming the library, and not a "bug".
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert str(db) in errors[0] and "bug" not in errors[0], err

    # The library opens, passes its integrity check and still has everything committed before.
    after = db_rows(db)
    assert after["integrity"] == "ok"
    assert set(before["paths"]) <= set(after["paths"])
    assert len(after["paths"]) == sum(after["embeddings"].values()) == len(set(after["paths"]))
    status = invoke("status", "--json", db=db)
    assert status.exit_code == 0 and json.loads(status.stdout)["images"] == len(after["paths"])

    # With space again, the next run completes.
    result = invoke("index", tmp_path / "photos", "--json", db=db)
    assert result.exit_code == 0, result.output
    assert_complete(db, first + more)
