"""Writing files so that a reader, a crash or another program never sees or causes a half-done one.

Every file clipsearch writes goes through :func:`atomic_path` (or :func:`write_bytes` /
:func:`write_text` on top of it), and every lock file through :func:`open_lock`. The invariants:

- The new content goes to a fresh temporary file in the target's own folder, made by ``mkstemp``
  (an unpredictable name, opened ``O_EXCL``: a symlink planted at that name is never followed).
- The file is fsync'd, renamed over the target in one step, and the folder is fsync'd, so after a
  crash the target holds the old content or the new, never a mix, and the rename survives.
- A target that already exists keeps its mode and group (a sidecar another program made ``0600``
  stays ``0600``); a new file gets ``0666 & ~umask`` like any file the user makes, or ``0600`` with
  ``private=True`` (then always, whatever the old file had).
- A target that is a symlink is written *through*: the file it points to is replaced and the link
  stays a link (a sidecar kept in a synced folder and linked beside the photo keeps working).
- A temporary file holds an flock while it is live; :func:`remove_stale_temps` deletes only the
  temporaries of writers that died, never a live one.
- A target that exists and is not a regular file once its links are followed (a character device
  such as ``/dev/stdout`` or ``/dev/null``, a FIFO, a pipe or socket reached through
  ``/proc/self/fd``) is a stream: it is never replaced. The block writes a private temporary in
  the system's temporary folder, and its bytes are then written into the stream (atomicity means
  nothing there; a write error such as ENOSPC from ``/dev/full`` is an ``OSError`` naming the
  target). A folder as target is an error (``EISDIR``).
- With ``make_folder=False`` (what the user names on the command line), a target whose folder does
  not exist is refused (:class:`MissingFolderError`) rather than created: a typo in a path is
  not silently turned into new folders.

Lock files are opened with ``O_NOFOLLOW`` and never truncated or written: a ``LIBRARY.lock`` that
someone replaced by a symlink to a precious file is refused, and the file stays intact.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from clipsearch.errors import ClipsearchError

TEMP_SUFFIX = ".tmp"
TEMP_MIN_AGE_S = 60  # a temporary younger than this may belong to a writer that has not locked it yet
# What atomic_path names its temporaries (mkstemp's 8 random characters), and what versions before it
# named them (pid, optionally a hex tag), so a leftover of either is recognised.
_TEMP_NAME = re.compile(r"^\..+\.([a-z0-9_]{8}|\d+(\.[0-9a-f]+)?)\.tmp$")


class SymlinkLockError(OSError):
    """A lock file's path is a symlink (or not a regular file): it is never opened for writing."""


class MissingFolderError(ClipsearchError, FileNotFoundError):
    """The folder of a file to write does not exist (and the writer was told not to make it).

    Both a :class:`ClipsearchError` (one line at the CLI's edge) and a ``FileNotFoundError`` (what
    a caller that reports ``OSError`` per file, such as ``label --write-xmp``, already catches)."""

    def __init__(self, target: Path | str, folder: Path | str):
        super().__init__(errno.ENOENT, f"cannot write {target}: folder {folder} does not exist", str(target))

    def __str__(self) -> str:
        return self.strerror


def umask() -> int:
    """This process's umask (read by setting it and back: there is no other way)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_target(target: Path | str) -> Path:
    """The file a write to ``target`` replaces: ``target`` itself, or the end of its symlink chain.

    Only the link chain of the last component is followed (a dangling link names the file to
    create); the folder part stays as given. Raises ``OSError(ELOOP)`` on a symlink loop.
    """
    path = Path(os.path.abspath(os.fspath(target)))
    for _ in range(40):  # the kernel's own limit on a chain of links
        try:
            link = os.readlink(path)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):  # not a link, or nothing there yet
                return path
            raise
        path = Path(os.path.abspath(os.path.join(path.parent, link)))
    raise OSError(errno.ELOOP, "too many levels of symbolic links", str(target))


def fsync_dir(directory: Path | str) -> None:
    """Make a rename or create in ``directory`` durable (a no-op where the filesystem cannot)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and platforms) cannot fsync a folder; the rename still happened
    finally:
        os.close(fd)


