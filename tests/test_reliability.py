"""Reliability through the real CLI: the FAISS index is a derived file (deleted, truncated or out of
step, it is detected and rebuilt from SQLite, and ``clipsearch doctor`` says what it did), and every
command given bad arguments exits non-zero with one clear line and no traceback (``--verbose``
shows it).

The helpers at the top (a tiny saved model shared by the session, an in-process CLI runner, an
independent look into the library files) are imported by the other reliability test files.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from e2e_helpers import make_tiny_model, run_cli, write_photo

# --------------------------------------------------------------------------------------------------
# Shared helpers


def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny-vit clipsearch model folder, written once per test session."""
    target = tmp_path_factory.getbasetemp() / "reliability-tiny-model"
    if not (target / "clipsearch_model.json").exists():
        make_tiny_model(target)
    return target


def invoke(*args, db: Path | None = None):
    """Run ``clipsearch ARGS`` in this process (click's CliRunner); stdout and stderr kept apart."""
    from clipsearch.cli import cli

    argv = (["--db", str(db)] if db is not None else []) + [str(a) for a in args]
    return CliRunner().invoke(cli, argv, prog_name="clipsearch")


def make_photos(root: Path, n: int, start: int = 0) -> list[Path]:
    """``n`` distinct small PNG photos ``root/pNN.png``."""
    return [write_photo(root / f"p{i:02d}.png", i, size=(40, 32)) for i in range(start, start + n)]


def db_rows(db: Path) -> dict:
    """What the library holds, read with plain sqlite3 (not through clipsearch).

    ``paths``: every images.path, absolute (duplicates kept, so a double insert shows), ``embeddings``:
    count per model, ``orphans``: embeddings without an image row.
    """
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        # Stored relative to the database's folder when under it: made absolute here.
        paths = [str(db.parent / r[0]) for r in conn.execute("SELECT path FROM images ORDER BY id")]
        per_model = dict(conn.execute("SELECT model_id, count(*) FROM embeddings GROUP BY model_id"))
        orphans = conn.execute(
            "SELECT count(*) FROM embeddings e LEFT JOIN images i ON i.id = e.image_id WHERE i.id IS NULL"
        ).fetchone()[0]
        ids = [r[0] for r in conn.execute("SELECT image_id FROM embeddings ORDER BY image_id")]
        errors = {r[0]: r[1] for r in conn.execute("SELECT path, reason FROM errors")}
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    return {
        "paths": paths,
        "embeddings": per_model,
        "orphans": orphans,
        "embedding_ids": ids,
        "errors": errors,
        "integrity": check,
    }


def faiss_files(db: Path) -> list[Path]:
    return sorted(db.with_name(db.name + ".faiss").glob("*.index"))


def faiss_ids(index_file: Path) -> list[int]:
    """The ids stored in a FAISS index file, read with faiss itself."""
    import faiss

    index = faiss.read_index(str(index_file))
    return sorted(faiss.vector_to_array(faiss.downcast_index(index).id_map).tolist())


def assert_complete(db: Path, photos: list[Path]) -> None:
    """Every photo exactly once, each with one embedding, nothing orphaned, FAISS == SQLite."""
    rows = db_rows(db)
    assert rows["integrity"] == "ok"
    assert len(rows["paths"]) == len(set(rows["paths"])), "a path is stored twice"
    stored = sorted(Path(p).name for p in rows["paths"])
    assert stored == sorted(p.name for p in photos)
    assert list(rows["embeddings"].values()) == [len(photos)]
    assert rows["orphans"] == 0
    (index_file,) = faiss_files(db)
    assert faiss_ids(index_file) == rows["embedding_ids"]


def one_line_error(result) -> str:
    """The failure message of a CLI result: non-zero exit, no traceback, exactly one 'Error' line."""
    err = result.stderr if hasattr(result, "stderr") else ""
    assert result.exit_code != 0 if hasattr(result, "exit_code") else result.returncode != 0
    assert "Traceback" not in err and "Traceback" not in (result.stdout or "")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^(error|[\w.-]+( \w+)?: error):", ln, re.IGNORECASE)]
    assert len(errors) == 1, err
    # Only click's usage header may come with it, never a stack or a second message.
    assert all(ln.startswith(("Usage:", "Try ", "usage:", "  ")) or ln in errors for ln in lines), err
    return errors[0]


