"""Searching by what a photo is: filters, `similar`, pipe-friendly output, metadata of old libraries.

One library of real files (EXIF written by Pillow, RAW containers from ``photo_samples.py``) indexed
with a tiny random model; every filter must return exactly the photos written to match it.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from e2e_helpers import REPO, make_tiny_model, run_cli, write_photo
from photo_samples import make_cr3, make_dng, make_raf, write_exif_photo

from clipsearch.cli import cli
from clipsearch.store import Library

PHOTOS = {
    # name: (writer, kwargs)
    "paris_2023.jpg": dict(
        taken="2023:05:01 10:00:00",
        offset="+02:00",
        make="Canon",
        model="Canon EOS R5",
        gps=(48.8584, 2.2945),
    ),
    "paris_2024.jpg": dict(
        taken="2024:01:15 12:00:00", make="NIKON CORPORATION", model="NIKON D850", gps=(48.8606, 2.3376)
    ),
    "tokyo.jpg": dict(
        taken="2024:06:01 23:30:00", offset="+09:00", make="Apple", model="iPhone 13", gps=(35.6762, 139.6503)
    ),
    "trips/newyear.webp": dict(taken="2022:12:31 23:59:59", make="Canon", model="Canon EOS 5D"),
    "trips/nothing.png": dict(),
}
RAWS = {"trips/london.dng", "ny.cr3", "fuji.raf"}
ALL = set(PHOTOS) | RAWS


def invoke(*args):
    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("photo-search")
    model = make_tiny_model(root / "tiny")
    photos = root / "photos"
    for n, (name, exif) in enumerate(PHOTOS.items()):
        write_exif_photo(photos / name, 20 + n, size=(120, 90), **exif)
    make_dng(photos / "trips" / "london.dng", 30, preview_size=(160, 120), gps=(51.5007, -0.1246))
    make_cr3(photos / "ny.cr3", 31, preview_size=(320, 240), gps=(40.6892, -74.0445))
    make_raf(photos / "fuji.raf", 32, preview_size=(300, 200))
    db = root / "lib.db"
    report = json.loads(invoke("--db", db, "index", photos, "--model", model, "--json").stdout)
    assert report["new"] == len(ALL) and report["failed"] == []
    return db, photos, model


def names(hits, photos: Path) -> set[str]:
    return {Path(h["path"]).relative_to(photos).as_posix() for h in hits}


def query_json(db, *args) -> list[dict]:
    return json.loads(invoke("--db", db, "query", "a photo", "--json", "-n", "50", *args).stdout)


@pytest.mark.parametrize(
    "args, expected",
    [
        ((), ALL),
        (("--after", "2024-01-01"), {"paris_2024.jpg", "tokyo.jpg"}),
        (("--before", "2023"), {"trips/newyear.webp", "trips/london.dng", "ny.cr3", "fuji.raf"}),
        (("--after", "2023-01-01", "--before", "2024-01-01"), {"paris_2023.jpg"}),
        # 23:30 in Tokyo on 1 June is 1 June, whatever the time in UTC
        (("--after", "2024-06-01", "--before", "2024-06-02"), {"tokyo.jpg"}),
        (("--camera", "CANON"), {"paris_2023.jpg", "trips/newyear.webp", "ny.cr3"}),
        (("--camera", "iphone"), {"tokyo.jpg"}),
        (("--camera", "x-t4"), {"fuji.raf"}),
        (("--near", "48.8584,2.2945", "--within", "5"), {"paris_2023.jpg", "paris_2024.jpg"}),
        (("--near", "48.8584,2.2945", "--within", "1"), {"paris_2023.jpg"}),
        (("--near", "51.5,-0.12"), {"trips/london.dng"}),  # default 5 km
        (("--type", "raw"), RAWS),
        (("--type", "jpg,png"), {"paris_2023.jpg", "paris_2024.jpg", "tokyo.jpg", "trips/nothing.png"}),
        (("--type", "cr3,dng"), {"ny.cr3", "trips/london.dng"}),
        (("--in", "trips"), {"trips/newyear.webp", "trips/nothing.png", "trips/london.dng"}),
        (("--camera", "canon", "--after", "2023"), {"paris_2023.jpg"}),
        (("--camera", "canon", "--type", "raw", "--in", "trips"), set()),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else None,
)
def test_each_filter_returns_exactly_the_matching_photos(library, args, expected):
    db, photos, _ = library
    args = tuple(
        str(photos / a) if prev == "--in" else a
        for prev, a in zip((("",) + args)[: len(args)], args, strict=True)
    )
    assert names(query_json(db, *args), photos) == expected


def test_top_counts_among_the_filtered_photos(library):
    """The filter is inside the search: --top 2 gives the two best Canon photos, not the Canon
    photos among the two best overall."""
    db, photos, _ = library
    canon = query_json(db, "--camera", "canon")
    two = json.loads(invoke("--db", db, "query", "a photo", "--json", "-n", "2", "--camera", "canon").stdout)
    assert [h["path"] for h in two] == [h["path"] for h in canon[:2]]
    overall = query_json(db)
    assert [h["image_id"] for h in canon] == [
        h["image_id"] for h in overall if h["path"] in {c["path"] for c in canon}
    ]


def test_json_carries_the_photo_metadata(library):
    db, photos, _ = library
    by_name = {Path(h["path"]).name: h for h in query_json(db)}
    paris = by_name["paris_2023.jpg"]
    assert paris["taken_at"] == "2023-05-01T10:00:00+02:00" and paris["camera"] == "Canon EOS R5"
    assert (paris["width"], paris["height"]) == (120, 90)
    assert paris["lat"] == pytest.approx(48.8584, abs=1e-6) and paris["lon"] == pytest.approx(
        2.2945, abs=1e-6
    )
    assert by_name["paris_2024.jpg"]["camera"] == "NIKON D850"
    nothing = by_name["nothing.png"]
    assert [nothing[k] for k in ("taken_at", "camera", "lat", "lon")] == [None] * 4
    assert (
        by_name["london.dng"]["camera"] == "LEICA Q2"
        and by_name["ny.cr3"]["taken_at"] == "2022-08-09T10:11:12"
    )


def test_label_takes_the_filters(library):
    db, photos, _ = library
    rows = json.loads(
        invoke("--db", db, "label", "--classes", "cat,dog", "--camera", "canon", "--json").stdout
    )
    assert names(rows, photos) == {"paris_2023.jpg", "trips/newyear.webp", "ny.cr3"}


def test_bad_filters_are_one_line_errors(library):
    db, _, _ = library
    for args, words in [
        (("--after", "yesterday"), "YYYY-MM-DD"),
        (("--within", "3"), "--within needs --near"),
        (("--type", "psd"), "not a file type"),
        (("--near", "91,0"), "latitude"),
    ]:
        result = run_cli("--db", str(db), "query", "x", *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_nothing_found_says_why(library):
    db, _, _ = library
    result = run_cli("--db", str(db), "query", "x", "--camera", "hasselblad", "--table")
    assert result.returncode == 0 and "camera ~ 'hasselblad'" in result.stdout
    result = run_cli("--db", str(db), "query", "x", "--threshold", "0.9999", "--table")
    assert result.returncode == 0 and "--threshold 0.9999" in result.stdout
    # paths for a script: stdout stays empty, and the reason still reaches the person on stderr
    for flag in ("--paths", "-0"):
        result = run_cli("--db", str(db), "query", "x", "--camera", "hasselblad", flag)
        assert result.returncode == 0 and result.stdout == ""
        assert "No photos match" in result.stderr and "camera ~ 'hasselblad'" in result.stderr
    result = run_cli("--db", str(db), "duplicates", "--after", "2090")
    assert (
        result.returncode == 0 and "among the photos that pass the filters (taken from 2090" in result.stderr
    )


def test_text_that_is_not_utf8_is_a_bad_value(library):
    # a terminal in another encoding hands over bytes Python keeps as surrogates: refused up front
    db, _, _ = library
    for args in (
        ("query", "caf\udce9"),
        ("query", "x", "--camera", "\udcff"),
        ("label", "--classes", "caf\udce9"),
    ):
        result = run_cli("--db", str(db), *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "'caf\\xe9' is not UTF-8 text" in result.stderr or "'\\xff' is not UTF-8 text" in result.stderr
        assert "internal error" not in result.stderr


# --- similar --------------------------------------------------------------------------------------

NO_TORCH = (
    "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"  # import torch fails
    "from clipsearch.cli import main; sys.argv = ['clipsearch'] + sys.argv[1:]; main()"
)


def run_without_torch(*args):
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_similar_to_an_indexed_photo_never_imports_torch(library, tmp_path):
    db, photos, _ = library
    target = photos / "tokyo.jpg"
    result = run_without_torch("similar", target, "--db", db, "--json", "-n", "3")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert hits[0]["path"] == str(target) and hits[0]["score"] >= 0.999
    assert len(hits) == 3 and hits[1]["score"] <= hits[0]["score"]
    # by library id, with a filter: itself is not a Canon, so only Canons come back
    by_id = run_without_torch("--db", db, "similar", str(hits[0]["image_id"]), "--json", "--camera", "canon")
    assert by_id.returncode == 0, by_id.stderr
    assert names(json.loads(by_id.stdout), photos) == {"paris_2023.jpg", "trips/newyear.webp", "ny.cr3"}
    # the poison works: a query that needs the model (a photo the library does not know) fails here
    other = write_photo(tmp_path / "new.jpg", 98)
    assert run_without_torch("--db", db, "query", "--image", other).returncode != 0


def test_similar_to_a_copy_elsewhere_uses_the_stored_embedding(library, tmp_path):
    db, photos, _ = library
    copy = tmp_path / "copy.jpg"
    copy.write_bytes((photos / "paris_2024.jpg").read_bytes())
    result = run_without_torch("--db", db, "similar", copy, "--json", "-n", "1")
    assert result.returncode == 0, result.stderr
    assert Path(json.loads(result.stdout)[0]["path"]).name == "paris_2024.jpg"


def test_similar_puts_the_photo_itself_before_an_identical_copy(tmp_path):
    # the copy ties with it at 1.0; a.jpg (the lower id) came back first when b/a.jpg was asked for
    photos = tmp_path / "photos"
    write_photo(photos / "a.jpg", 1)
    (photos / "b").mkdir()
    (photos / "b" / "a.jpg").write_bytes((photos / "a.jpg").read_bytes())
    write_photo(photos / "c.jpg", 2)
    db = tmp_path / "lib.db"
    invoke("--db", db, "index", photos, "--model", make_tiny_model(tmp_path / "tiny"))
    for target in (photos / "b" / "a.jpg", photos / "a.jpg"):
        hits = json.loads(invoke("--db", db, "similar", target, "--json").stdout)
        assert Path(hits[0]["path"]) == target and hits[0]["score"] == pytest.approx(1.0)
        assert hits[1]["score"] == pytest.approx(1.0)  # the copy, right after it


def test_query_by_an_indexed_photo_uses_its_stored_vector(library, tmp_path):
    # as `similar` does: the photo scores 1.0 against itself (the int8 index backend's vector, not a
    # second fp32 encoding of it: 0.998), and no model is loaded for it, a copy elsewhere included
    db, photos, _ = library
    copy = tmp_path / "copy.jpg"
    copy.write_bytes((photos / "tokyo.jpg").read_bytes())
    for image in (photos / "tokyo.jpg", copy):
        result = run_without_torch("--db", db, "query", "--image", image, "--json", "-n", "2", "--verbose")
        assert result.returncode == 0, result.stderr
        hits = json.loads(result.stdout)
        assert Path(hits[0]["path"]).name == "tokyo.jpg" and hits[0]["score"] == pytest.approx(1.0, abs=1e-6)
        assert "its stored vector" in result.stderr


def test_a_photo_changed_since_indexing_is_not_queried_by_its_old_vector(tmp_path):
    # a.jpg now holds b.jpg's picture (edited, not indexed again): by its content it is b.jpg
    photos = tmp_path / "photos"
    write_photo(photos / "a.jpg", 1)
    write_photo(photos / "b.jpg", 2)
    db = tmp_path / "lib.db"
    invoke("--db", db, "index", photos, "--model", make_tiny_model(tmp_path / "tiny"))
    (photos / "a.jpg").write_bytes((photos / "b.jpg").read_bytes())
    for command in (("similar", photos / "a.jpg"), ("query", "--image", photos / "a.jpg")):
        hits = json.loads(invoke("--db", db, *command, "--json").stdout)
        assert Path(hits[0]["path"]) == photos / "b.jpg" and hits[0]["score"] == pytest.approx(1.0)


def test_similar_to_an_unindexed_file_encodes_it(library, tmp_path):
    db, photos, _ = library
    other = write_photo(tmp_path / "new.jpg", 99)
    hits = json.loads(invoke("--db", db, "similar", other, "--json", "-n", "4").stdout)
    assert len(hits) == 4 and all(-1 <= h["score"] <= 1 for h in hits)


def test_similar_errors(library):
    db, _, _ = library
    for target, words in [
        ("12345", "no photo with id 12345"),
        ("99999999999999999999999", "no photo with id 99999999999999999999999"),  # beyond SQLite's integers
        ("/no/such.jpg", "/no/such.jpg: no such file"),
    ]:
        result = run_cli("--db", str(db), "similar", target)
        assert result.returncode == 1 and words in result.stderr and "Traceback" not in result.stderr


# --- output for pipes -----------------------------------------------------------------------------


def test_piped_output_is_tsv(library):
    db, photos, _ = library
    result = run_cli("query", "a photo", "--db", str(db), "-n", "5")  # --db after the subcommand
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout), delimiter="\t"))
    assert len(rows) == 5 and all(len(r) == 2 for r in rows)
    scores = [float(r[0]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(Path(r[1]).is_file() for r in rows)
    same = json.loads(invoke("--db", db, "query", "a photo", "-n", "5", "--json").stdout)
    assert [r[1] for r in rows] == [h["path"] for h in same]


def test_null_separated_paths(library):
    db, _, _ = library
    out = subprocess.run(
        [sys.executable, "-m", "clipsearch", "--db", str(db), "query", "x", "-0", "-n", "3"],
        capture_output=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.endswith(b"\0")
    paths = out.stdout.split(b"\0")[:-1]
    assert len(paths) == 3 and all(Path(p.decode()).is_file() for p in paths)


def test_a_closed_pipe_ends_quietly(library):
    db, _, _ = library
    cmd = f"{sys.executable} -m clipsearch --db '{db}' query x -n 50 | true"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stderr == "", result.stderr


# --- libraries indexed before metadata existed ----------------------------------------------------


def test_an_old_library_gets_its_metadata_without_embedding_again(tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    photos = tmp_path / "photos"
    write_exif_photo(
        photos / "a.jpg", 1, taken="2020:01:02 03:04:05", make="Canon", model="Canon EOS R", gps=(1, 2)
    )
    make_dng(photos / "b.dng", 2)
    db = tmp_path / "lib.db"
    invoke("--db", db, "index", photos, "--model", model, "--json")
    with Library.open(db) as lib:
        model_id = lib.default_model_id()
        before = lib.embeddings(model_id)[2]
    # As a library written before migration 004: the columns empty, never read
    conn = sqlite3.connect(db)
    conn.execute(
        "UPDATE images SET camera_make = NULL, camera_model = NULL, lat = NULL, lon = NULL, file_type = NULL, "
        "metadata_version = NULL"
    )
    conn.commit()
    conn.close()
    assert json.loads(invoke("--db", db, "query", "x", "--json", "--camera", "canon").stdout) == []
    report = json.loads(invoke("--db", db, "index", photos, "--json").stdout)
    assert report["metadata"] == 2 and report["new"] == report["updated"] == 0 and report["unchanged"] == 2
    assert report["backend"] is None  # nothing went through the model
    with Library.open(db) as lib:
        assert (lib.embeddings(model_id)[2] == before).all()
    hits = json.loads(invoke("--db", db, "query", "x", "--json", "--type", "dng").stdout)
    assert [Path(h["path"]).name for h in hits] == ["b.dng"] and hits[0]["camera"] == "LEICA Q2"
    assert json.loads(invoke("--db", db, "index", photos, "--json").stdout)["metadata"] == 0  # once only


def test_a_query_longer_than_the_context_says_it_was_cut(library):
    db, _, _ = library
    long = " ".join(["a sunny beach with palm trees and a red boat"] * 12)  # ~120 tokens
    result = run_cli("--db", str(db), "query", long, "-n", "1")
    assert result.returncode == 0 and "longer than the model reads (75 tokens)" in result.stderr
    short = run_cli("--db", str(db), "query", "a sunny beach", "-n", "1")
    assert short.returncode == 0 and "longer than" not in short.stderr


def test_shell_completion_knows_the_new_commands():
    import os

    env = dict(os.environ, COMP_WORDS="clipsearch dup", COMP_CWORD="1", _CLIPSEARCH_COMPLETE="bash_complete")
    out = subprocess.run(
        [sys.executable, "-m", "clipsearch"], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert "duplicates" in out.stdout


def test_paths_are_never_wrapped_in_a_narrow_terminal(library):
    db, photos, _ = library
    result = run_cli("--db", str(db), "query", "x", "-n", "8", "--table", env={"COLUMNS": "30"})
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    for path in (photos / "trips" / "london.dng", photos / "tokyo.jpg"):
        assert any(line.endswith(str(path)) for line in lines), result.stdout
