"""What a user may name as an output (`export FILE`, `--html FILE`), through the CLI as they meet it:
a device or a FIFO is written into and stays what it was, a full device is one clear error, and a
folder that does not exist is refused the same way by every command, never made."""

from __future__ import annotations

import contextlib
import io
import os
import select
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from e2e_helpers import run_cli, write_photo
from test_reliability import invoke, one_line_error, tiny_model_dir

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    for i in range(3):
        write_photo(root / "photos" / f"{i}.jpg", i)
    db = root / "lib.db"
    result = invoke("index", "--model", tiny_model_dir(tmp_path_factory), root / "photos", db=db)
    assert result.exit_code == 0, result.output
    return db


@contextlib.contextmanager
def fifo_reader(fifo: Path, timeout: float = 60):
    """Collect what is written into ``fifo`` while the block runs; never hangs.

    The read end is opened without blocking, and a writer of our own is held open, so the CLI's open
    cannot block and the reader sees the end of the data only once the block is over. A thread
    drains the FIFO meanwhile, so a writer never blocks on a full pipe either."""
    got = bytearray()
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    ours = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    deadline = time.monotonic() + timeout

    def drain():
        while time.monotonic() < deadline:
            if select.select([reader], [], [], 0.1)[0]:
                chunk = os.read(reader, 1 << 16)
                if not chunk:  # every writer closed
                    return
                got.extend(chunk)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        os.close(ours)
        thread.join(timeout)
        os.close(reader)
    assert not thread.is_alive(), "the FIFO was never closed by its writer"


@needs_fifo
def test_export_into_a_fifo_writes_the_npz_into_it_and_keeps_the_fifo(library, tmp_path):
    fifo = tmp_path / "ff.npz"
    os.mkfifo(fifo)
    with fifo_reader(fifo) as got:
        result = invoke("export", fifo, db=library)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # not replaced by a regular file
    with np.load(io.BytesIO(bytes(got))) as npz:
        assert npz["embeddings"].shape[0] == 3 and len(npz["paths"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ff.npz"]


@needs_fifo
@pytest.mark.parametrize("command", [("query", "dog"), ("duplicates",)], ids=["query", "duplicates"])
def test_html_into_a_fifo_writes_the_page_into_it_and_keeps_the_fifo(library, tmp_path, command):
    fifo = tmp_path / "ff.html"
    os.mkfifo(fifo)
    with fifo_reader(fifo) as got:
        result = invoke(*command, "--html", fifo, db=library)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert bytes(got).lstrip().lower().startswith(b"<!doctype html>") and bytes(got).rstrip().endswith(
        b"</html>"
    )


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_export_and_html_into_dev_null_leave_it_a_device(library, tmp_path):
    link = tmp_path / "out.html"
    link.symlink_to("/dev/null")
    for args in (
        ("export", "/dev/null"),
        ("query", "dog", "--html", "/dev/null"),
        ("query", "dog", "--html", link),
    ):
        result = invoke(*args, db=library)
        assert result.exit_code == 0, result.output
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert link.is_symlink() and os.readlink(link) == "/dev/null"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize(
    "args", [("export", "/dev/full"), ("query", "dog", "--html", "/dev/full")], ids=["export", "html"]
)
def test_a_full_device_is_one_line_error_and_stays_a_device(library, args):
    result = invoke(*args, db=library)
    line = one_line_error(result)
    assert "No space left on device" in line and "/dev/full" in line
    assert "Exported" not in result.stderr and "Wrote" not in result.stderr
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc/self/fd")
def test_html_to_dev_stdout_and_a_link_to_proc_self_fd_reach_the_pipe(library, tmp_path):
    """As in a shell: `clipsearch query dog --html /dev/stdout | ...` (stdout is a pipe here)."""
    link = tmp_path / "out.html"
    link.symlink_to("/proc/self/fd/1")
    for target in ("/dev/stdout", link):
        proc = run_cli("--db", str(library), "query", "dog", "--html", str(target), timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.lstrip().lower().startswith("<!doctype html>"), proc.stdout[:200]
        assert proc.stdout.rstrip().lower().endswith("</html>"), proc.stdout[-200:]  # the page alone
        assert "Traceback" not in proc.stderr
    duplicates = run_cli("--db", str(library), "duplicates", "--html", "/dev/stdout", timeout=120)
    assert duplicates.returncode == 0 and duplicates.stdout.rstrip().lower().endswith("</html>")
    assert os.readlink(link) == "/proc/self/fd/1"
    assert [p.name for p in tmp_path.iterdir()] == ["out.html"]


@pytest.mark.parametrize(
    "args",
    [
        ("export", "nd/a/b.npz"),
        ("query", "dog", "--html", "nd/a/b.html"),
        ("duplicates", "--html", "nd/a/b.html"),
    ],
    ids=["export", "query", "duplicates"],
)
def test_a_missing_output_folder_is_refused_the_same_way_by_every_command(
    library, tmp_path, monkeypatch, args
):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(invoke(*args, db=library))
    assert line.endswith(f"cannot write {args[-1]}: folder nd/a does not exist")
    assert list(tmp_path.iterdir()) == []  # no folder made