def _carry_over(fd: int, previous: os.stat_result | None, private: bool) -> None:
    """Give the new file (open as ``fd``) its mode and group: the old file's, or a new file's."""
    if private:
        os.fchmod(fd, 0o600)
        return
    if previous is None:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it 0600; a plain new file is not private
        return
    os.fchmod(fd, stat.S_IMODE(previous.st_mode))
    if previous.st_gid != os.fstat(fd).st_gid:
        try:
            os.fchown(fd, -1, previous.st_gid)
        except OSError:
            pass  # not a member of that group: the file keeps ours, as a copy by the user would


def _existing(target: Path | str) -> os.stat_result | None:
    """What ``target`` is once every link is followed (``/proc`` magic links too); None when
    nothing is there yet (a dangling link included). A folder raises ``IsADirectoryError``."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(target))
    return st


def _is_stream(st: os.stat_result | None) -> bool:
    return st is not None and not stat.S_ISREG(st.st_mode)


def _own_descriptor(target: Path | str) -> int | None:
    """The descriptor number when ``target`` (or a link on its way) is one of this process's own
    (``/dev/stdout``, ``/dev/fd/1``, ``/proc/self/fd/1``): a socket there cannot be opened again by
    its path, but the descriptor can be copied."""
    folders = {"/dev/fd", "/proc/self/fd", "/proc/thread-self/fd", f"/proc/{os.getpid()}/fd"}
    path = os.path.abspath(os.fspath(target))
    for _ in range(40):  # the kernel's own limit on a chain of links
        folder, name = os.path.split(path)
        if name.isdigit() and folder in folders:
            return int(name)
        try:
            link = os.readlink(path)
        except OSError:
            return None
        path = os.path.abspath(os.path.join(folder, link))
    return None


def _open_stream(target: Path | str) -> int:
    """A write descriptor on the stream ``target`` (blocks on a FIFO until a reader comes, as a
    shell's ``>`` does). Never creates, truncates or replaces anything."""
    own = _own_descriptor(target)
    if own is not None:
        fd = os.dup(own)
    else:
        fd = os.open(target, os.O_WRONLY | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    if not _is_stream(os.fstat(fd)):  # swapped for a file or folder since the stat: write nothing
        os.close(fd)
        raise OSError(errno.EAGAIN, "changed while being opened; try again", str(target))
    return fd


def _copy_into(source: Path, out: int, target: Path | str) -> None:
    """Write the bytes of the file ``source`` into the descriptor ``out``, all of them."""
    with open(source, "rb") as f:
        while chunk := f.read(1 << 20):
            view = memoryview(chunk)
            while view:
                try:
                    view = view[os.write(out, view) :]
                except OSError as e:  # ENOSPC, EPIPE, EIO: name the target, not a descriptor
                    raise OSError(e.errno, e.strerror, str(target)) from None


@contextlib.contextmanager
def _streamed(target: Path | str) -> Iterator[Path]:
    """Yield a private temporary in the system's temporary folder; when the block ends without
    error, its bytes go into the stream ``target``. The stream is opened first, so a target that
    cannot be written fails before any work is done."""
    out = _open_stream(target)
    try:
        fd, name = tempfile.mkstemp(prefix=".clipsearch-stream.", suffix=TEMP_SUFFIX)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            _copy_into(tmp, out, target)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    finally:
        os.close(out)


def _check_folder(target: Path | str, final: Path, make_folder: bool) -> None:
    """Make ``final``'s folder, or with ``make_folder=False`` refuse when it does not exist."""
    if os.path.isdir(final.parent):
        return
    if make_folder:
        final.parent.mkdir(parents=True, exist_ok=True)
        return
    # The folder as the user wrote it, unless a link leads elsewhere.
    given = Path(os.fspath(target))
    shown = given.parent if Path(os.path.abspath(given)) == final else final.parent
    raise MissingFolderError(target, shown)


@contextlib.contextmanager
def atomic_path(target: Path | str, *, private: bool = False, make_folder: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``target``; when the block ends without error, it
    replaces ``target`` atomically (see the module docstring for every guarantee).

    The block may write the temporary itself or hand its path to a library (``faiss.write_index``,
    ``np.savez``, ``onnx.save``). On an error the temporary is removed and ``target`` is untouched.
    ``private=True`` makes the result ``0600`` (caches of what the user searched). The target's
    folder is created when missing, or with ``make_folder=False`` refused
    (:class:`MissingFolderError`). A target that is a stream (a device, a FIFO, a pipe) is written
    into, never replaced; a folder raises ``IsADirectoryError``. Raises ``OSError`` when the folder
    or the stream cannot be written.
    """
    if _is_stream(_existing(target)):
        with _streamed(target) as tmp:
            yield tmp
        return
    final = write_target(target)
    _check_folder(target, final, make_folder)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=TEMP_SUFFIX)
    tmp = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # tells remove_stale_temps this temporary is live
        yield tmp
        commit(tmp, final, private=private)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def commit(written: Path | str, target: Path | str, *, private: bool = False) -> None:
    """Move a finished file ``written`` (on the same filesystem) over ``target`` with every
    guarantee of :func:`atomic_path`: fsync'd, mode and group carried over, symlink written
    through, folder fsync'd. For writers that produce several files in a work folder first.
    A stream ``target`` gets ``written``'s bytes, and ``written`` is removed."""
    if _is_stream(_existing(target)):
        out = _open_stream(target)
        try:
            _copy_into(Path(written), out, target)
        finally:
            os.close(out)
        os.unlink(written)
        return
    final = write_target(target)
    try:
        previous = os.stat(final)
    except FileNotFoundError:
        previous = None
    # Opened by path again (not by the creator's descriptor): a writer such as onnx.save may have
    # replaced the file at that name with one of its own.
    fd = os.open(written, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(written))
        _carry_over(
            fd, previous if previous is not None and stat.S_ISREG(previous.st_mode) else None, private
        )
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(written, final)
    fsync_dir(final.parent)


def write_bytes(target: Path | str, data: bytes, *, private: bool = False, make_folder: bool = True) -> Path:
    """Replace ``target`` by ``data`` atomically (see :func:`atomic_path`); returns ``target``."""
    with atomic_path(target, private=private, make_folder=make_folder) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: Path | str, text: str, *, private: bool = False, make_folder: bool = True) -> Path:
    """Replace ``target`` by ``text`` (UTF-8) atomically (see :func:`atomic_path`)."""
    return write_bytes(target, text.encode("utf-8"), private=private, make_folder=make_folder)


def open_lock(path: Path | str, mode: int = 0o600) -> int:
    """Open (creating it ``mode``) the lock file ``path`` for ``flock``; returns the descriptor.

    Never follows a symlink and never truncates or writes: a lock path that is a symlink, a
    folder, a FIFO or a device raises :class:`SymlinkLockError`, and whatever it points at is not
    touched. The caller closes the descriptor (which releases any flock held on it).
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):  # what O_NOFOLLOW answers for a symlink
            raise SymlinkLockError(e.errno, "the lock file is a symbolic link; remove it", str(path)) from e
        if e.errno in (errno.EISDIR, errno.ENXIO):
            raise SymlinkLockError(
                e.errno, "the lock file is not a regular file; remove it", str(path)
            ) from e
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SymlinkLockError(errno.EINVAL, "the lock file is not a regular file; remove it", str(path))
    return fd


def remove_stale_temps(directory: Path | str, min_age_s: float | None = None) -> list[Path]:
    """Delete the temporaries of killed writers in ``directory``; returns those removed.

    Only names :func:`atomic_path` gives are touched, only regular files (never through a symlink),
    only when no writer holds their flock (a live one holds it until its rename) and only when older
    than ``min_age_s`` (default :data:`TEMP_MIN_AGE_S`: a writer may not have locked it yet).
    """
    min_age_s = TEMP_MIN_AGE_S if min_age_s is None else min_age_s
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not _TEMP_NAME.match(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass  # a live writer holds it, another cleaner removed it, or a folder we may not write
        finally:
            os.close(fd)
    return removed