# --------------------------------------------------------------------------------------------------
# A library indexed once for this file


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    photos = make_photos(root / "photos", 5)
    db = root / "lib.db"
    model = tiny_model_dir(tmp_path_factory)
    result = invoke("index", "--model", model, root / "photos", "--json", db=db)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["new"] == 5
    return db, photos, model


def _doctor(db: Path) -> str:
    result = invoke("doctor", db=db)
    assert result.exit_code == 0, result.output
    return result.stdout


# --------------------------------------------------------------------------------------------------
# The FAISS index: a derived file, repaired from SQLite


def test_doctor_reports_an_index_in_step(indexed):
    db, photos, _ = indexed
    out = _doctor(db)
    assert "passes the integrity check" in out and "in step with SQLite (5 vectors, flat)" in out
    assert_complete(db, photos)


@pytest.mark.parametrize("damage", ["deleted", "truncated", "garbage"])
def test_damaged_faiss_index_is_rebuilt_and_doctor_says_so(indexed, damage):
    db, photos, _ = indexed
    (index_file,) = faiss_files(db)
    if damage == "deleted":
        index_file.unlink()
    elif damage == "truncated":
        data = index_file.read_bytes()
        index_file.write_bytes(data[: len(data) // 3])
    else:
        index_file.write_bytes(b"\x00" * 64)
    out = _doctor(db)
    assert "was missing or out of step: rebuilt from SQLite (5 vectors" in out, out
    assert_complete(db, photos)
    assert "in step with SQLite" in _doctor(db)  # and the repair was saved


def test_doctor_removes_nan_vectors_a_damaged_model_stored_and_index_embeds_them_again(
    tmp_path, tmp_path_factory
):
    """Before the indexer refused them, a model with a NaN weight stored NaN vectors for every photo
    and each search then failed ("the query parts cancel out"). doctor finds and removes them; the
    photos stay, and the next index run embeds them again."""
    import sqlite3

    import numpy as np

    model = tiny_model_dir(tmp_path_factory)
    db = tmp_path / "lib.db"
    make_photos(tmp_path / "photos", 3)
    assert invoke("index", "--model", model, tmp_path / "photos", db=db).exit_code == 0
    with sqlite3.connect(db) as conn:  # what such a model left behind, in one photo's row
        (image_id, blob) = conn.execute("SELECT image_id, vector FROM embeddings LIMIT 1").fetchone()
        bad = np.frombuffer(blob, dtype=np.float32).copy()
        bad[:] = np.nan
        conn.execute("UPDATE embeddings SET vector = ? WHERE image_id = ?", (bad.tobytes(), image_id))
    out = _doctor(db)
    assert "removed 1 vector(s)" in out and "NaN or infinite" in out, out
    assert "(2 vectors, flat)" in out
    status = json.loads(invoke("status", "--json", db=db).stdout)
    assert status["images"] == 3 and status["models"][0]["embedded"] == 2
    assert (
        json.loads(invoke("index", "--model", model, tmp_path / "photos", "--json", db=db).stdout)["new"] == 1
    )
    assert "in step with SQLite (3 vectors, flat)" in _doctor(db)
    assert invoke("query", "a photo", db=db).exit_code == 0


def test_faiss_index_behind_sqlite_is_caught_up_by_doctor_and_by_a_query(tmp_path, tmp_path_factory):
    model = tiny_model_dir(tmp_path_factory)
    db = tmp_path / "lib.db"
    photos = make_photos(tmp_path / "photos", 3)
    assert invoke("index", "--model", model, tmp_path / "photos", "--json", db=db).exit_code == 0
    (index_file,) = faiss_files(db)
    sidecar = index_file.with_suffix(".json")
    old = sidecar.read_bytes()
    saved = tmp_path / "saved.index"
    os.link(index_file, saved)  # the very file (its inode, which its sidecar's MAC names)

    def put_back_the_old_index():
        os.link(saved, tmp_path / "again.index")
        os.replace(tmp_path / "again.index", index_file)
        sidecar.write_bytes(old)

    photos += make_photos(tmp_path / "photos", 2, start=3)
    assert invoke("index", tmp_path / "photos", "--json", db=db).exit_code == 0
    # Put back the index of three photos, as if the run had died before saving it.
    put_back_the_old_index()
    assert len(faiss_ids(index_file)) == 3
    out = _doctor(db)
    assert "was behind SQLite: brought up to date (5 vectors" in out, out
    assert_complete(db, photos)

    # Without doctor, a query finds the stale index and answers over all five photos.
    put_back_the_old_index()
    result = invoke("query", "a photo", "--json", "--top", "10", db=db)
    assert result.exit_code == 0, result.output
    assert sorted(Path(h["path"]).name for h in json.loads(result.stdout)) == sorted(p.name for p in photos)


def test_doctor_removes_the_vectors_of_photos_deleted_with_foreign_keys_off(tmp_path, tmp_path_factory):
    """`sqlite3 library.db "DELETE FROM images WHERE ..."` (the shell leaves foreign keys off) keeps
    their embeddings: status counted them and doctor passed the library; once the FAISS index was
    rebuilt (a copied library) doctor found it short and sent the user to `doctor --rebuild`, which
    failed the same way, for ever. Doctor removes them."""
    model = tiny_model_dir(tmp_path_factory)
    db = tmp_path / "lib.db"
    photos = make_photos(tmp_path / "photos", 4)
    assert invoke("index", "--model", model, tmp_path / "photos", "--json", db=db).exit_code == 0
    conn = sqlite3.connect(db)
    gone = conn.execute("SELECT path FROM images ORDER BY id LIMIT 1").fetchone()[0]
    conn.execute("DELETE FROM images WHERE path = ?", (gone,))
    conn.commit()
    conn.close()
    assert db_rows(db)["orphans"] == 1
    out = _doctor(db)
    assert "removed 1 embedding(s) and label(s) of photos no longer in the library" in out, out
    assert_complete(db, [p for p in photos if p.name != Path(gone).name])
    assert "removed" not in _doctor(db)


def test_doctor_says_so_when_the_repaired_index_cannot_be_saved(tmp_path, tmp_path_factory):
    """`<db>.faiss` replaced by a file (or a full disk): doctor printed "rebuilt from SQLite ... OK"
    on every run while nothing was ever saved."""
    import shutil

    model = tiny_model_dir(tmp_path_factory)
    db = tmp_path / "lib.db"
    make_photos(tmp_path / "photos", 3)
    assert invoke("index", "--model", model, tmp_path / "photos", "--json", db=db).exit_code == 0
    folder = tmp_path / "lib.db.faiss"
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    result = invoke("doctor", db=db)
    assert result.exit_code == 1 and "OK" not in result.stdout
    assert "rebuilt from SQLite in memory only (it could not be saved) (3 vectors" in result.stdout
    line = one_line_error(result)
    assert "could not be saved in" in line and str(folder) in line
    assert invoke("query", "a photo", db=db).exit_code == 0  # still answers, from memory


def test_doctor_on_a_corrupt_database_says_so_in_one_line(tmp_path):
    db = tmp_path / "lib.db"
    db.write_bytes(b"SQLite format 3\x00" + b"\xff" * 2000)
    line = one_line_error(invoke("doctor", db=db))
    assert str(db) in line


# --------------------------------------------------------------------------------------------------
# Every command with bad arguments: non-zero, one clear line, no traceback


def _bad_clipsearch_calls(db: Path, tmp: Path, photos_dir: Path):
    missing = tmp / "nope"
    return [
        (("index",), "Missing argument"),
        (("index", missing), "no such file or folder"),
        (("index", "--batch-size", "0", photos_dir), "--batch-size"),
        (("index", "--index-kind", "pq", photos_dir), "--index-kind"),
        (("index", "--model", missing / "model", photos_dir), "nope"),
        (("query",), "give a TEXT"),
        (("query", "x", "--top", "0"), "--top"),
        (("query", "x", "--threshold", "2"), "--threshold"),
        (("query", "--image", missing / "q.jpg"), "q.jpg: no such file"),
        (("query", "x", "--in", missing), "no such folder"),
        (("query", "x", "--json", "--paths"), "pick one"),
        (("query", "x", "--model", missing / "m.pt"), "nope"),
        (("label",), "--classes"),
        (("label", "--classes", "a,b", "--classes-file", missing), "exactly one"),
        (("label", "--classes-file", missing), "cannot read --classes-file"),
        (("label", "--classes", "a", "--threshold", "7"), "--threshold"),
        (("export",), "Missing argument"),
        (("export", missing / "sub" / "x.npz"), "does not exist"),
        (("export", tmp / "x.npz", "--model-id", "no-such-model"), "no model 'no-such-model'"),
        (("status", "--errors", "-1"), "--errors"),
        (("models", "--bogus"), "--bogus"),
        (("doctor", "--bogus"), "--bogus"),
        (("frobnicate",), "No such command"),
    ]


def test_every_command_with_bad_arguments_fails_in_one_line(indexed, tmp_path):
    db, photos, _ = indexed
    for args, expected in _bad_clipsearch_calls(db, tmp_path, photos[0].parent):
        result = invoke(*args, db=db)
        line = one_line_error(result)
        assert expected.lower() in line.lower(), (args, line)
        assert result.exit_code in (1, 2), (args, result.exit_code)


@pytest.mark.parametrize("command", [("query", "x"), ("label", "--classes", "a,b"), ("status",), ("doctor",)])
def test_read_commands_without_a_library_fail_in_one_line(tmp_path, command):
    db = tmp_path / "missing.db"
    line = one_line_error(invoke(*command, db=db))
    assert "no library at" in line and "clipsearch index" in line
    assert not db.exists()  # a read command creates nothing
    line = one_line_error(invoke(*command, db=tmp_path))  # a folder as --db
    assert "is a directory" in line or "is a folder" in line


def test_verbose_shows_the_traceback(tmp_path):
    quiet = invoke("status", db=tmp_path / "missing.db")
    loud = invoke("--verbose", "status", db=tmp_path / "missing.db")
    assert quiet.exit_code == loud.exit_code == 1
    assert "Traceback" not in quiet.stderr
    assert "Traceback (most recent call last)" in loud.stderr and "LibraryError" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()


def test_a_real_process_fails_in_one_line(tmp_path):
    """The same contract outside CliRunner: exit code and stderr of ``python -m clipsearch``."""
    proc = run_cli("--db", str(tmp_path / "missing.db"), "query", "beach", timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: no library at"), proc.stderr


def _train_main(argv, capsys):
    from trainer.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()

    class Result:
        exit_code = code
        stdout = captured.out
        stderr = captured.err

    return Result


def test_every_clipsearch_train_subcommand_with_bad_arguments_fails_in_one_line(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the default --output (runs/clip) is relative: not the checkout's own
    missing = tmp_path / "nope"
    write_photo(tmp_path / "zs" / "red" / "a.png", 1)
    calls = [
        (("train",), "--train-data"),
        (("--train-data", missing / "train.csv", "--epochs", "x"), "--epochs"),
        (("train", "--train-data", missing / "train.csv", "--device", "cpu"), "nope"),
        (("eval",), "--model"),
        (("eval", "--model", "tiny"), "give at least one"),
        (("eval", "--model", missing / "m", "--zeroshot-data", tmp_path / "zs"), "nope"),
        (("synth",), "OUT_DIR"),
        (("synth", tmp_path / "s", "--n", "many"), "--n"),
        (("demo", "--minutes", "soon"), "--minutes"),
        (("frobnicate", "--x"), "no such command"),  # a mistyped subcommand, as in clipsearch
    ]
    for args, expected in calls:
        result = _train_main(args, capsys)
        line = one_line_error(result)
        assert expected.lower() in line.lower(), (args, line)
