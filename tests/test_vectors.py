"""The FAISS index: exact and HNSW search against numpy brute force, removal, subtree filters, and
an on-disk index that must follow SQLite (detected and repaired when out of step)."""

import json

import numpy as np
import pytest

from clipsearch import vectors
from clipsearch.errors import LibraryError
from clipsearch.store import Library
from clipsearch.vectors import VectorIndex


def clustered(n, d, clusters=20, seed=0):
    """CLIP-like data: normalised points around a few centres, not uniform on the sphere."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def brute(q, x, ids, k):
    sims = q @ x.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, top, axis=1), ids[top]


def test_flat_equals_brute_force():
    x = clustered(500, 16)
    ids = np.arange(1000, 1500, dtype=np.int64)
    index = VectorIndex.build(ids, x, kind="flat")
    assert index.kind == "flat" and len(index) == 500
    q = clustered(7, 16, seed=1)
    scores, got = index.search(q, 10)
    want_scores, want = brute(q, x, ids, 10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_hnsw_recall_at_10_against_exact():
    x = clustered(6000, 32)
    ids = np.arange(6000, dtype=np.int64) * 3 + 7
    q = clustered(100, 32, seed=2)
    hnsw = VectorIndex.build(ids, x, kind="hnsw")
    flat = VectorIndex.build(ids, x, kind="flat")
    _, got = hnsw.search(q, 10)
    _, want = flat.search(q, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= 0.95, recall


def test_auto_kind_follows_the_threshold(monkeypatch):
    monkeypatch.setattr(vectors, "HNSW_THRESHOLD", 100)
    assert VectorIndex.build(np.arange(99), clustered(99, 8)).kind == "flat"
    assert VectorIndex.build(np.arange(100), clustered(100, 8)).kind == "hnsw"
    with pytest.raises(LibraryError, match="unknown index kind"):
        VectorIndex.build(np.arange(3), clustered(3, 8), kind="ivf")


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_remove_by_id(kind):
    x = clustered(300, 8)
    ids = np.arange(300, dtype=np.int64)
    index = VectorIndex.build(ids, x, kind=kind)
    assert index.remove(np.array([5, 6, 999])) == 2
    assert len(index) == 298 and 5 not in index.ids()
    _, got = index.search(x[[5, 6]], 5)
    assert not ({5, 6} & set(got.ravel().tolist()))
    assert got[0, 0] != -1


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_allowed_ids_give_the_exact_answer_within_the_subset(kind):
    x = clustered(2000, 16)
    ids = np.arange(2000, dtype=np.int64) + 1
    index = VectorIndex.build(ids, x, kind=kind)
    allowed = set(range(1, 2001, 7)) | {99999}  # an unknown id is simply not a candidate
    sub = np.array(sorted(allowed - {99999}))
    q = clustered(5, 16, seed=3)
    scores, got = index.search(q, 10, allowed_ids=allowed)
    want_scores, want = brute(q, x[sub - 1], sub, 10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # Fewer candidates than k: k shrinks to what exists.
    scores, got = index.search(q, 10, allowed_ids={1, 2, 3})
    assert got.shape == (5, 3) and set(got[0].tolist()) == {1, 2, 3}
    assert index.search(q, 10, allowed_ids=set())[1].shape == (5, 0)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_large_filter_uses_the_selector(monkeypatch, kind):
    monkeypatch.setattr(vectors, "EXACT_SUBSET", 10)
    x = clustered(3000, 16)
    ids = np.arange(3000, dtype=np.int64)
    index = VectorIndex.build(ids, x, kind=kind)
    index.remove(np.array([0, 2, 4]))
    allowed = set(range(0, 3000, 2))
    q = clustered(20, 16, seed=5)
    _, got = index.search(q, 10, allowed_ids=allowed)
    assert set(got.ravel().tolist()) <= allowed - {0, 2, 4}
    sub = np.array(sorted(allowed - {0, 2, 4}))
    _, want = brute(q, x[sub], sub, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= (1.0 if kind == "flat" else 0.95)


def test_wrong_query_dimension():
    index = VectorIndex.build(np.arange(3), clustered(3, 8))
    with pytest.raises(ValueError, match="dimension 4"):
        index.search(np.zeros((1, 4), np.float32), 1)


# --- the on-disk index follows SQLite --------------------------------------------------------


def _library(tmp_path, n, d=8, seed=0):
    lib = Library.open(tmp_path / "lib.db", create=True)
    lib.register_model("m/1", "src", d)
    x = clustered(n, d, seed=seed)
    ids = []
    with lib.transaction() as c:
        for i, v in enumerate(x):
            image_id = lib.add_image(c, tmp_path / f"{i}.jpg", size=1, mtime_ns=1, content_hash=f"h{i}")
            lib.put_embedding(c, image_id, "m/1", v)
            ids.append(image_id)
    return lib, np.array(ids), x


def _add_more(lib, tmp_path, x, start):
    new = []
    with lib.transaction() as c:
        for i, v in enumerate(x, start):
            image_id = lib.add_image(c, tmp_path / f"{i}.jpg", size=1, mtime_ns=1, content_hash=f"h{i}")
            lib.put_embedding(c, image_id, "m/1", v)
            new.append(image_id)
    return new


def test_saved_index_is_reused_memory_mapped_when_in_step(tmp_path):
    lib, ids, x = _library(tmp_path, 50)
    first = VectorIndex.for_library(lib, "m/1")
    assert first.rebuilt and first.path.exists() and first.path.parent.name == "lib.db.faiss"
    second = VectorIndex.for_library(lib, "m/1")
    assert not second.rebuilt and not second.updated
    _, got = second.search(x[:3], 1)
    assert got[:, 0].tolist() == ids[:3].tolist()


def test_index_out_of_step_is_updated_by_id(tmp_path):
    lib, ids, x = _library(tmp_path, 50)
    VectorIndex.for_library(lib, "m/1")
    more = clustered(5, 8, seed=9)
    new_ids = _add_more(lib, tmp_path, more, 50)
    with lib.transaction() as c:
        lib.remove_images(c, ids[:4])
    index = VectorIndex.for_library(lib, "m/1")
    assert index.updated and not index.rebuilt
    assert index.ids() == set(ids[4:].tolist()) | set(new_ids)
    _, got = index.search(more, 1)
    assert got[:, 0].tolist() == new_ids
    # What was saved is in step now.
    again = VectorIndex.for_library(lib, "m/1")
    assert not again.updated and not again.rebuilt and again.ids() == index.ids()


def test_index_from_another_sqlite_state_is_detected(tmp_path):
    """An index file copied from elsewhere (e.g. restored from a backup) must not be trusted."""
    lib, ids, x = _library(tmp_path, 30)
    index = VectorIndex.for_library(lib, "m/1")
    side = index.path.with_suffix(".json")
    meta = json.loads(side.read_text())
    # Same generation, but the index holds different ids than SQLite (count differs).
    index.remove(ids[:3])
    index.save(index.path, model_id="m/1", generation=lib.generation())
    reloaded = VectorIndex.for_library(lib, "m/1")
    assert reloaded.updated and reloaded.ids() == set(ids.tolist())
    assert meta["count"] == 30


@pytest.mark.parametrize("damage", ["garbage", "truncate", "sidecar", "no-sidecar"])
def test_damaged_index_is_rebuilt(tmp_path, damage):
    lib, ids, x = _library(tmp_path, 40)
    index = VectorIndex.for_library(lib, "m/1")
    side = index.path.with_suffix(".json")
    if damage == "garbage":
        index.path.write_bytes(b"\x00" * 100)
    elif damage == "truncate":
        index.path.write_bytes(index.path.read_bytes()[:200])
    elif damage == "sidecar":
        side.write_text("{not json")
    else:
        side.unlink()
    rebuilt = VectorIndex.for_library(lib, "m/1")
    assert rebuilt.rebuilt and rebuilt.ids() == set(ids.tolist())
    _, got = rebuilt.search(x[:5], 1)
    assert got[:, 0].tolist() == ids[:5].tolist()


def test_kind_override_and_hnsw_tombstones_persist(tmp_path, monkeypatch):
    lib, ids, x = _library(tmp_path, 200)
    index = VectorIndex.for_library(lib, "m/1", kind="hnsw")
    assert index.kind == "hnsw"
    assert VectorIndex.for_library(lib, "m/1", kind="flat").kind == "flat"  # a kind change rebuilds
    VectorIndex.for_library(lib, "m/1", kind="hnsw")
    with lib.transaction() as c:
        lib.remove_images(c, ids[:10])  # 5%: tombstones, no rebuild
    index = VectorIndex.for_library(lib, "m/1", kind="hnsw")
    assert index.updated and not index.rebuilt and len(index.tombstones) == 10
    again = VectorIndex.for_library(lib, "m/1", kind="hnsw")
    assert not again.updated and again.tombstones == set(ids[:10].tolist()) and len(again) == 190
    _, got = again.search(x[:10], 3)
    assert not (set(got.ravel().tolist()) & set(ids[:10].tolist()))
    with lib.transaction() as c:
        lib.remove_images(c, ids[10:60])  # now 30% removed: rebuilt without tombstones
    index = VectorIndex.for_library(lib, "m/1", kind="hnsw")
    assert index.rebuilt and not index.tombstones and len(index) == 140


def test_empty_library_gives_an_empty_index(tmp_path):
    with Library.open(tmp_path / "lib.db", create=True) as lib:
        lib.register_model("m", "src", 8)
        index = VectorIndex.for_library(lib, "m")
        assert len(index) == 0
        assert index.search(np.zeros((1, 8), np.float32), 5)[1].shape == (1, 0)


def test_readonly_library_syncs_in_memory(tmp_path):
    lib, ids, x = _library(tmp_path, 20)
    VectorIndex.for_library(lib, "m/1")
    _add_more(lib, tmp_path, clustered(2, 8, seed=4), 20)
    saved = (tmp_path / "lib.db.faiss").stat().st_mtime_ns
    with Library.open(lib.path, readonly=True) as ro:
        index = VectorIndex.for_library(ro, "m/1")
        assert len(index) == 22
    assert (tmp_path / "lib.db.faiss").stat().st_mtime_ns == saved
