"""Finding the photos under a set of paths, without ever opening anything but regular files.

Rules: image files by extension (case-insensitive); hidden files and folders (a name starting with
``.``) skipped unless asked; ``exclude`` globs matched (fnmatch) against the path relative to the
scanned root and against the bare name; symlinks followed, but a folder already visited (same
``(st_dev, st_ino)``) is never entered twice, so loops end, and neither is a folder above a root
(``sub/up -> ..`` would walk the whole parent under a second name); anything that is not a regular file
is never opened: a FIFO, socket or device named like a photo (``photo.jpg``) is reported as a failure
with the reason ``not a regular file`` (a folder named like one is walked like any folder); dead
symlinks and unreadable folders are reported as failures with a reason too, instead of raising.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clipsearch.imageio import IMAGE_EXTENSIONS


@dataclass
class FoundFile:
    path: Path  # absolute, symlinks not resolved
    size: int
    mtime_ns: int


@dataclass
class WalkResult:
    files: list[FoundFile] = field(default_factory=list)
    failed: list[tuple[Path, str, str]] = field(default_factory=list)  # (path, reason, detail)
    # Folders that could not be listed: what was indexed under them must not be treated as gone.
    unreadable_dirs: list[Path] = field(default_factory=list)
    roots: list[Path] = field(default_factory=list)  # the scanned roots that exist
    # XMP sidecars beside the photos (path -> st_mtime_ns): the indexer notices one edited since
    # its photo's metadata was read (clipsearch.metadata.sidecar_stamp)
    sidecars: dict[str, int] = field(default_factory=dict)


def _excluded(rel: str, name: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, g) or fnmatch.fnmatchcase(name, g) for g in exclude)


def oserror_reason(e: OSError) -> str:
    """The reason a failed file or folder is listed with (``permission denied``, ``vanished``...)."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno == errno.ENOENT:
        return "vanished"
    return "unreadable"


def why_not_a_file(path: Path | str) -> str | None:
    """Why ``path`` is not a regular file that can be opened, in a few words, or None when it is one.

    For a path the user gave on its own (a query image, a photo to find copies of): "not found"
    would hide a folder, a FIFO, a loop or a dangling link behind the wrong cause. Never opens it.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if e.errno == errno.ENOENT:
            return "a symlink to nothing" if os.path.islink(path) else "no such file"
        return oserror_reason(e)
    return None if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return f"{name}, not a photo file"
    return "not a photo file"


def walk(
    roots: Iterable[Path | str],
    *,
    exclude: Sequence[str] = (),
    include_hidden: bool = False,
    extensions: frozenset[str] | None = None,
) -> WalkResult:
    """Every image file under ``roots`` (files or folders), in a stable sorted order."""
    exts = extensions if extensions is not None else IMAGE_EXTENSIONS
    result = WalkResult()
    visited: set[tuple[int, int]] = set()
    seen_files: set[str] = set()
    roots = [Path(os.path.abspath(os.fspath(raw))) for raw in roots]
    # The folders above each root: a link inside a root back up to one of them (sub/up -> ..) would
    # walk the whole parent under a second name; it is not entered, like a loop. A root itself is.
    above: set[tuple[int, int]] = set()
    for root in roots:
        for parent in Path(os.path.realpath(root)).parents:
            with contextlib.suppress(OSError):
                st = os.stat(parent)
                above.add((st.st_dev, st.st_ino))

    def consider(path: Path, rel: str) -> None:
        name = path.name
        ext = os.path.splitext(name)[1].lower()
        if ext == ".xmp":
            with contextlib.suppress(OSError):  # a sidecar that cannot be read is simply not there
                st = os.stat(path)
                if stat.S_ISREG(st.st_mode):
                    result.sidecars[str(path)] = st.st_mtime_ns
            return
        if ext not in exts:
            return
        if _excluded(rel, name, exclude):
            return
        try:
            st = os.stat(path)  # follows symlinks: the target's kind matters
        except OSError as e:
            if os.path.islink(path):
                result.failed.append((path, "dead symlink", f"{os.readlink(path)}: {e.strerror}"))
            else:
                result.failed.append((path, oserror_reason(e), e.strerror or str(e)))
            return
        if not stat.S_ISREG(st.st_mode):
            # Never opened (a FIFO would block a reader forever), but reported: the user named it a photo.
            result.failed.append((path, "not a regular file", _kind(st.st_mode)))
            return
        key = str(path)
        if key not in seen_files:
            seen_files.add(key)
            result.files.append(FoundFile(path, st.st_size, st.st_mtime_ns))

    def listing(directory: Path, root: bool = False) -> list[os.DirEntry] | None:
        """The folder's entries sorted by name; None when it cannot be listed, was walked already, or
        is (not being a root) a folder above a root."""
        try:
            st = os.stat(directory)
        except OSError as e:
            result.failed.append((directory, oserror_reason(e), e.strerror or str(e)))
            result.unreadable_dirs.append(directory)
            return None
        key = (st.st_dev, st.st_ino)
        if key in visited or (not root and key in above):
            return None  # a symlink loop, a second link to a folder already walked, or a link up
        visited.add(key)
        try:
            with os.scandir(directory) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as e:
            result.failed.append((directory, oserror_reason(e), e.strerror or str(e)))
            result.unreadable_dirs.append(directory)
            return None

    def visit_tree(root: Path) -> None:
        # Depth first with a stack of the open folders' remaining entries, not recursion: a tree
        # thousands of folders deep is walked like any other (the order is the recursive one).
        stack = [iter(listing(root, root=True) or ())]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            if not include_hidden and entry.name.startswith("."):
                continue
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if not is_dir:
                consider(path, rel)
            elif not _excluded(rel, entry.name, exclude):
                entries = listing(path)
                if entries is not None:
                    stack.append(iter(entries))

    for root in roots:
        if os.path.isdir(root):
            # The root is resolved once (like the library's own folder), so a photo folder reached
            # through a symlink is stored relative to a library kept inside it.
            root = Path(os.path.realpath(root))
            result.roots.append(root)
            visit_tree(root)
        elif os.path.lexists(root):
            from clipsearch.metadata import sidecar_candidates

            result.roots.append(root)
            consider(root, root.name)
            for side in sidecar_candidates(root):  # a photo named alone: its sidecars too
                consider(side, side.name)
        else:
            result.failed.append((root, "missing", "no such file or folder"))
    return result
