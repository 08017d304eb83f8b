"""The indexer on real files the tests write: incremental runs, moves and duplicates without the
model, hostile file-system entries, bad images, locking, a folder that moves, a real tiny model,
and a SIGKILL in the middle of a run."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch.errors import LibraryError
from clipsearch.indexer import IndexPathError, index_paths
from clipsearch.store import Library
from clipsearch.vectors import VectorIndex


class CountingModel(torch.nn.Module):
    """A deterministic embedder: a fixed random projection of the (tiny) image; counts images seen."""

    def __init__(self, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 8 * 8, dim, generator=g), requires_grad=False)
        self.images_seen = 0

    device = torch.device("cpu")  # as CLIP.device / CLIP.dtype say where and how inputs go
    dtype = torch.float32

    def encode_image(self, x):  # [B, 3, 8, 8] -> [B, D]
        self.images_seen += x.shape[0]
        return x.flatten(1) @ self.proj


class FakeBundle:
    model_id = "fake/v1"
    config = {"embed_dim": 8}

    def __init__(self):
        self.model = CountingModel()

    @staticmethod
    def preprocess(image):  # PIL -> [3, 8, 8]
        a = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0
        return torch.from_numpy(a).permute(2, 0, 1)


def write_image(path: Path, seed: int, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path, format=fmt or "PNG")
    return path


def stored_paths(lib):
    return sorted(r.stored for r in lib.images())


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    for i in range(6):
        write_image(root / ("sub" if i % 2 else "") / f"img{i}.png", i)
    return root


@pytest.fixture
def lib(tmp_path):
    library = Library.open(tmp_path / "db" / "lib.db", create=True)
    yield library
    library.close()


def test_first_run_indexes_everything_and_records_the_model(lib, photos):
    bundle = FakeBundle()
    events = []
    report = index_paths(lib, bundle, [photos], batch_size=4, progress=events.append)
    assert (report.new, report.unchanged, report.failed, report.model_id) == (6, 0, [], "fake/v1")
    assert bundle.model.images_seen == 6
    assert events[0] == {"event": "scan", "found": 6}
    assert events[1] == {"event": "start", "total": 6}
    assert events[2] == {"event": "backend", "name": "model"}  # a bare model runs as given
    assert report.backend == "model" and report.backend_note == ""
    assert sum(e["n"] for e in events if e["event"] == "advance") == 6
    assert events[-1] == {"event": "done"}
    ids, paths, vecs = lib.embeddings("fake/v1")
    assert sorted(paths) == sorted(photos.rglob("*.png"))
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    assert lib.default_model_id() == "fake/v1" and lib.model_source("fake/v1") == "fake/v1"
    assert lib.model_dim("fake/v1") == 8
    # The embedding is the model's output for that image, normalised.
    i = paths.index(photos / "img0.png")
    x = FakeBundle.preprocess(Image.open(photos / "img0.png").convert("RGB"))[None]
    want = (x.flatten(1) @ bundle.model.proj)[0].numpy()
    np.testing.assert_allclose(vecs[i], want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)


def test_incremental_runs_reuse_embeddings_without_the_model(lib, photos):
    bundle = FakeBundle()
    index_paths(lib, bundle, [photos])
    before = {p.name: v for _, p, v in zip(*lib.embeddings("fake/v1"), strict=True)}
    ids_before = {r.stored: r.id for r in lib.images()}
    seen = bundle.model.images_seen

    again = index_paths(lib, bundle, [photos])
    assert (again.new, again.unchanged, again.moved, again.removed) == (0, 6, 0, 0)
    assert bundle.model.images_seen == seen  # unchanged files are not even read

    shutil.move(photos / "img0.png", photos / "sub" / "renamed.png")  # moved and renamed
    shutil.copy(photos / "img2.png", photos / "copy_of_2.png")  # duplicate
    write_image(photos / "img4.png", 404)  # modified in place
    os.utime(photos / "img4.png", ns=(1, 1))
    (photos / "sub" / "img1.png").unlink()  # deleted
    write_image(photos / "new.png", 99)  # new
    report = index_paths(lib, bundle, [photos])
    assert (report.new, report.updated, report.moved, report.duplicates, report.removed) == (1, 1, 1, 1, 1)
    assert report.unchanged == 3 and report.failed == []
    assert bundle.model.images_seen == seen + 2  # only the new and the modified file were embedded

    ids, paths, vecs = lib.embeddings("fake/v1")
    after = {p.name: v for p, v in zip(paths, vecs, strict=True)}
    assert sorted(after) == sorted(p.name for p in photos.rglob("*.png"))
    np.testing.assert_array_equal(after["renamed.png"], before["img0.png"])
    np.testing.assert_array_equal(after["copy_of_2.png"], before["img2.png"])
    assert not np.allclose(after["img4.png"], before["img4.png"])
    # A moved file keeps its id (so its labels follow it); a modified one gets a new id.
    now = {r.stored: r.id for r in lib.images()}
    rel = {k.split("photos/", 1)[-1]: v for k, v in now.items()}
    rel_before = {k.split("photos/", 1)[-1]: v for k, v in ids_before.items()}
    assert rel["sub/renamed.png"] == rel_before["img0.png"]
    assert rel["img4.png"] != rel_before["img4.png"]


def test_touched_file_with_same_content_is_unchanged(lib, photos):
    bundle = FakeBundle()
    index_paths(lib, bundle, [photos])
    os.utime(photos / "img0.png", ns=(5, 5))
    report = index_paths(lib, bundle, [photos])
    assert report.unchanged == 6 and report.updated == 0 and bundle.model.images_seen == 6
    assert [r.mtime_ns for r in lib.images() if r.path.name == "img0.png"] == [5]


def test_only_the_scanned_tree_loses_rows(lib, tmp_path, photos):
    other = tmp_path / "other"
    write_image(other / "o.png", 50)
    bundle = FakeBundle()
    index_paths(lib, bundle, [photos, other])
    shutil.rmtree(photos / "sub")
    report = index_paths(lib, bundle, [photos])  # `other` not scanned: its row stays
    assert report.removed == 3
    assert len(stored_paths(lib)) == 4 and any(p.endswith("o.png") for p in stored_paths(lib))
    report = index_paths(lib, bundle, [other / "o.png"])  # a file as PATH
    assert report.unchanged == 1 and report.removed == 0


def test_a_second_model_embeds_the_same_images(lib, photos):
    index_paths(lib, FakeBundle(), [photos])
    second = FakeBundle()
    second.model_id = "fake/v2"
    report = index_paths(lib, second, [photos])
    assert report.new == 6 and second.model.images_seen == 6
    assert lib.stats().images == 6 and lib.stats().embedded == {"fake/v1": 6, "fake/v2": 6}
    assert lib.default_model_id() == "fake/v2"


def test_hidden_and_excluded_files_are_skipped(lib, photos):
    write_image(photos / ".hidden.png", 20)
    write_image(photos / ".cache" / "x.png", 21)
    write_image(photos / "raw" / "y.png", 22)
    write_image(photos / "thumb_a.png", 23)
    write_image(photos / "UPPER.JPG", 24, fmt="JPEG")  # extensions are case-insensitive
    (photos / "notes.txt").write_text("not an image extension: never looked at")
    report = index_paths(lib, FakeBundle(), [photos], exclude=["raw", "thumb_*"])
    names = {Path(p).name for p in stored_paths(lib)}
    assert report.new == 7 and "UPPER.JPG" in names
    assert not names & {".hidden.png", "x.png", "y.png", "thumb_a.png", "notes.txt"}
    report = index_paths(lib, FakeBundle(), [photos], include_hidden=True, exclude=["*/y.png"])
    assert {Path(p).name for p in stored_paths(lib)} >= {".hidden.png", "x.png", "thumb_a.png"}
    assert "y.png" not in {Path(p).name for p in stored_paths(lib)}
    # A run without those options leaves the photos they added: still on disk, so not gone
    report = index_paths(lib, FakeBundle(), [photos], exclude=["thumb_*"])
    assert report.removed == 0
    assert {Path(p).name for p in stored_paths(lib)} >= {".hidden.png", "x.png", "thumb_a.png"}
    # ... until they are deleted, or --prune asks
    (photos / ".cache" / "x.png").unlink()
    assert index_paths(lib, FakeBundle(), [photos]).removed == 1
    assert index_paths(lib, FakeBundle(), [photos], exclude=["thumb_*"], prune=True).removed == 2
    assert not {Path(p).name for p in stored_paths(lib)} & {".hidden.png", "x.png", "thumb_a.png"}


def test_symlink_loop_fifo_directory_and_dead_link(lib, photos):
    os.symlink(photos, photos / "sub" / "loop")  # photos/sub/loop -> photos
    os.mkfifo(photos / "pipe.jpg")  # opening it for reading would block forever
    (photos / "folder.jpg").mkdir()
    os.symlink(photos / "nowhere.png", photos / "dead.png")
    report = index_paths(lib, FakeBundle(), [photos])
    assert report.new == 6
    # the FIFO is never opened, but it is named like a photo: reported; the folder is just a folder
    assert sorted(report.failed) == [
        (photos / "dead.png", "dead symlink"),
        (photos / "pipe.jpg", "not a regular file"),
    ]
    assert sorted((e.path.name, e.reason) for e in lib.errors()) == [
        ("dead.png", "dead symlink"),
        ("pipe.jpg", "not a regular file"),
    ]
    (photos / "dead.png").unlink()
    (photos / "pipe.jpg").unlink()
    index_paths(lib, FakeBundle(), [photos])
    assert lib.errors() == []


def test_a_link_back_up_out_of_the_folder_is_not_walked(lib, photos):
    # index photos/sub, where sub/up -> .. (photos): it used to walk all of photos again under
    # photos/sub/up/..., a second path for every photo. A link to a folder beside it still counts.
    os.symlink("..", photos / "sub" / "up")
    write_image(photos / "beside" / "b.png", 40)
    os.symlink("../beside", photos / "sub" / "over")
    report = index_paths(lib, FakeBundle(), [photos / "sub"])
    names = {os.path.relpath(p, photos) for p in stored_paths(lib)}
    assert not any(n.startswith("sub/up") for n in names), names
    assert "sub/over/b.png" in names and report.new == len(names)
    assert all(n.startswith("sub/") for n in names)
    # both roots at once, the outer one given first or last, walk each photo once
    for roots in ([photos, photos / "sub"], [photos / "sub", photos]):
        report = index_paths(lib, FakeBundle(), roots)
        assert report.failed == [] and not any(
            os.path.relpath(p, photos).startswith("sub/up") for p in stored_paths(lib)
        )


def test_a_photo_replaced_by_a_fifo_loses_its_row_and_is_reported(lib, photos):
    index_paths(lib, FakeBundle(), [photos])
    (photos / "img0.png").unlink()
    os.mkfifo(photos / "img0.png")
    report = index_paths(lib, FakeBundle(), [photos])
    assert report.failed == [(photos / "img0.png", "not a regular file")] and report.removed == 1
    assert "img0.png" not in {Path(p).name for p in stored_paths(lib)}


def test_bad_files_are_recorded_and_the_run_succeeds(lib, photos):
    (photos / "text.jpg").write_text("just some text")
    (photos / "empty.png").write_bytes(b"")
    good = write_image(photos / "cut.jpg", 7, fmt="JPEG").read_bytes()
    (photos / "cut.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (300, 300)).save(photos / "bomb.png")
    report = index_paths(lib, FakeBundle(), [photos], max_pixels=200 * 200)
    assert report.new == 6
    reasons = dict((p.name, r) for p, r in report.failed)
    assert reasons == {
        "text.jpg": "not an image",
        "empty.png": "empty file",
        "cut.jpg": "truncated",
        "bomb.png": "too many pixels",
    }
    assert {e.path.name: e.reason for e in lib.errors()} == reasons
    # Fixed and deleted files clear their errors.
    write_image(photos / "text.jpg", 8, fmt="JPEG")
    (photos / "empty.png").unlink()
    report = index_paths(lib, FakeBundle(), [photos], max_pixels=200 * 200)
    assert report.new == 1
    assert {e.path.name for e in lib.errors()} == {"cut.jpg", "bomb.png"}


def test_a_file_that_turns_bad_loses_its_old_embedding(lib, photos):
    index_paths(lib, FakeBundle(), [photos])
    (photos / "img0.png").write_bytes(b"garbage now")
    report = index_paths(lib, FakeBundle(), [photos])
    assert report.failed == [(photos / "img0.png", "not an image")]
    assert lib.stats().images == 5


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_file_and_folder(lib, photos):
    index_paths(lib, FakeBundle(), [photos])
    locked = write_image(photos / "locked.png", 30)
    locked.chmod(0)
    (photos / "sub").chmod(0)
    try:
        report = index_paths(lib, FakeBundle(), [photos])
    finally:
        (photos / "sub").chmod(0o755)
        locked.chmod(0o644)
    assert dict((p.name, r) for p, r in report.failed) == {
        "locked.png": "permission denied",
        "sub": "permission denied",
    }
    assert report.removed == 0  # what was indexed under the unreadable folder is kept
    assert lib.stats().images == 6


def test_missing_path_is_a_clear_error(lib, tmp_path):
    with pytest.raises(IndexPathError, match="no such file or folder: .*missing"):
        index_paths(lib, FakeBundle(), [tmp_path / "missing"])


def test_empty_folder_indexes_nothing(lib, tmp_path):
    (tmp_path / "empty").mkdir()
    report = index_paths(lib, FakeBundle(), [tmp_path / "empty"])
    assert (report.new, report.failed) == (0, [])


def test_a_second_concurrent_indexer_gets_the_lock_error(lib, photos):
    with Library.open(lib.path) as other, other.writer_lock():
        with pytest.raises(LibraryError, match="another clipsearch index is running on"):
            index_paths(lib, FakeBundle(), [photos])
    assert index_paths(lib, FakeBundle(), [photos]).new == 6


def test_reads_during_an_index_run_see_committed_batches(lib, photos):
    for i in range(6, 12):
        write_image(photos / f"more{i}.png", i)
    counts = []

    def progress(event):
        if event["event"] == "advance":
            with Library.open(lib.path, readonly=True) as reader:
                counts.append(len(reader.embeddings("fake/v1")[0]))

    index_paths(lib, FakeBundle(), [photos], batch_size=4, progress=progress)
    assert counts == [4, 8, 12]


def test_library_inside_the_photo_folder_moves_with_it(tmp_path, photos):
    with Library.open(photos / "library.db", create=True) as lib:
        index_paths(lib, FakeBundle(), [photos])
        assert all(not p.startswith("/") for p in stored_paths(lib))
    moved = tmp_path / "elsewhere" / "my photos"
    moved.parent.mkdir()
    shutil.move(photos, moved)
    with Library.open(moved / "library.db") as lib:
        _, paths, _ = lib.embeddings("fake/v1")
        assert sorted(paths) == sorted(moved.rglob("*.png")) and all(p.exists() for p in paths)
        bundle = FakeBundle()
        report = index_paths(lib, bundle, [moved])
        assert report.unchanged == 6 and report.removed == 0 and bundle.model.images_seen == 0


def test_vector_index_follows_index_runs(lib, photos):
    bundle = FakeBundle()
    index_paths(lib, bundle, [photos])
    index = VectorIndex.for_library(lib, "fake/v1")
    assert len(index) == 6
    (photos / "img0.png").unlink()
    write_image(photos / "n.png", 77)
    index_paths(lib, bundle, [photos], update_vectors=False)
    index = VectorIndex.for_library(lib, "fake/v1")
    assert index.updated and not index.rebuilt  # by id, not rebuilt
    write_image(photos / "n2.png", 78)
    index_paths(lib, bundle, [photos])  # the run itself brings the saved index in step
    index = VectorIndex.for_library(lib, "fake/v1")
    assert not index.updated and not index.rebuilt
    ids, paths, vecs = lib.embeddings("fake/v1")
    assert index.ids() == set(ids.tolist())
    _, got = index.search(vecs, 1)
    assert got[:, 0].tolist() == ids.tolist()


def test_real_tiny_model(lib, photos):
    from clipsearch.checkpoints import ModelBundle
    from clipsearch.configs import get_config
    from clipsearch.imageio import open_image
    from clipsearch.model import build_model
    from clipsearch.transform import PreprocessConfig, image_transform

    torch.manual_seed(0)
    cfg = get_config("tiny-vit")
    model = build_model(cfg).eval()
    pcfg = PreprocessConfig(image_size=cfg["vision_cfg"]["image_size"])
    bundle = ModelBundle(
        model=model, preprocess_cfg=pcfg, tokenizer=None, model_id="tiny-vit/random", config=cfg
    )
    write_image(photos / "photo.jpg", 5, fmt="JPEG")
    # fp32 on purpose: auto may settle on a faithful int8 backend (cosine >= 0.995), not equal at 1e-5
    report = index_paths(lib, bundle, [photos], batch_size=3, source="/models/tiny", backend="torch-fp32")
    assert report.new == 7 and lib.model_source("tiny-vit/random") == "/models/tiny"
    ids, paths, vecs = lib.embeddings("tiny-vit/random")
    assert vecs.shape == (7, cfg["embed_dim"])
    transform = image_transform(pcfg)
    with torch.no_grad():
        x = torch.stack([transform(open_image(p)) for p in paths])
        want = torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(vecs, want, atol=1e-5)


# --- crash safety ------------------------------------------------------------------------------

KILLED_RUN = textwrap.dedent(
    """
    import sys, time, torch, numpy as np
    from clipsearch.store import Library
    from clipsearch.indexer import index_paths

    class Slow(torch.nn.Module):
        device, dtype = torch.device("cpu"), torch.float32

        def encode_image(self, x):
            time.sleep(0.25)  # a slow model, so the kill lands mid-run
            return x.flatten(1)[:, :8] + 1.0

    class Bundle:
        model_id = "slow"
        config = {"embed_dim": 8}
        model = Slow()
        @staticmethod
        def preprocess(im):
            return torch.from_numpy(np.asarray(im.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1)

    lib = Library.open(sys.argv[1], create=True)
    index_paths(lib, Bundle(), [sys.argv[2]], batch_size=2, workers=2)
    """
)


def test_sigkill_mid_run_loses_nothing_and_the_next_run_completes(tmp_path):
    photos = tmp_path / "photos"
    n = 24
    for i in range(n):
        write_image(photos / f"{i:02d}.png", i)
    db = tmp_path / "lib.db"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(db), str(photos)], stderr=subprocess.PIPE)
    try:

        def committed():
            if not db.exists():
                return 0
            try:
                with Library.open(db, readonly=True) as r:
                    return r.embedding_count("slow")
            except LibraryError:
                return 0  # not created yet

        deadline = time.monotonic() + 60
        while committed() < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The library opens and answers from what was committed.
    with Library.open(db) as lib:
        ids, paths, vecs = lib.embeddings("slow")
        done = len(ids)
        assert 6 <= done < n and len(set(paths)) == done and all(p.exists() for p in paths)
        assert len(VectorIndex.for_library(lib, "slow")) == done
        # The next run (here with a counting model under the same id) does only what is left.
        bundle = FakeBundle()
        bundle.model_id = "slow"
        report = index_paths(lib, bundle, [photos])
        assert bundle.model.images_seen == n - done
        assert report.new == n - done and report.unchanged == done and report.failed == []
        ids, paths, _ = lib.embeddings("slow")
        assert sorted(paths) == sorted(photos.glob("*.png"))  # every image exactly once
        assert lib.stats().images == n


def test_odd_unicode_and_non_utf8_names_index(lib, photos):
    write_image(photos / "café ☕ 写真.png", 40)
    write_image(photos / "cafe\u0301.png", 41)  # the same word in decomposed form: another file
    bad = os.fsdecode(bytes(photos) + b"/bad\xff.png")
    write_image(Path(bad), 42)
    report = index_paths(lib, FakeBundle(), [photos])
    assert report.new == 9 and report.failed == []
    names = {Path(p).name for p in stored_paths(lib)}
    assert {"café ☕ 写真.png", "cafe\u0301.png"} <= names
    paths = lib.embeddings("fake/v1")[1]
    assert os.fsencode(bad) in {os.fsencode(p) for p in paths}  # the exact bytes come back


def test_full_disk_is_a_library_error_and_keeps_committed_batches(lib, photos):
    bundle = FakeBundle()
    index_paths(lib, bundle, [photos])
    for i in range(40):
        write_image(photos / "more" / f"{i}.png", 100 + i)
    conn = lib._conn  # fault injection: only the test reaches past the store's methods
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # the database cannot grow: SQLITE_FULL
    with pytest.raises(LibraryError, match="failed .*full.*run index again"):
        index_paths(lib, bundle, [photos], batch_size=4)
    conn.execute("PRAGMA max_page_count = 1073741823")
    with Library.open(lib.path) as fresh:
        before = fresh.stats().images
        assert before >= 6
        report = index_paths(fresh, FakeBundle(), [photos])
        assert report.new == 46 - before and fresh.stats().images == 46


def test_photo_folder_reached_through_a_symlink_is_still_relative(tmp_path, photos):
    link = tmp_path / "link-to-photos"
    os.symlink(photos, link)
    with Library.open(link / "library.db", create=True) as lib:
        report = index_paths(lib, FakeBundle(), [link])
        assert report.new == 6 and all(not p.startswith("/") for p in stored_paths(lib))
        assert index_paths(lib, FakeBundle(), [photos]).unchanged == 6  # same files, either way in


def test_files_deleted_or_replaced_by_a_fifo_after_the_walk(lib, photos, monkeypatch):
    from clipsearch import indexer

    real_walk = indexer.walk

    def walk_then_meddle(*args, **kwargs):
        found = real_walk(*args, **kwargs)
        (photos / "img0.png").unlink()
        (photos / "img2.png").unlink()
        os.mkfifo(photos / "img2.png")  # opening it for reading without O_NONBLOCK would hang
        return found

    monkeypatch.setattr(indexer, "walk", walk_then_meddle)
    report = index_paths(lib, FakeBundle(), [photos])
    assert report.new == 4
    assert sorted((p.name, r) for p, r in report.failed) == [
        ("img0.png", "vanished"),
        ("img2.png", "not a regular file"),
    ]
    monkeypatch.setattr(indexer, "walk", real_walk)
    (photos / "img2.png").unlink()
    report = index_paths(lib, FakeBundle(), [photos])
    assert report.failed == [] and lib.errors() == [] and report.unchanged == 4


def test_permission_errors_are_reasons_even_when_running_as_root(lib, photos, monkeypatch):
    """Root reads everything, so the EACCES paths are driven by making the calls fail."""
    import errno

    from clipsearch import indexer, walk

    index_paths(lib, FakeBundle(), [photos])
    locked = write_image(photos / "locked.png", 30)
    real_open, real_scandir = os.open, os.scandir

    # os itself is patched: pytest's own clean-up may call these with file descriptors meanwhile
    def deny_open(path, *args, **kwargs):
        if not isinstance(path, int) and os.fspath(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def deny_scandir(path="."):
        if not isinstance(path, int) and os.fspath(path) == str(photos / "sub"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(indexer.os, "open", deny_open)
    monkeypatch.setattr(walk.os, "scandir", deny_scandir)
    report = index_paths(lib, FakeBundle(), [photos])
    assert dict((p.name, r) for p, r in report.failed) == {
        "locked.png": "permission denied",
        "sub": "permission denied",
    }
    assert report.removed == 0 and lib.stats().images == 6  # rows under the unreadable folder kept
    assert {e.path.name for e in lib.errors()} == {"locked.png", "sub"}


def test_image_rows_record_upright_size_and_exif_date(lib, tmp_path):
    folder = tmp_path / "exif"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to show upright
    exif.get_ifd(0x8769)[0x9003] = "2021:07:04 18:30:00"  # DateTimeOriginal
    Image.new("RGB", (40, 20), (200, 10, 10)).save(folder / "rotated.jpg", exif=exif)
    write_image(folder / "plain.png", 3)
    index_paths(lib, FakeBundle(), [folder])
    rows = {r.path.name: r for r in lib.images()}
    assert (rows["rotated.jpg"].width, rows["rotated.jpg"].height) == (20, 40)
    assert rows["rotated.jpg"].taken_at.startswith("2021-07-04T18:30:00")
    assert (rows["plain.png"].width, rows["plain.png"].height, rows["plain.png"].taken_at) == (
        16,
        16,
        None,
    )
    assert len(rows["plain.png"].content_hash) == 40 and rows["plain.png"].size > 0


def test_unchanged_bad_files_are_not_read_again_until_something_changes(lib, photos, monkeypatch):
    from clipsearch import indexer

    (photos / "text.jpg").write_text("just some text")
    Image.new("RGB", (300, 300)).save(photos / "big.png")
    reads = []  # files whose header was examined
    whole = []  # files read in full
    real_header, real_read = indexer.check_header, indexer.read_and_hash

    def counting_header(f, name, max_pixels):
        reads.append(Path(name).name)
        return real_header(f, name, max_pixels)

    def counting_read(fd, keep):
        whole.append(os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])
        return real_read(fd, keep)

    monkeypatch.setattr(indexer, "check_header", counting_header)
    monkeypatch.setattr(indexer, "read_and_hash", counting_read)
    first = index_paths(lib, FakeBundle(), [photos], max_pixels=200 * 200)
    assert sorted(reads) == sorted(["text.jpg", "big.png"] + [p.name for p in photos.rglob("img*.png")])
    # Not an image, or over the pixel limit: refused from the header, never read into memory.
    assert sorted(whole) == sorted(p.name for p in photos.rglob("img*.png"))
    reads.clear()
    again = index_paths(lib, FakeBundle(), [photos], max_pixels=200 * 200)
    assert reads == [] and sorted(again.failed) == sorted(first.failed)  # still reported, not re-read
    assert len(lib.errors()) == 2
    os.utime(photos / "text.jpg", ns=(7, 7))  # edited: tried again
    index_paths(lib, FakeBundle(), [photos], max_pixels=200 * 200)
    assert reads == ["text.jpg"]
    reads.clear()
    report = index_paths(lib, FakeBundle(), [photos])  # other decoder settings: every failure retried
    assert sorted(reads) == ["big.png", "text.jpg"] and report.new == 1
    assert [e.path.name for e in lib.errors()] == ["text.jpg"]
