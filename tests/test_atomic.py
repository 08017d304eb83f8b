"""The one atomic write and the lock file: what another program or a crash can and cannot see."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from clipsearch import atomic
from clipsearch.errors import LibraryError
from clipsearch.store import Library


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_gets_the_umask_mode_and_private_gets_0600(tmp_path):
    old = os.umask(0o027)
    try:
        atomic.write_text(tmp_path / "a.txt", "hello")
        atomic.write_text(tmp_path / "b.txt", "secret", private=True)
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert _mode(tmp_path / "a.txt") == 0o640
    assert _mode(tmp_path / "b.txt") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporaries left


def test_existing_file_keeps_its_mode_and_is_replaced_by_a_new_inode(tmp_path):
    target = tmp_path / "side.xmp"
    target.write_text("old")
    os.chmod(target, 0o604)
    before = os.stat(target).st_ino
    reader = open(target)  # a reader holding the old file still sees the old bytes
    atomic.write_text(target, "new")
    assert target.read_text() == "new" and reader.read() == "old"
    reader.close()
    assert _mode(target) == 0o604
    assert os.stat(target).st_ino != before


def test_existing_file_keeps_its_group_when_we_may_set_it(tmp_path):
    groups = [g for g in os.getgroups() if g != os.getegid()] or ([1] if os.geteuid() == 0 else [])
    if not groups:
        pytest.skip("this user belongs to one group only: a kept group cannot be told from the default")
    target = tmp_path / "shared.txt"
    target.write_text("old")
    os.chown(target, -1, groups[0])
    atomic.write_text(target, "new")
    assert os.stat(target).st_gid == groups[0]


def test_a_symlinked_target_is_written_through_and_stays_a_link(tmp_path):
    real_dir = tmp_path / "synced"
    real_dir.mkdir()
    real = real_dir / "photo.jpg.xmp"
    real.write_text("old")
    os.chmod(real, 0o600)
    link = tmp_path / "photo.jpg.xmp"
    link.symlink_to(os.path.relpath(real, tmp_path))
    atomic.write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == os.path.relpath(real, tmp_path)
    assert real.read_text() == "new" and _mode(real) == 0o600
    assert sorted(p.name for p in real_dir.iterdir()) == ["photo.jpg.xmp"]


def test_a_dangling_link_creates_its_target(tmp_path):
    link = tmp_path / "out.html"
    link.symlink_to(tmp_path / "elsewhere.html")
    atomic.write_text(link, "page")
    assert link.is_symlink() and (tmp_path / "elsewhere.html").read_text() == "page"


def test_a_link_loop_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(OSError) as e:
        atomic.write_text(tmp_path / "a", "x")
    assert e.value.errno == errno.ELOOP


def test_a_failed_write_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_temporary_names_are_unpredictable_and_a_planted_link_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    # What older versions named their temporary: a link planted there used to be written through.
    (tmp_path / f".out.txt.{os.getpid()}.tmp").symlink_to(victim)
    names = set()
    for _ in range(3):
        with atomic.atomic_path(tmp_path / "out.txt") as tmp:
            names.add(tmp.name)
            tmp.write_text("mine")
    assert len(names) == 3
    assert victim.read_text() == "precious"


def test_a_writer_killed_before_the_rename_leaves_the_old_file_and_a_removable_temporary(tmp_path):
    target = tmp_path / "index.json"
    target.write_text("old")
    script = (
        "import os, signal, sys\n"
        "from clipsearch import atomic\n"
        "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic.write_text(sys.argv[1], 'new')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True)
    assert proc.returncode == -9
    assert target.read_text() == "old"
    temps = [p for p in tmp_path.iterdir() if p.name != "index.json"]
    assert len(temps) == 1 and temps[0].read_text() == "new"
    assert atomic.remove_stale_temps(tmp_path) == []  # too young to tell from a live writer
    os.utime(temps[0], (1, 1))
    assert atomic.remove_stale_temps(tmp_path) == temps
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_commit_moves_a_file_written_elsewhere_with_the_same_guarantees(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")
    os.chmod(target, 0o640)
    work = tmp_path / ".work"
    work.mkdir()
    (work / "model.onnx").write_text("new")
    atomic.commit(work / "model.onnx", target)
    assert target.read_text() == "new" and _mode(target) == 0o640 and not (work / "model.onnx").exists()


# --- targets that are not regular files: written into, never replaced ------------------------------


@pytest.fixture
def stream_temps(tmp_path, monkeypatch):
    """Where a write into a stream stages its bytes (the system's temporary folder), watched."""
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    return staging


def _kind(path) -> int:
    return stat.S_IFMT(os.stat(path).st_mode)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_target_is_written_into_and_stays_a_fifo(tmp_path, stream_temps):
    fifo = tmp_path / "out.html"
    os.mkfifo(fifo)
    # The reader is there first (opened without blocking), so the writer's open cannot block either;
    # the page is smaller than a pipe's buffer, so its writes cannot block.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert atomic.write_text(fifo, "<p>page</p>") == fifo
        assert os.read(reader, 1 << 16) == b"<p>page</p>"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.html", "staging"]  # no temporary beside
    assert list(stream_temps.iterdir()) == []  # the staged copy is gone


@pytest.mark.parametrize("through_link", [False, True], ids=["dev-null", "link-to-dev-null"])
def test_dev_null_is_written_into_and_stays_a_device(tmp_path, stream_temps, through_link):
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    target = tmp_path / "out.npz" if through_link else Path("/dev/null")
    if through_link:
        target.symlink_to("/dev/null")
    with atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"x" * 100_000)  # a library writing to the path it is given
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not through_link or os.readlink(target) == "/dev/null"
    assert list(stream_temps.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc/self/fd")
def test_a_pipe_and_a_socket_through_proc_self_fd_are_written_into(tmp_path, stream_temps):
    """What ``--html /dev/stdout`` meets when stdout is a pipe (a shell) or a socket (a service)."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        link = tmp_path / "out.html"  # as in the field test: a link to /proc/self/fd/N
        link.symlink_to(f"/proc/self/fd/{w}")
        atomic.write_text(link, "to the pipe")
        assert os.read(r, 100) == b"to the pipe"
        atomic.write_text(f"/proc/self/fd/{a.fileno()}", "to the socket")  # cannot be opened by path
        assert b.recv(100) == b"to the socket"
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
    assert os.readlink(link) == f"/proc/self/fd/{w}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.html", "staging"]


def test_a_failed_block_writes_nothing_into_the_stream(tmp_path, stream_temps):
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        with pytest.raises(RuntimeError), atomic.atomic_path(f"/dev/fd/{w}") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
        with pytest.raises(BlockingIOError):  # empty: nothing was written
            os.read(r, 100)
    finally:
        os.close(r)
        os.close(w)
    assert list(stream_temps.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_dev_full_is_an_enospc_error_naming_it_and_stays_a_device(stream_temps):
    with pytest.raises(OSError) as e:
        atomic.write_text("/dev/full", "a page")
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/dev/full"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert list(stream_temps.iterdir()) == []


def test_a_folder_target_is_an_error_and_is_left_alone(tmp_path):
    folder = tmp_path / "out.html"
    (folder / "inside").mkdir(parents=True)
    link = tmp_path / "link.html"
    link.symlink_to(folder)
    for target in (folder, link):
        with pytest.raises(IsADirectoryError):
            atomic.write_text(target, "page")
    assert [p.name for p in folder.iterdir()] == ["inside"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.html", "out.html"]  # no temporary


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc/self/fd")
def test_a_regular_file_reached_through_proc_self_fd_is_still_replaced_atomically(tmp_path):
    """``--html /dev/stdout > page.html``: a regular file behind the link keeps the atomic write."""
    target = tmp_path / "page.html"
    target.write_text("old")
    os.chmod(target, 0o640)
    with open(target) as held:
        atomic.write_text(f"/proc/self/fd/{held.fileno()}", "new")
        assert held.read() == "old"  # the old inode, untouched: a new file was renamed over it
    assert target.read_text() == "new" and _mode(target) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]


def test_make_folder_false_refuses_a_missing_folder_and_makes_none(tmp_path):
    target = tmp_path / "nd" / "a" / "b.html"
    with pytest.raises(atomic.MissingFolderError) as e:
        atomic.write_text(target, "page", make_folder=False)
    assert str(e.value) == f"cannot write {target}: folder {target.parent} does not exist"
    assert isinstance(e.value, FileNotFoundError)  # callers that report OSError per file catch it
    assert list(tmp_path.iterdir()) == []
    atomic.write_text(target, "page")  # the default (caches, indexes) still makes it
    assert target.read_text() == "page"


# --- lock files ----------------------------------------------------------------------------------


def test_open_lock_refuses_a_symlink_and_leaves_its_target_intact(tmp_path):
    victim = tmp_path / "thesis.tex"
    victim.write_text("years of work")
    lock = tmp_path / "x.lock"
    lock.symlink_to(victim)
    with pytest.raises(atomic.SymlinkLockError):
        atomic.open_lock(lock)
    assert victim.read_text() == "years of work"


def test_open_lock_refuses_a_fifo_without_blocking(tmp_path):
    lock = tmp_path / "x.lock"
    os.mkfifo(lock)
    with pytest.raises(atomic.SymlinkLockError):
        atomic.open_lock(lock)


def test_open_lock_never_truncates(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text("something someone put here")
    fd = atomic.open_lock(lock)
    os.close(fd)
    assert lock.read_text() == "something someone put here"


def test_a_planted_library_lock_symlink_is_refused_in_one_line_and_its_target_kept(
    tmp_path, tmp_path_factory
):
    from e2e_helpers import run_cli, write_photo
    from test_reliability import tiny_model_dir

    db = tmp_path / "library.db"
    Library.open(db, create=True).close()
    victim = tmp_path / "notes.txt"
    victim.write_text("keep me")
    Path(str(db) + ".lock").symlink_to(victim)
    with Library.open(db) as lib, pytest.raises(LibraryError, match="symbolic link"):
        lib.acquire_writer_lock()
    photos = tmp_path / "photos"
    write_photo(photos / "a.jpg", 1)
    proc = run_cli("--db", str(db), "index", str(photos), "--model", str(tiny_model_dir(tmp_path_factory)))
    assert proc.returncode != 0
    assert "symbolic link" in proc.stderr and "Traceback" not in proc.stderr
    assert victim.read_text() == "keep me"
