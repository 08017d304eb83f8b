"""Hostile and broken input in one folder, indexed through the CLI: every bad entry is skipped with
a reason, counted, listed in the run's summary and in ``clipsearch status``; the run exits 0 and
every good photo (odd formats, sizes and names included) is indexed exactly once."""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from e2e_helpers import scene, write_photo
from PIL import Image
from test_reliability import db_rows, invoke, tiny_model_dir


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (8-bit grey) over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)  # the first rows only
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")
ODD_NAMES = {
    "nfc": f"{NFC}.png",
    "nfd": f"{NFD}.png",  # a different file name on Linux, same look
    "rtl": "\u05e9\u05dc\u05d5\u05dd \u202egnp.png",  # Hebrew and a right-to-left override
    "emoji": "\U0001f3d6\ufe0f beach \U0001f468\u200d\U0001f469\u200d\U0001f467.png",
}
NON_UTF8 = b"caf\xe9-latin1.png"  # not decodable as UTF-8: Python sees a surrogate escape


def build_folder(root: Path) -> dict:
    """Write the hostile folder; returns ``good`` (name -> path) and ``bad`` (name -> reason)."""
    root.mkdir(parents=True)
    good: dict[str, Path] = {}
    seed = iter(range(100, 200))

    def photo(name, **kw):
        good[name] = write_photo(root / name, next(seed), **kw)

    photo("normal.jpg")
    photo("rotated.jpg", exif_orientation=6)  # 96x72 stored, 72x96 upright
    Image.fromarray(scene(next(seed), (1, 1))).save(root / "one_pixel.png")
    good["one_pixel.png"] = root / "one_pixel.png"
    wide = np.tile(scene(next(seed), (300, 200)), (1, 100, 1))  # [200, 30000, 3]
    Image.fromarray(wide).save(root / "panorama.png", compress_level=1)
    good["panorama.png"] = root / "panorama.png"
    deep = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(deep).save(root / "deep16.png")
    assert Image.open(root / "deep16.png").mode.startswith("I;16")
    good["deep16.png"] = root / "deep16.png"
    Image.fromarray(scene(next(seed))).convert("CMYK").save(root / "cmyk.jpg")
    good["cmyk.jpg"] = root / "cmyk.jpg"
    pal = Image.fromarray(scene(next(seed))).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(root / "palette.png", transparency=0)
    assert Image.open(root / "palette.png").info.get("transparency") == 0
    good["palette.png"] = root / "palette.png"
    frames = [Image.fromarray(scene(next(seed))).convert("P") for _ in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    good["animated.gif"] = root / "animated.gif"
    for name in ODD_NAMES.values():
        photo(name)
    # A folder named like a photo is a folder: walked, its photo indexed, itself never opened.
    (root / "album.jpg").mkdir()
    good["inside.png"] = write_photo(root / "album.jpg" / "inside.png", next(seed))
    # A loop back to the top folder: walked once.
    os.symlink(root, root / "album.jpg" / "back")
    os.mkfifo(root / "pipe.jpg")  # opening it for reading would block forever
    good["changing.png"] = write_photo(root / "changing.png", next(seed))
    write_photo(root / "vanishing.png", next(seed))

    bad = {
        "truncated.jpg": "truncated",
        "empty.jpg": "empty file",
        "text.jpg": "not an image",
        "bomb.png": "too many pixels",
        "dead.jpg": "dead symlink",
        "pipe.jpg": "not a regular file",
        "vanishing.png": "vanished",
    }
    full = write_photo(root / "truncated.jpg", next(seed), size=(200, 150)).read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("Dear diary, this is not a photo.\n")
    (root / "bomb.png").write_bytes(bomb_png(20_000, 20_000))  # 400 Mpixel, over the default limit
    os.symlink(root / "nowhere.jpg", root / "dead.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")  # a link to itself
    return {"good": good, "bad": bad}


@pytest.fixture
def watchdog():
    """A FIFO opened for reading would block forever: end the test run loudly instead of hanging."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def test_hostile_folder_is_indexed_with_every_failure_reported(
    tmp_path, tmp_path_factory, monkeypatch, watchdog
):
    import clipsearch.indexer as indexer

    model = tiny_model_dir(tmp_path_factory)
    root = tmp_path / "photos"
    made = build_folder(root)
    good, bad = made["good"], made["bad"]
    non_utf8 = os.path.join(os.fsencode(root), NON_UTF8)
    with open(non_utf8, "wb") as f:
        f.write(_jpeg_bytes(7))

    # Mid-run changes: one file vanishes after the walk found it; another is rewritten right
    # after the indexer has read it (so the bytes embedded are not what is on disk any more).
    real_walk, real_read = indexer.walk, indexer.read_and_hash
    old_bytes = (root / "changing.png").read_bytes()
    new_bytes = write_photo(tmp_path / "new.png", 999, size=(120, 90)).read_bytes()

    def walk_then_delete(*args, **kwargs):
        found = real_walk(*args, **kwargs)
        (root / "vanishing.png").unlink()
        return found

    def read_then_change(fd, keep):
        result = real_read(fd, keep)
        if os.readlink(f"/proc/self/fd/{fd}").endswith("changing.png"):
            (root / "changing.png").write_bytes(new_bytes)
        return result

    monkeypatch.setattr(indexer, "walk", walk_then_delete)
    monkeypatch.setattr(indexer, "read_and_hash", read_then_change)

    db = tmp_path / "lib.db"
    result = invoke("index", "--model", model, root, "--batch-size", "4", db=db)
    monkeypatch.setattr(indexer, "walk", real_walk)
    monkeypatch.setattr(indexer, "read_and_hash", real_read)
    assert result.exit_code == 0, result.output

    # Every good photo once, under its exact name (Unicode normalisation kept apart).
    rows = db_rows(db)
    stored = [Path(p) for p in rows["paths"]]
    assert len(stored) == len(set(stored))
    names = {p.name for p in stored}
    assert set(good) <= names, set(good) - names
    assert ODD_NAMES["nfc"] in names and ODD_NAMES["nfd"] in names
    assert not names & (set(bad) | {"pipe.jpg", "album.jpg", "loop.jpg"})
    assert all(p.exists() for p in stored if p.name in good)
    # The non-UTF-8 name: indexed, stored in the documented escape, which gives its bytes back.
    from clipsearch.store import text_path

    latin = [p for p in stored if os.fsencode(text_path(p.name)) == NON_UTF8]
    assert len(latin) == 1 and os.path.exists(os.fsencode(text_path(str(latin[0]))))
    assert len(stored) == len(good) + len(latin)
    assert sum(rows["embeddings"].values()) == len(stored)

    # The run's summary lists every skipped file with its reason.
    summary = result.stdout
    failures = dict(bad)
    failures["loop.jpg"] = None  # a link to itself: some reason, whichever
    n_failed = len(failures) + (0 if latin else 1)
    assert f"Skipped {n_failed} file(s):" in summary, summary
    for name, reason in failures.items():
        line = next((ln for ln in summary.splitlines() if ln.rstrip().endswith(f"{root / name}")), None)
        assert line is not None, (name, summary)
        assert reason is None or line.strip().startswith(f"{reason}:"), line
    if not latin:
        assert any("-latin1.png" in ln for ln in summary.splitlines()), summary

    # `clipsearch status` lists the same failures with their reasons.
    status = invoke("status", "--json", "--errors", "50", db=db)
    assert status.exit_code == 0, status.output
    data = json.loads(status.stdout)
    assert data["errors"] == n_failed
    listed = {Path(e["path"]).name: e["reason"] for e in data["recent_errors"]}
    assert {k: listed.get(k) for k in bad} == bad and "loop.jpg" in listed
    assert latin or any(name.endswith("-latin1.png") and listed[name] for name in listed), listed
    human = invoke("status", db=db)
    assert human.exit_code == 0, human.output
    assert f"Errors: {n_failed}" in human.stdout and "too many pixels:" in human.stdout

    # EXIF orientation is applied: the stored size is the upright one.
    conn_rows = _image_rows(db)
    assert conn_rows["rotated.jpg"][:2] == (72, 96)
    assert conn_rows["panorama.png"][:2] == (30_000, 200)
    # The changed file is stored with the hash of the bytes that were embedded ...
    assert conn_rows["changing.png"][2] == hashlib.blake2b(old_bytes, digest_size=20).hexdigest()
    # ... and the next run sees it changed and embeds what is on disk now.
    again = invoke("index", root, "--json", db=db)
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert report["updated"] == 1 and report["new"] == 0
    assert _image_rows(db)["changing.png"][2] == hashlib.blake2b(new_bytes, digest_size=20).hexdigest()
    # The vanished file's error is cleared once it is gone for good; the others stay.
    left = {
        Path(e["path"]).name for e in json.loads(invoke("status", "--json", db=db).stdout)["recent_errors"]
    }
    assert "vanishing.png" not in left and "bomb.png" in left


def _jpeg_bytes(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(scene(seed)).save(buf, format="JPEG")
    return buf.getvalue()


def _image_rows(db: Path) -> dict[str, tuple]:
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return {
            Path(p).name: (w, h, ch)
            for p, w, h, ch in conn.execute("SELECT path, width, height, content_hash FROM images")
        }
    finally:
        conn.close()


# The CLI as an unprivileged user: root reads everything, so permissions are only tested after
# dropping to nobody. Python lives under /root (closed to nobody), so everything is imported by
# one warm-up run as root first, then the process drops its privileges for good.
AS_NOBODY = """
import json, os, sys
# Nothing may be read from the checkout once privileges are gone (it may sit in a folder only its
# owner can open): no imports from the working folder, every module the commands need loaded first.
sys.path = [p for p in sys.path if p not in ("", ".")]
from click.testing import CliRunner
from clipsearch.cli import cli
import clipsearch.indexer, clipsearch.search, clipsearch.vectors, clipsearch.fastquery, clipsearch.zeroshot

pub = sys.argv[1]
os.chdir(pub)
def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return {"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr}
warm = run("--db", f"{pub}/warm.db", "index", "--model", f"{pub}/model", f"{pub}/warm", "--json")
assert warm["code"] == 0, warm
run("--db", f"{pub}/warm.db", "status")
run("--db", f"{pub}/warm.db", "query", "x", "--json")
run("--db", f"{pub}/warm.db", "label", "--classes", "a,b")
run("--db", f"{pub}/warm.db", "export", f"{pub}/warm.npz")
# A library root made and left readable, in a folder others may read but not write.
ro = run("--db", f"{pub}/ro/lib.db", "index", "--model", f"{pub}/model", f"{pub}/warm", "--json")
assert ro["code"] == 0, ro
os.chmod(f"{pub}/ro/lib.db", 0o644)
os.chmod(f"{pub}/ro", 0o755)
os.environ["CLIPSEARCH_HOME"] = f"{pub}/home"  # a home of its own: root's is not theirs to read
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
index = run("--db", f"{pub}/db/lib.db", "index", "--model", f"{pub}/model", f"{pub}/photos", "--json")
status = run("--db", f"{pub}/db/lib.db", "status", "--json", "--errors", "50")
closed_model = run("--db", f"{pub}/db/lib.db", "query", "x", "--model", f"{pub}/closed_model")
readonly = {
    "status": run("--db", f"{pub}/ro/lib.db", "status", "--json"),
    "query": run("--db", f"{pub}/ro/lib.db", "query", "x", "--json"),
    "export": run("--db", f"{pub}/ro/lib.db", "export", f"{pub}/db/ro.npz"),
    "index": run("--db", f"{pub}/ro/lib.db", "index", f"{pub}/warm"),
}
print(json.dumps({"index": index, "status": status, "closed_model": closed_model, "readonly": readonly,
                  "uid": os.getuid()}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the indexer's own test covers this as a normal user")
def test_unreadable_files_folders_and_model_as_an_unprivileged_user(tmp_path_factory):
    import shutil
    import subprocess
    import sys
    import tempfile

    pub = Path(tempfile.mkdtemp(prefix="clipsearch-nobody-"))  # /tmp: reachable by nobody
    try:
        pub.chmod(0o755)
        shutil.copytree(tiny_model_dir(tmp_path_factory), pub / "model")
        shutil.copytree(pub / "model", pub / "closed_model")
        (pub / "model").chmod(0o755)
        for f in (pub / "model").iterdir():
            f.chmod(0o644)
        for f in (pub / "closed_model").iterdir():
            f.chmod(0o600)  # root's alone: nobody can read neither the folder nor its files
        (pub / "closed_model").chmod(0o700)
        for folder in ("db", "home", "ro"):
            (pub / folder).mkdir(mode=0o777)
            (pub / folder).chmod(0o777)
        write_photo(pub / "warm" / "w.png", 1)
        good = write_photo(pub / "photos" / "good.png", 2)
        locked = write_photo(pub / "photos" / "locked.png", 3)
        write_photo(pub / "photos" / "closed" / "inside.png", 4)
        locked.chmod(0)
        (pub / "photos" / "closed").chmod(0)
        proc = subprocess.run(
            [sys.executable, "-c", AS_NOBODY, str(pub)], capture_output=True, text=True, timeout=300, cwd=pub
        )
        if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
            pytest.skip("cannot drop privileges here (no CAP_SETUID)")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["uid"] == 65534
        assert out["index"]["code"] == 0, out["index"]
        report = json.loads(out["index"]["stdout"])
        assert report["new"] == 1
        assert {Path(f["path"]).name: f["reason"] for f in report["failed"]} == {
            "locked.png": "permission denied",
            "closed": "permission denied",
        }
        status = json.loads(out["status"]["stdout"])
        assert status["images"] == 1 and status["errors"] == 2
        assert {Path(e["path"]).name for e in status["recent_errors"]} == {"locked.png", "closed"}
        assert good.exists()
        # A model the user may not read is a clear one-line error, not a crash.
        closed = out["closed_model"]
        assert closed["code"] == 1 and closed["stderr"].count("\n") == 1, closed
        assert "bug" not in closed["stderr"] and "closed_model" in closed["stderr"], closed
        # A valid library this user may read but not write: queries, status and export work; an index
        # run says it is read-only (never "corrupt"), and the file is as it was.
        ro = out["readonly"]
        assert ro["status"]["code"] == 0 and json.loads(ro["status"]["stdout"])["images"] == 1, ro["status"]
        assert ro["query"]["code"] == 0 and len(json.loads(ro["query"]["stdout"])) == 1, ro["query"]
        assert ro["export"]["code"] == 0 and (pub / "db" / "ro.npz").stat().st_size > 0, ro["export"]
        assert ro["index"]["code"] == 1 and "read-only" in ro["index"]["stderr"], ro["index"]
        assert not any("corrupt" in r["stderr"] for r in ro.values())
    finally:
        (pub / "photos" / "closed").chmod(0o755)
        shutil.rmtree(pub, ignore_errors=True)
