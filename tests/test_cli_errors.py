"""Exit codes and messages: every command with bad input exits non-zero with one clear line and no
traceback; usage errors exit 2; a bug says it is one; Ctrl-C exits 130."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from e2e_helpers import make_tiny_model, run_cli, write_photo

from clipsearch import cli as cli_module
from clipsearch.cli import cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("err-model") / "tiny")


@pytest.fixture(scope="module")
def library(tmp_path_factory, model_dir) -> Path:
    root = tmp_path_factory.mktemp("err-lib")
    write_photo(root / "p" / "a.jpg", 1)
    db = root / "lib.db"
    result = run(["--db", db, "index", root / "p", "--model", model_dir])
    assert result.exit_code == 0, result.output
    return db


def run(args):
    return CliRunner(env={"COLUMNS": "250"}).invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, code: int = 1, match: str | None = None):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    if match:
        assert match in errors[0], errors[0]
    return errors[0]


def test_missing_path(tmp_path, model_dir):
    r = run(["--db", tmp_path / "l.db", "index", tmp_path / "nope", "--model", model_dir])
    assert_one_line_error(r, match="no such file or folder")


def test_empty_folder(tmp_path, model_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    r = run(["--db", tmp_path / "l.db", "index", tmp_path / "empty", "--model", model_dir])
    assert_one_line_error(r, match="no images found")


def test_empty_folder_with_the_default_model_downloads_nothing(tmp_path, monkeypatch):
    """A first `clipsearch index` in a folder without photos says so before fetching any model."""
    from clipsearch import pretrained

    def no_download(*args, **kwargs):
        raise AssertionError("a folder with no images must not start a model download")

    monkeypatch.setattr(pretrained, "fetch_pretrained", no_download)
    monkeypatch.setattr("clipsearch.checkpoints.fetch_pretrained", no_download, raising=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    assert cli_module.DEFAULT_MODEL not in pretrained.cached_pretrained()  # a new home: not downloaded
    r = run(["--db", tmp_path / "l.db", "index", tmp_path / "empty"])
    assert_one_line_error(r, match="no images found")


@pytest.mark.parametrize(
    "args",
    [["query", "beach"], ["label", "--classes", "a,b"], ["export", "x.npz"], ["status"], ["doctor"]],
    ids=lambda a: a[0],
)
def test_commands_before_any_index(tmp_path, args):
    r = run(["--db", tmp_path / "none.db", *args])
    assert_one_line_error(r, match="run `clipsearch index PATH` first")
    assert not (tmp_path / "none.db").exists()  # a read command creates nothing


def test_unknown_model(tmp_path):
    write_photo(tmp_path / "p" / "a.jpg", 1)
    r = run(["--db", tmp_path / "l.db", "index", tmp_path / "p", "--model", "ViT-Q-99/nobody"])
    assert_one_line_error(r, match="unknown model")
    r = run(["--db", tmp_path / "l.db", "index", tmp_path / "p", "--model", tmp_path / "missing.safetensors"])
    assert_one_line_error(r, match="not found")


def test_query_with_a_model_the_library_lacks(library, tmp_path):
    other = make_tiny_model(tmp_path / "other", seed=5)
    assert_one_line_error(
        run(["--db", library, "query", "x", "--model", other]), match="no embeddings of model"
    )


@pytest.mark.parametrize(
    "content",
    [b"this is not a database at all" * 100, b"SQLite format 3\x00" + bytes(range(256)) * 8],
    ids=str,
)
def test_corrupted_database(tmp_path, content):
    db = tmp_path / "lib.db"
    db.write_bytes(content)
    for args in (["query", "x"], ["status"], ["doctor"], ["index", tmp_path]):
        r = run(["--db", db, *args])
        assert r.exit_code != 0 and "Traceback" not in r.output, (args, r.output)
        assert r.stderr.startswith("Error:"), (args, r.stderr)


def test_zero_length_database_is_no_library_until_index_makes_it_one(tmp_path):
    """SQLite treats an empty file as an empty database. A read command leaves it as it is (0 bytes:
    it does not write a schema into it); `index` makes it a library."""
    db = tmp_path / "lib.db"
    db.write_bytes(b"")
    for args in (
        ["query", "x"],
        ["status"],
        ["similar", "1"],
        ["duplicates"],
        ["export", tmp_path / "e.npz"],
    ):
        assert_one_line_error(run(["--db", db, *args]), match="the file is empty")
        assert db.stat().st_size == 0, args


def test_foreign_sqlite_database(tmp_path):
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    assert_one_line_error(run(["--db", db, "status"]), match="not a clipsearch library")


def test_db_is_a_folder(tmp_path):
    assert_one_line_error(run(["--db", tmp_path, "status"]), code=2)  # click refuses a folder for --db


@pytest.mark.parametrize(
    "args, match",
    [
        (["query", "--image", "missing.jpg"], "query image missing.jpg: no such file"),
        (["query", "x", "--in", "no-such-dir"], "no such folder"),
        (["query", "beach", "--minus", "beach"], "cancel out"),
        (["label", "--classes", " , "], "no class names"),
        (["label", "--classes", "a,a"], "given twice"),
        (["label", "--classes", "a", "--template", "no placeholder"], "exactly once"),
        (["label", "--classes-file", "missing.txt"], "cannot read --classes-file"),
        (["export", "no/such/folder/x.npz"], "does not exist"),
        (["export", "x.npz", "--model-id", "nope"], "no model 'nope'"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_on_an_indexed_library(library, tmp_path, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    code = 2 if "--in" in args else 1  # a filter's bad value is a usage error, said in one line
    assert_one_line_error(run(["--db", library, *args]), code=code, match=match)


def test_export_that_cannot_be_written_names_the_file(library, tmp_path, monkeypatch):
    """A full disk said only "Error: No space left on device"; a read-only folder named the hidden
    temporary (".x.npz.k2j4h5l6.tmp") instead of the file the user asked for."""
    import errno

    import numpy as np

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(np, "savez", full)
        line = assert_one_line_error(run(["--db", library, "export", tmp_path / "x.npz"]))
    assert line == f"Error: cannot write {tmp_path / 'x.npz'}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_a_path_that_is_not_a_photo_file_is_named_for_what_it_is(library, tmp_path, monkeypatch):
    # "not found" for a folder, a FIFO, a loop or a dangling link sends the user looking for the wrong thing
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afolder").mkdir()
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    os.symlink("nowhere.jpg", tmp_path / "gone.jpg")
    (tmp_path / "file.txt").write_text("x")
    for args, code, match in [
        (["query", "--image", "afolder"], 1, "query image afolder: a folder"),
        (["query", "--image", "pipe.jpg"], 1, "query image pipe.jpg: a FIFO"),
        (["query", "--image", "loop.jpg"], 1, "query image loop.jpg: a symlink loop"),
        (["query", "x", "--add-image", "gone.jpg"], 1, "query image gone.jpg: a symlink to nothing"),
        (["similar", "afolder"], 1, "afolder: a folder"),
        (["query", "x", "--in", "file.txt"], 2, "--in file.txt: a file, not a folder"),
        (["index", "pipe.jpg"], 1, "nothing indexed under pipe.jpg: "),
        (["index", "gone.jpg"], 1, "gone.jpg: dead symlink"),
    ]:
        assert_one_line_error(run(["--db", library, *args]), code=code, match=match)


@pytest.mark.parametrize(
    "args",
    [
        ["nosuchcommand"],
        ["index"],
        ["index", ".", "--batch-size", "0"],
        ["index", ".", "--index-kind", "pq"],
        ["query"],
        ["query", "x", "--top", "0"],
        ["query", "x", "--top", "many"],
        ["query", "x", "--threshold", "2"],
        ["query", "x", "--json", "--paths"],
        ["label"],
        ["label", "--classes", "a", "--classes-file", "f"],
        ["label", "--classes", "a", "--threshold", "1.5"],
        ["export"],
        ["status", "--bogus"],
        ["models", "extra"],
        ["doctor", "--bogus"],
    ],
    ids=" ".join,
)
def test_usage_errors_exit_2_without_traceback(library, args):
    r = run(["--db", library, *args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert "Error" in r.stderr


def test_a_bug_is_one_line_and_verbose_shows_the_trace(library, monkeypatch):
    def broken(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr("clipsearch.store.Library.stats", broken)
    line = assert_one_line_error(run(["--db", library, "status"]), match="this is a bug")
    assert "ZeroDivisionError: boom" in line and "--verbose" in line
    verbose = run(["--db", library, "--verbose", "status"])
    assert verbose.exit_code == 1
    assert "Traceback" in verbose.stderr and "ZeroDivisionError" in verbose.stderr


def test_ctrl_c_exits_130(library, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_load_bundle", interrupted)
    r = run(["--db", library, "label", "--classes", "a,b"])  # always loads the model
    assert r.exit_code == 130
    assert "Traceback" not in r.output


def test_library_error_with_verbose_shows_the_trace(tmp_path):
    r = run(["--db", tmp_path / "none.db", "-v", "status"])
    assert r.exit_code == 1
    assert "Traceback" in r.stderr and "LibraryError" in r.stderr


def test_subprocess_errors_are_one_line(tmp_path):
    """The real console entry: a missing library and a usage error, as a shell sees them."""
    r = run_cli("--db", str(tmp_path / "none.db"), "status")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("Error: no library at")
    r = run_cli("query", "--top", "zero")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_environment_errors_are_one_line_not_bugs(library, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device", "/photos/library.db")

    monkeypatch.setattr("clipsearch.store.Library.stats", full)
    line = assert_one_line_error(run(["--db", library, "status"]))
    assert line == "Error: No space left on device: /photos/library.db"
