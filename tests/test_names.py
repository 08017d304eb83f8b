"""Any file name: names that are not UTF-8 index, are stored reversibly and come back byte-exact;
a tree thousands of folders deep walks; a stored path with ``..`` is refused."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_indexer import FakeBundle, write_image
from test_reliability import invoke, one_line_error, tiny_model_dir

from clipsearch.errors import LibraryError
from clipsearch.indexer import index_paths
from clipsearch.store import Library, path_text, text_path
from clipsearch.walk import walk

LATIN1_FOLDER = b"f\xf6r Oma"  # "för Oma" in Latin-1: not UTF-8
LATIN1_PHOTO = b"caf\xe9 \xe0 Paris.png"


@given(
    st.lists(
        st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")),
        max_size=4,
    )
)
def test_the_stored_text_is_utf8_and_gives_the_exact_bytes_back(parts):
    name = os.fsdecode(b"/".join([b"", b"photos", *parts]))
    text = path_text(name)
    text.encode("utf-8")  # SQLite TEXT: must be valid UTF-8 (raises otherwise)
    assert os.fsencode(text_path(text)) == os.fsencode(name)
    # Folder prefixes survive the escape: "photos in this folder" finds escaped names.
    if parts:
        folder = os.fsdecode(b"/".join([b"", b"photos", *parts[:-1]]))
        assert text.startswith(path_text(folder) + "/")


def test_characters_of_the_escape_range_are_themselves_escaped():
    real = "photo \U0010ffab.png"  # a valid (private use) character that the escape also uses
    assert text_path(path_text(real)) == real
    assert path_text(real) != real


def _latin_library(tmp_path, tmp_path_factory):
    folder = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"photos", LATIN1_FOLDER)))
    photo = Path(os.fsdecode(os.path.join(os.fsencode(folder), LATIN1_PHOTO)))
    write_image(photo, 1)
    write_image(folder / "plain.png", 2)
    db = tmp_path / "lib.db"
    result = invoke(
        "index", "--model", tiny_model_dir(tmp_path_factory), tmp_path / "photos", "--json", db=db
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["new"] == 2 and json.loads(result.stdout)["failed"] == []
    return db, folder, photo


def test_a_latin1_name_round_trips_through_paths_json_and_export(tmp_path, tmp_path_factory):
    db, folder, photo = _latin_library(tmp_path, tmp_path_factory)
    want = os.fsencode(photo)

    paths = invoke("query", "a photo", "--paths", db=db)
    assert paths.exit_code == 0, paths.output
    assert want in paths.stdout_bytes.split(b"\n")  # the exact bytes, for xargs

    as_json = invoke("query", "a photo", "--json", db=db)
    assert as_json.exit_code == 0, as_json.output
    assert "\\udce9" in as_json.stdout  # the documented escape: a lone surrogate per byte
    got = {os.fsencode(hit["path"]) for hit in json.loads(as_json.stdout)}
    assert want in got

    inside = invoke("query", "a photo", "--paths", "--in", folder, db=db)  # a folder with a Latin-1 name
    assert inside.exit_code == 0, inside.output
    assert sorted(inside.stdout_bytes.splitlines()) == sorted([want, os.fsencode(folder / "plain.png")])

    out = tmp_path / "emb.npz"
    assert invoke("export", out, db=db).exit_code == 0
    with np.load(out) as npz:
        assert want in {os.fsencode(str(p)) for p in npz["paths"]}

    # An independent reader sees valid UTF-8 TEXT in the database.
    conn = sqlite3.connect(db)
    conn.text_factory = bytes
    raw = [r[0] for r in conn.execute("SELECT path FROM images")]
    conn.close()
    assert all(r.decode("utf-8") for r in raw)


def test_a_second_run_over_latin1_names_changes_nothing(tmp_path, tmp_path_factory):
    db, folder, photo = _latin_library(tmp_path, tmp_path_factory)
    again = invoke("index", tmp_path / "photos", "--json", db=db)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["unchanged"] == 2


# --- deep trees -------------------------------------------------------------------------------------


def test_a_tree_thousands_of_folders_deep_walks(tmp_path):
    depth = max(1500, sys.getrecursionlimit() + 100)  # a recursive walk would fail well before this
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        for _ in range(depth):  # os.makedirs itself recurses: build it one level at a time
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    found = walk([tmp_path])
    assert [f.path.name for f in found.files] == ["deep.png"] and found.failed == []
    assert found.files[0].path.relative_to(tmp_path).parts.count("d") == depth
    # Take it down a level at a time (shutil.rmtree recurses too): lift the child, drop the parent.
    top = tmp_path / "d"
    while (top / "d").exists():
        os.rename(top / "d", tmp_path / "lifted")
        for entry in os.listdir(top):
            os.unlink(top / entry)
        os.rmdir(top)
        os.rename(tmp_path / "lifted", top)


def test_walk_order_is_the_sorted_depth_first_order(tmp_path):
    for rel in ["b.png", "a/z.png", "a/b/c.png", "c/a.png", "a.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = [f.path.relative_to(tmp_path).as_posix() for f in walk([tmp_path]).files]
    assert got == ["a/b/c.png", "a/z.png", "a.png", "b.png", "c/a.png"]


# --- stored paths with .. ---------------------------------------------------------------------------


def test_a_stored_path_with_dotdot_is_refused(tmp_path):
    write_image(tmp_path / "photos" / "a.png", 1)
    db = tmp_path / "lib.db"
    with Library.open(db, create=True) as lib:
        index_paths(lib, FakeBundle(), [tmp_path / "photos"], update_vectors=False)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE images SET path = 'photos/../../../home/victim/.bashrc'")
    conn.close()
    with Library.open(db) as lib, pytest.raises(LibraryError, match=r"'\.\.'.*altered"):
        lib.embeddings("fake/v1")
    line = one_line_error(invoke("label", "--classes", "a,b", "--write-xmp", db=db))
    assert "altered" in line or "model" in line
    assert not list(tmp_path.rglob("*.xmp"))
