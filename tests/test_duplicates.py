"""`clipsearch duplicates`: planted copies (byte copy, resized, recompressed, re-encoded, lightly cropped)
are found as one group with the original first; distinct photos are not grouped; nothing is
touched on disk. The range search itself is checked against a brute-force pair list."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from e2e_helpers import make_tiny_model, run_cli, scene
from PIL import Image

from clipsearch import duplicates
from clipsearch.cli import cli
from clipsearch.duplicates import best_first, format_rank, similar_pairs
from clipsearch.store import ImageRow
from clipsearch.vectors import VectorIndex

# The random tiny test model maps different scenes within cosine ~0.99 of each other; copies stay
# above 0.9999 (measured on these files), so the tests use a threshold between the two.
THRESHOLD = "0.995"


def invoke(*args):
    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dups")
    photos = root / "photos"
    (photos / "exports").mkdir(parents=True)
    original = Image.fromarray(scene(5, (800, 600)))
    original.save(photos / "IMG_0001.jpg", quality=95)
    shutil.copy(photos / "IMG_0001.jpg", photos / "exports" / "IMG_0001 (1).jpg")  # byte copy
    original.resize((400, 300), Image.LANCZOS).save(photos / "exports" / "small.jpg", quality=85)
    original.save(photos / "exports" / "recompressed.jpg", quality=30)
    original.save(photos / "exports" / "reencoded.webp", quality=80)
    original.crop((12, 9, 788, 591)).save(photos / "exports" / "cropped.jpg", quality=90)  # 3% off
    for seed in (11, 12, 13, 14):
        Image.fromarray(scene(seed, (640, 480))).save(photos / f"other_{seed}.jpg", quality=90)
    model = make_tiny_model(root / "tiny")
    db = root / "lib.db"
    invoke("--db", db, "index", photos, "--model", model, "--json")
    return db, photos


COPIES = {"IMG_0001.jpg", "exports/IMG_0001 (1).jpg", "exports/small.jpg", "exports/recompressed.jpg"}
COPIES |= {"exports/reencoded.webp", "exports/cropped.jpg"}


def test_planted_copies_are_one_group_best_first(planted):
    db, photos = planted
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in photos.rglob("*") if p.is_file()}
    groups = json.loads(invoke("--db", db, "duplicates", "--threshold", THRESHOLD, "--json").stdout)
    assert len(groups) == 1 and set(groups[0]) == {"paths", "similarity"}
    paths = [Path(p) for p in groups[0]["paths"]]
    assert all(p.is_absolute() for p in paths)
    assert {p.relative_to(photos).as_posix() for p in paths} == COPIES
    # best first: full size (800x600) JPEGs at high quality (the byte copies), the q30 one after them
    assert {p.name for p in paths[:2]} == {"IMG_0001.jpg", "IMG_0001 (1).jpg"}
    assert paths[2].name == "recompressed.jpg"
    assert paths[-1].name == "small.jpg"  # the fewest pixels
    assert 0.995 <= groups[0]["similarity"] <= 1.0
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in photos.rglob("*") if p.is_file()}
    assert after == before  # nothing deleted, moved or rewritten


def test_identical_files_only_at_the_strictest_threshold(planted):
    db, photos = planted
    groups = json.loads(invoke("--db", db, "duplicates", "--threshold", "1", "--json").stdout)
    names = [sorted(Path(p).name for p in g["paths"]) for g in groups]
    assert ["IMG_0001 (1).jpg", "IMG_0001.jpg"] in names
    group = groups[names.index(["IMG_0001 (1).jpg", "IMG_0001.jpg"])]
    assert group["similarity"] == 1.0


def test_filters_restrict_the_scan(planted):
    db, photos = planted
    groups = json.loads(
        invoke(
            "--db", db, "duplicates", "--threshold", THRESHOLD, "--in", photos / "exports", "--json"
        ).stdout
    )
    assert len(groups) == 1 and {Path(p).parent.name for p in groups[0]["paths"]} == {"exports"}
    webp_only = json.loads(
        invoke("--db", db, "duplicates", "--threshold", THRESHOLD, "--type", "webp", "--json").stdout
    )
    assert webp_only == []  # one webp: nothing to pair it with


def test_pipe_tsv_table_and_html(planted, tmp_path):
    db, photos = planted
    result = run_cli("--db", str(db), "duplicates", "--threshold", THRESHOLD)
    rows = list(csv.reader(io.StringIO(result.stdout), delimiter="\t"))
    assert result.returncode == 0 and len(rows) == len(COPIES)
    assert {r[0] for r in rows} == {"1"} and all(Path(r[2]).is_file() for r in rows)
    page = tmp_path / "review.html"
    invoke("--db", db, "duplicates", "--threshold", THRESHOLD, "--html", page)
    text = page.read_text()
    assert text.count("<figure") == len(COPIES) and "IMG_0001 (1).jpg" in text and "never deletes" in text
    assert text.count('class="tag">best<') == 1
    none = invoke("--db", db, "duplicates", "--threshold", "1", "--type", "webp")
    assert none.stdout == "" and "No duplicates" in none.stderr  # a pipe gets no lines


def test_best_first_order_rules():
    def row(i, w, h, size, kind):
        return ImageRow(i, Path(f"/p/{i}"), str(i), size, 0, "h", w, h, None, "", file_type=kind)

    photos = [
        row(1, 100, 100, 5000, "jpeg"),
        row(2, 200, 100, 9000, "jpeg"),
        row(3, 200, 100, 9000, "dng"),
        row(4, 200, 100, 30000, "png"),
        row(5, 200, 100, 12000, "jpeg"),
    ]
    assert [p.id for p in best_first(photos)] == [3, 4, 5, 2, 1]
    assert (
        format_rank("cr3")
        < format_rank("tiff")
        < format_rank("jpeg")
        < format_rank("heif")
        < format_rank(None)
    )


def _brute_pairs(vectors, threshold):
    sims = vectors @ vectors.T
    n = len(vectors)
    return {(i, j) for i in range(n) for j in range(i + 1, n) if sims[i, j] >= threshold}


def test_exact_range_search_equals_brute_force():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 32)).astype(np.float32)
    near = base[:40] + 0.05 * rng.normal(size=(40, 32)).astype(np.float32)  # planted neighbours
    vectors = np.concatenate([base, near])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(10, 10 + len(vectors), dtype=np.int64)
    found = set(similar_pairs(ids, vectors, 0.95))
    assert found == _brute_pairs(vectors, 0.95) and len(found) >= 40


def test_ivf_range_search_finds_the_planted_copies(monkeypatch):
    """Above EXACT_MAX the scan goes through an IVF index: on clustered data it finds the same pairs."""
    monkeypatch.setattr(duplicates, "EXACT_MAX", 100)
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 32))
    base = centres[rng.integers(0, 40, 3000)] + 0.3 * rng.normal(size=(3000, 32))
    copies = base[:200] + 0.01 * rng.normal(size=(200, 32))
    vectors = np.concatenate([base, copies]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64) * 3  # ids are not positions
    index = VectorIndex.build(ids, vectors, kind="ivf")
    found = set(similar_pairs(ids, vectors, 0.99, index))
    truth = _brute_pairs(vectors, 0.99)
    assert found <= truth  # never a false pair
    assert len(found) >= 0.97 * len(truth) and len(truth) >= 200


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_the_scan_through_the_library_index_finds_the_planted_copies(planted, tmp_path, monkeypatch, kind):
    """Above EXACT_MAX the library's own IVF index is range-searched; other kinds (ivfpq's codes
    give approximate scores) go through a temporary IVF-flat: the same group either way."""
    from clipsearch.duplicates import find_duplicates
    from clipsearch.store import Library

    db, photos = planted
    copy = tmp_path / "lib.db"
    shutil.copy(db, copy)
    monkeypatch.setattr(duplicates, "EXACT_MAX", 2)
    lib = Library.open(copy)
    model_id = lib.default_model_id()
    assert VectorIndex.for_library(lib, model_id, kind=kind).kind == kind
    groups = find_duplicates(lib, model_id, float(THRESHOLD))
    found = {
        p.path.relative_to(tmp_path / "photos").as_posix() for p in groups[0].photos
    }  # paths: db-relative
    assert len(groups) == 1 and found == COPIES


def test_errors(planted, tmp_path):
    db, _ = planted
    result = run_cli("--db", str(tmp_path / "none.db"), "duplicates")
    assert result.returncode == 1 and "no library" in result.stderr
    result = run_cli("--db", str(db), "duplicates", "--threshold", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert os.path.exists(db)
