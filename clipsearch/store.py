"""The photo library: one SQLite database, the source of truth for everything clipsearch knows.

Tables (created by the named, ordered migrations below; ``migrations`` records which ran):

- ``images``: one row per indexed file. ``path`` is relative to the database's folder when the
  file is under it (so a library kept inside the photo folder moves with it), absolute otherwise.
  Ids come from AUTOINCREMENT and are never reused, so the FAISS index can key on them safely.
- ``models``: every model the library was indexed with (its id, how to load it again, dimension).
- ``embeddings``: one L2-normalised float32 vector per (image, model), stored as a blob.
- ``labels``: zero-shot labels, grouped by class set (the sorted class list, as JSON).
- ``errors``: files the last runs could not index, with a short reason.
- ``meta``: a ``generation`` counter bumped by every transaction that changes images or
  embeddings; the FAISS index records the generation it reflects (see ``vectors.py``).

Connections run in WAL mode with a busy timeout, so a query during an index run reads what is
committed instead of failing with "database is locked". Writers of bulk work (the indexer) also
hold an exclusive lock file ``<db>.lock``; readers never take it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from clipsearch.errors import LibraryError

if TYPE_CHECKING:  # numpy is imported where vectors are read or written: a query client needs none
    import numpy as np


class LibraryWriteError(LibraryError):
    """SQLite refused a write (a full disk, an I/O error, a lock held past the busy timeout)."""


log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000  # long enough to wait out one indexer batch commit


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- schema -----------------------------------------------------------------------------------

_M001 = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    width INTEGER,
    height INTEGER,
    taken_at TEXT,
    indexed_at TEXT NOT NULL
);
CREATE INDEX images_content_hash ON images(content_hash);
CREATE TABLE models (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    dim INTEGER,
    config TEXT,
    first_used TEXT NOT NULL,
    last_used TEXT NOT NULL
);
CREATE TABLE embeddings (
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    model_id TEXT NOT NULL REFERENCES models(id),
    vector BLOB NOT NULL,
    PRIMARY KEY (image_id, model_id)
) WITHOUT ROWID;
CREATE INDEX embeddings_model ON embeddings(model_id, image_id);
CREATE TABLE labels (
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    model_id TEXT NOT NULL,
    class_set TEXT NOT NULL,
    label TEXT NOT NULL,
    score REAL NOT NULL,
    rank INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX labels_set ON labels(model_id, class_set);
CREATE INDEX labels_image ON labels(image_id);
CREATE TABLE errors (
    path TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    seen_at TEXT NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta (key, value) VALUES ('generation', '0');
"""

# What a file looked like when it failed, and under which decoder settings: an unchanged bad file
# is then not read again on every run, while an edited file or a new decoder retries it.
_M002 = """
ALTER TABLE errors ADD COLUMN size INTEGER;
ALTER TABLE errors ADD COLUMN mtime_ns INTEGER;
ALTER TABLE errors ADD COLUMN settings TEXT;
"""

# A random identity: files derived from a library (its FAISS indexes) name it, so a database deleted
# and made again at the same path (same generation and ids, other vectors) never adopts them.
_M003 = """
INSERT INTO meta (key, value) VALUES ('library_id', lower(hex(randomblob(16))));
"""

# The device each scanned folder was on: a folder that is now on another device (a mount point whose
# drive is not mounted) does not lose its photos' rows (see indexer.removal_hold).
_M004 = """
CREATE TABLE folders (path TEXT PRIMARY KEY, st_dev INTEGER NOT NULL, seen_at TEXT NOT NULL);
"""

# What a photo says about itself (clipsearch.metadata), for filters and --json. A NULL
# metadata_version marks rows indexed before it was read: the next index run reads their headers.
_M005 = """
ALTER TABLE images ADD COLUMN camera_make TEXT;
ALTER TABLE images ADD COLUMN camera_model TEXT;
ALTER TABLE images ADD COLUMN lens TEXT;
ALTER TABLE images ADD COLUMN lat REAL;
ALTER TABLE images ADD COLUMN lon REAL;
ALTER TABLE images ADD COLUMN orientation INTEGER;
ALTER TABLE images ADD COLUMN file_type TEXT;
ALTER TABLE images ADD COLUMN metadata_version INTEGER;
CREATE INDEX images_taken_at ON images(taken_at);
"""

# When the photo's XMP sidecar was last changed as its metadata was read (NULL: it had none): an
# index run that finds the sidecar changed since reads the photo's metadata again.
_M006 = """
ALTER TABLE images ADD COLUMN sidecar_mtime_ns INTEGER;
"""

# Named and ordered; a migration never changes once released, new ones are appended.
MIGRATIONS: list[tuple[str, str]] = [
    ("001_initial", _M001),
    ("002_error_file_state", _M002),
    ("003_library_id", _M003),
    ("004_folder_devices", _M004),
    ("005_photo_metadata", _M005),
    ("006_sidecar_stamp", _M006),
]


@dataclass(frozen=True)
class PhotoConditions:
    """What :meth:`Library.photo_ids_where` selects on; ``None`` leaves a condition out.

    ``taken_from`` (inclusive) and ``taken_before`` (exclusive) are ISO wall-clock times
    (``2024-06-01T00:00:00``); ``camera`` is matched case-insensitively inside make or model;
    ``box`` is ``(lat_min, lat_max, lon_min, lon_max)`` (``lon_min > lon_max`` crosses the
    antimeridian); ``types`` are :mod:`clipsearch.metadata` file types; ``under`` a folder."""

    taken_from: str | None = None
    taken_before: str | None = None
    camera: str | None = None
    box: tuple[float, float, float, float] | None = None
    types: tuple[str, ...] | None = None
    under: Path | None = None


# --- paths ------------------------------------------------------------------------------------

# Paths are TEXT, which SQLite wants as valid UTF-8, but a POSIX file name is any bytes. A name that is
# not UTF-8 is stored with each byte that does not decode as one character of the last 128 code
# points of Unicode's Private Use plane 16, U+10FF80 + (byte - 0x80); a real character of that range
# is stored as its own UTF-8 bytes escaped the same way, so the mapping is one-to-one. UTF-8 names
# (all of them, in practice) are stored as they are, and the escape keeps folder prefixes, so
# "photos in this folder" matches escaped names too.
_ESCAPE_BASE = 0x10FF00  # + byte (0x80..0xFF)
_ESCAPE_LOW = _ESCAPE_BASE + 0x80


def path_text(path: str) -> str:
    """A path (Python's ``str``, with ``surrogateescape`` for undecodable bytes) as stored TEXT."""
    if path.isascii():
        return path
    out = []
    for ch in path:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as os.fsdecode gives it
            out.append(chr(_ESCAPE_BASE + code - 0xDC00))
        elif code >= _ESCAPE_LOW:  # a real character of the escape range: its bytes, escaped
            out.extend(chr(_ESCAPE_BASE + b) for b in ch.encode("utf-8"))
        else:
            out.append(ch)
    return "".join(out)


def text_path(text: str) -> str:
    """The inverse of :func:`path_text`: stored TEXT back to the path's ``str`` (exact bytes)."""
    if text.isascii() or not any(ord(ch) >= _ESCAPE_LOW for ch in text):
        return text
    raw = bytearray()
    for ch in text:
        code = ord(ch)
        raw += bytes([code - _ESCAPE_BASE]) if code >= _ESCAPE_LOW else ch.encode("utf-8")
    return os.fsdecode(bytes(raw))


def _absolute(path: Path | str) -> Path:
    """Absolute and normalised, without resolving symlinks inside the photo tree."""
    return Path(os.path.abspath(os.fspath(path)))


def _writable(path: Path) -> bool:
    """Whether this user can change the library file and make files beside it (-wal, -shm, lock)."""
    if not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)):
        return False
    try:
        return not os.statvfs(path).f_flag & os.ST_RDONLY  # root passes access() on read-only mounts
    except OSError:
        return True


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    """A connection to ``path``; read-only ones fall back to ``immutable`` on media where SQLite cannot
    make the ``-shm`` file a WAL database needs even to be read."""
    if not readonly:
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    uri = f"{path.as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as e:
        conn.close()
        if os.path.exists(f"{path}-wal") and os.path.getsize(f"{path}-wal"):
            # committed pages still in the WAL: reading without it would show an older library
            raise LibraryError(
                f"cannot open the library {path}: changes it committed are still in {path.name}-wal (it "
                "was not closed cleanly) and SQLite cannot read them where the folder is read-only; open "
                "it once where it can be written, or copy the folder, -wal file included, to one that can"
            ) from e
        log.info("library %s opened immutable (%s)", path, e)
        return sqlite3.connect(f"{uri}&immutable=1", uri=True, isolation_level=None, check_same_thread=False)


def resolve_path(path: Path | str | None = None) -> Path:
    """The library file ``path`` names, as :meth:`Library.open` opens it (absolute, its folder resolved).

    ``None`` is :func:`clipsearch.paths.default_library_path`. Two spellings of one library give the
    same result, so it can key things kept per library (the query daemon's socket).
    """
    if path is None:
        from clipsearch.paths import default_library_path

        path = default_library_path()
    path = _absolute(Path(path).expanduser())
    # The folder is resolved once so stored relative paths and scanned paths agree.
    return path.parent.resolve() / path.name if path.parent.exists() else path


# --- rows -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageRow:
    """One indexed file. ``path`` is absolute; ``stored`` is how the database keeps it (relative to
    the library's folder when under it), the key the indexer matches scanned files on."""

    id: int
    path: Path
    stored: str
    size: int
    mtime_ns: int
    content_hash: str
    width: int | None
    height: int | None
    taken_at: str | None  # when it was taken: ISO 8601 wall-clock time, with the UTC offset when known
    indexed_at: str
    # What the photo says about itself (clipsearch.metadata); None when unknown
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None
    lat: float | None = None
    lon: float | None = None
    orientation: int | None = None
    file_type: str | None = None
    sidecar_mtime_ns: int | None = None  # its XMP sidecar's mtime when its metadata was read (None: none)


@dataclass(frozen=True, slots=True)
class ModelRow:
    """A model the library was indexed with, and how many images it has embedded."""

    id: str
    source: str  # what to pass to ``load_bundle`` to get the model again
    dim: int | None
    first_used: str
    last_used: str
    embedded: int

    @property
    def name(self) -> str:
        """How a person knows this model (:func:`model_label`)."""
        return model_label(self.id, self.source)


def model_label(model_id: str, source: str | None) -> str:
    """How output names a model for a person: the registered name (``ViT-B-32/openai``) or the
    folder or file it was loaded from, as the library recorded it, never the internal
    ``file:<name>:<hex>`` id (machine output keeps the id); the id only when no source is known."""
    return source or model_id


@dataclass(frozen=True, slots=True)
class ErrorRow:
    """A file the last runs could not index (``path`` absolute)."""

    path: Path
    reason: str
    detail: str
    seen_at: str


class KnownFailure(NamedTuple):
    """The state of a file when it failed: unchanged, it is not read again (see the indexer)."""

    size: int
    mtime_ns: int
    settings: str
    reason: str


@dataclass(frozen=True, slots=True)
class LabelRow:
    """One stored zero-shot label of an image (``path`` absolute)."""

    image_id: int
    path: Path
    model_id: str
    classes: list[str]
    label: str
    score: float
    rank: int
    created_at: str


@dataclass(frozen=True, slots=True)
class LabelCount:
    """How many images have ``label`` as their top label in the class set ``classes``."""

    classes: list[str]
    label: str
    photos: int


@dataclass(frozen=True, slots=True)
class LibraryStats:
    """What ``clipsearch status`` shows: counts, models, where the library is."""

    path: Path
    root: Path
    images: int
    models: list[ModelRow]
    embedded: dict[str, int]  # model id -> images embedded with it
    errors: int
    labels: int
    class_sets: int
    generation: int


class Embeddings(NamedTuple):
    """A model's stored vectors, ordered by image id."""

    ids: np.ndarray  # int64 [N]
    paths: list[Path]  # absolute
    vectors: np.ndarray  # float32 [N, D], L2-normalised


_IMAGE_COLUMNS = (
    "id, path, size, mtime_ns, content_hash, width, height, taken_at, indexed_at, "
    "camera_make, camera_model, lens, lat, lon, orientation, file_type, sidecar_mtime_ns"
)
_CHUNK = 900  # ids per IN (...): under SQLite's default limit of 999 parameters


def _chunks(ids: Iterable[int]) -> Iterator[list[int]]:
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


def _marks(values: Sequence) -> str:
    return ",".join("?" * len(values))


class Library:
    """A photo library database. Open with :meth:`Library.open`; use as a context manager.

    Every read and write is a named method returning typed rows; nothing outside this module sees
    SQL or the connection. A write method joins the :meth:`transaction` in progress, or runs in its
    own when called outside one.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, readonly: bool):
        self.path = path
        self.root = path.parent
        self.readonly = readonly
        self._conn = conn
        self._depth = 0  # nesting of transaction(): only the outermost begins and commits
        self._lock_fd: int | None = None
        self.created = False  # made by this open (see discard_if_empty)
        self._may_create = True  # an empty file may become a library (Library.open's create)

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str | None = None, *, create: bool = False, readonly: bool = False) -> Library:
        """Open the library at ``path`` (default: ``clipsearch.paths.default_library_path()``).

        ``create`` makes a new database (0600: it lists the user's photos) when none exists;
        ``readonly`` neither creates nor migrates and refuses writes. A library this user cannot
        write (read-only media, a read-only file or folder) opens read-only by itself: queries,
        status and export work, a write says why it cannot. A SQLite file that is not a clipsearch
        library is refused before anything is written to it. Raises :class:`LibraryError` with one
        line when the file is missing, not a SQLite database, corrupt, another program's, or
        written by a newer clipsearch.
        """
        path = resolve_path(path)
        created = not path.exists()
        if path.is_dir():
            raise LibraryError(f"{path} is a folder, not a library database: pass a file path")
        if not path.exists():
            if not create or readonly:
                raise LibraryError(f"no library at {path}: run `clipsearch index PATH` first")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            except FileExistsError:
                created = False  # another process made it meanwhile
            except OSError as e:
                raise LibraryError(f"cannot create the library {path}: {e.strerror}") from e
        elif not readonly and not _writable(path):
            log.info("library %s is not writable here: opened read-only", path)
            readonly = True
        try:
            conn = _connect(path, readonly)
        except sqlite3.OperationalError as e:
            raise LibraryError(f"cannot open the library {path}: {e}") from e
        except sqlite3.DatabaseError as e:
            raise LibraryError(f"{path} is not a clipsearch library or is corrupt ({e})") from e
        lib = cls(path, conn, readonly)
        lib.created = created
        lib._may_create = create
        try:
            lib._configure()
            lib._migrate()
        except sqlite3.DatabaseError as e:
            conn.close()
            raise LibraryError(f"{path} is not a clipsearch library or is corrupt ({e})") from e
        except LibraryError:
            conn.close()
            raise
        return lib

    def _configure(self) -> None:
        c = self._conn
        c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Only reads until the file is known to be a clipsearch library (or empty): another
        # program's database is refused exactly as it was, not switched to WAL first.
        self._check_identity()
        if not self.readonly:
            mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LibraryError(
                    f"cannot put {self.path} in WAL mode (got {mode}): is it on a network drive?"
                )
            c.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a crash loses no committed batch
        c.execute("PRAGMA foreign_keys = ON")

    def _check_identity(self) -> None:
        """Refuse, by reading only, a database that is neither empty nor a clipsearch library."""
        c = self._conn
        # Reading the schema is the first access: a non-database file fails here.
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and not self._may_create:
            # A read command leaves an empty file as it found it (0 bytes: not made a library).
            raise LibraryError(
                f"no library at {self.path} (the file is empty): run `clipsearch index PATH` first"
            )
        if not tables:
            return  # a new (or empty) file: it becomes a library
        try:
            first = c.execute("SELECT name FROM migrations ORDER BY id LIMIT 1").fetchone()
        except sqlite3.DatabaseError:
            first = None
        if first is None or first[0] != MIGRATIONS[0][0]:
            raise LibraryError(
                f"{self.path} is a SQLite database but not a clipsearch library: left untouched; "
                "pass another --db"
            )

    def _migrate(self) -> None:
        c = self._conn
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        applied = self.applied_migrations() if "migrations" in tables else []
        known = [name for name, _ in MIGRATIONS]
        unknown = [name for name in applied if name not in known]
        if unknown:
            raise LibraryError(
                f"{self.path} was written by a newer clipsearch (schema {unknown[-1]}): upgrade clipsearch"
            )
        pending = [(name, sql) for name, sql in MIGRATIONS if name not in applied]
        if not pending:
            return
        if self.readonly:
            raise LibraryError(f"{self.path} needs a schema upgrade: run `clipsearch index` on it once")
        with self.transaction():
            c.execute(
                "CREATE TABLE IF NOT EXISTS migrations "
                "(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, applied_at TEXT NOT NULL)"
            )
            for name, sql in pending:
                for statement in sql.split(";"):
                    if statement.strip():
                        c.execute(statement)
                c.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (name, _now()))

    def applied_migrations(self) -> list[str]:
        """Names of the migrations this database has run, in order."""
        return [r[0] for r in self._conn.execute("SELECT name FROM migrations ORDER BY id")]

    def integrity_problems(self) -> list[str]:
        """What SQLite's integrity check finds wrong (empty when the file is sound)."""
        found = [r[0] for r in self._conn.execute("PRAGMA integrity_check")]
        return [] if found == ["ok"] else found

    # Rows whose photo is gone: what ON DELETE CASCADE removes, left by a tool that deleted images with
    # foreign keys off (the sqlite3 shell's default). Unreachable: no path leads to them.
    _ORPHAN_DELETES = (
        "DELETE FROM embeddings WHERE image_id NOT IN (SELECT id FROM images)",
        "DELETE FROM labels WHERE image_id NOT IN (SELECT id FROM images)",
    )

    def orphan_rows(self) -> int:
        """How many embeddings and labels belong to no image (see :meth:`remove_orphan_rows`)."""
        return self._conn.execute(
            "SELECT (SELECT count(*) FROM embeddings WHERE image_id NOT IN (SELECT id FROM images))"
            " + (SELECT count(*) FROM labels WHERE image_id NOT IN (SELECT id FROM images))"
        ).fetchone()[0]

    def remove_orphan_rows(self) -> int:
        """Delete the embeddings and labels of images that are gone; returns how many rows went.

        Nothing reachable is lost: these rows have no image, so no search, export or label shows them,
        but they are counted as embedded and make ``doctor`` find the FAISS index short.
        """
        n = 0
        with self.transaction():
            for statement in self._ORPHAN_DELETES:
                n += self._conn.execute(statement).rowcount
            if n:
                self._bump()
        return n

    def nonfinite_embedding_ids(self, model_id: str) -> list[int]:
        """Ids of the photos whose stored ``model_id`` vector holds NaN or infinity (a damaged model
        made them, before the indexer refused such vectors); read a row at a time."""
        import numpy as np

        rows = self._conn.execute("SELECT image_id, vector FROM embeddings WHERE model_id = ?", (model_id,))
        return [i for i, blob in rows if not np.isfinite(np.frombuffer(blob, dtype=np.float32)).all()]

    def remove_embeddings(self, model_id: str, ids: Sequence[int]) -> int:
        """Delete these photos' ``model_id`` vectors (their rows stay: the next index run embeds them
        again); returns how many went."""
        n = 0
        with self.transaction():
            for chunk in _chunks(ids):
                n += self._conn.execute(
                    f"DELETE FROM embeddings WHERE model_id = ? AND image_id IN ({_marks(chunk)})",
                    [model_id, *chunk],
                ).rowcount
            if n:
                self._bump()
        return n

    def discard_if_empty(self) -> bool:
        """Close, and delete, a library this process created that still holds no image; returns
        whether it did. A first run that fails (no photos, a model that cannot be downloaded)
        then leaves nothing behind that a later run would take for a library."""
        import shutil

        if not self.created or self._conn.execute("SELECT count(*) FROM images").fetchone()[0]:
            return False
        self.close()
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(self.path.with_name(self.path.name + ".faiss"), ignore_errors=True)
        return True

    def close(self) -> None:
        """Release the writer lock if held and close the connection."""
        self.release_writer_lock()
        self._conn.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transactions and the writer lock -----------------------------------------------------

    def _readonly_error(self) -> LibraryError:
        return LibraryError(
            f"the library {self.path} is read-only here (read-only media, or a file or folder you "
            "cannot write): queries, status and export work; to change it, copy it somewhere writable "
            "and pass --db"
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """``with library.transaction():`` the writes inside commit together or not at all.

        The outermost one runs ``BEGIN IMMEDIATE`` and commits on success, rolls back on error;
        nested ones join it. A write that SQLite refuses (a full disk, an I/O error, a lock held
        past the busy timeout) raises :class:`LibraryWriteError`; what was committed before stays.
        """
        if self.readonly:
            raise self._readonly_error()
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise LibraryWriteError(f"writing to {self.path} failed ({e})") from e
        self._depth = 1
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException as e:
            # SQLite may have rolled back already (e.g. on a full disk); a second ROLLBACK would
            # replace the real error with "no transaction is active".
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):
                raise LibraryWriteError(f"writing to {self.path} failed ({e})") from e
            raise
        finally:
            self._depth = 0

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def acquire_writer_lock(self) -> None:
        """Take the exclusive ``<db>.lock`` (non-blocking); LibraryError if another writer holds it.

        The kernel drops the lock when the process dies, even on SIGKILL, so no stale lock remains.
        """
        import fcntl

        if self._lock_fd is not None:
            return
        from clipsearch.atomic import SymlinkLockError, open_lock

        try:
            fd = open_lock(self.lock_path)
        except SymlinkLockError as e:
            raise LibraryError(f"{self.lock_path}: {e.strerror}, then run again") from None
        except OSError as e:
            raise self._write_error(e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LibraryError(
                f"another clipsearch index is running on {self.path}: wait for it to finish"
            ) from None
        self._lock_fd = fd  # the lock file stays empty: it is never written, so never clobbers

    def _write_error(self, e: OSError) -> LibraryError:
        """The one-line error for a write the library's folder refuses (read-only media, no permission)."""
        import errno

        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return self._readonly_error()
        return LibraryError(f"cannot write beside the library {self.path}: {e.strerror or e}")

    def release_writer_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """``with library.writer_lock():`` hold the exclusive writer lock for a bulk write."""
        held = self._lock_fd is not None
        self.acquire_writer_lock()
        try:
            yield
        finally:
            if not held:
                self.release_writer_lock()

    # --- paths --------------------------------------------------------------------------------

    def stored_path(self, path: Path | str) -> str:
        """How ``path`` is stored: POSIX-relative to :attr:`root` when under it, else absolute."""
        p = _absolute(path)
        try:
            text = p.relative_to(self.root).as_posix()
        except ValueError:
            text = str(p)
        return path_text(text)  # names that are not UTF-8 escaped reversibly

    def abspath(self, stored: str) -> Path:
        """A stored path as an absolute path (relative ones are under :attr:`root`).

        A ``..`` component is refused (:class:`LibraryError`): clipsearch never stores one, so the
        row was written by something else, and following it could reach outside the photo folders
        (an XMP sidecar written beside ``../../.bashrc``)."""
        if ".." in stored.split("/"):
            raise LibraryError(
                f"{self.path} holds a photo path with '..' ({text_path(stored)!r}): clipsearch never "
                "writes one, so this library was altered; index your photos into a new library"
            )
        p = Path(text_path(stored))
        return p if p.is_absolute() else self.root / p

    def _under_clause(self, under: Path | str, column: str = "path") -> tuple[str, list]:
        """SQL condition (and parameters) for ``column`` being ``under`` or inside it.

        Compared with ``=`` and ``substr`` only, so ``%``, ``_`` and ``\\`` in folder names are literal.
        """
        u = _absolute(under)
        try:
            self.root.relative_to(u)
            root_inside = True  # the whole library root is inside `under`: every relative path matches
        except ValueError:
            root_inside = False
        prefix = self.stored_path(u)
        if prefix == ".":
            root_inside = True
        parts = []
        params: list = []
        if root_inside:
            parts.append(f"substr({column}, 1, 1) != '/'")
        else:
            parts.append(f"{column} = ?")
            params.append(prefix)
        if not root_inside or u != self.root:
            sep = prefix.rstrip("/") + "/"
            parts.append(f"substr({column}, 1, ?) = ?")
            params += [len(sep), sep]
        return "(" + " OR ".join(parts) + ")", params

    # --- generation ---------------------------------------------------------------------------

    def library_id(self) -> str:
        """This library's random identity (made once, when it was created or first upgraded)."""
        return self._conn.execute("SELECT value FROM meta WHERE key = 'library_id'").fetchone()[0]

    def generation(self) -> int:
        """A counter bumped by every committed change to images or embeddings."""
        return int(self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def _bump(self) -> None:
        self._conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    # --- models -------------------------------------------------------------------------------

    def register_model(self, model_id: str, source: str, dim: int | None = None, config: dict | None = None):
        """Record that ``model_id`` (loadable again from ``source``) is used now."""
        now = _now()
        with self.transaction():
            self._conn.execute(
                "INSERT INTO models (id, source, dim, config, first_used, last_used) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET source = excluded.source, last_used = excluded.last_used, "
                "dim = coalesce(excluded.dim, models.dim), config = coalesce(excluded.config, models.config)",
                (model_id, source, dim, json.dumps(config) if config is not None else None, now, now),
            )

    def set_model_dim(self, model_id: str, dim: int) -> None:
        """Record the embedding size of ``model_id`` if it was not known when it was registered."""
        with self.transaction():
            self._conn.execute("UPDATE models SET dim = ? WHERE id = ? AND dim IS NULL", (int(dim), model_id))

    def default_model_id(self) -> str | None:
        """The model the library was last indexed with (None for an empty library)."""
        row = self._conn.execute(
            "SELECT id FROM models ORDER BY last_used DESC, rowid DESC LIMIT 1"
        ).fetchone()
        return row[0] if row else None

    def require_default_model(self) -> str:
        """:meth:`default_model_id`, or :class:`LibraryError` saying how to fill an empty library."""
        model_id = self.default_model_id()
        if model_id is None:
            raise LibraryError(
                f"the library {self.path} has no images yet: run `clipsearch index PATH` first"
            )
        return model_id

    def model_ids(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT id FROM models ORDER BY first_used, rowid")]

    def model_source(self, model_id: str) -> str:
        """What to pass to ``load_bundle`` to get ``model_id`` again."""
        row = self._conn.execute("SELECT source FROM models WHERE id = ?", (model_id,)).fetchone()
        if row is None:
            raise LibraryError(f"the library has no embeddings of model {model_id!r}: index with it first")
        return row[0]

    def model_name(self, model_id: str) -> str:
        """:func:`model_label` of ``model_id`` (its id when the library does not know it)."""
        row = self._conn.execute("SELECT source FROM models WHERE id = ?", (model_id,)).fetchone()
        return model_label(model_id, row[0] if row else None)

    def model_dim(self, model_id: str) -> int | None:
        row = self._conn.execute("SELECT dim FROM models WHERE id = ?", (model_id,)).fetchone()
        return row[0] if row else None

    def models(self) -> list[ModelRow]:
        """Every model the library was indexed with, oldest first."""
        return [
            ModelRow(m, s, d, f, last, n)
            for m, s, d, f, last, n in self._conn.execute(
                "SELECT m.id, m.source, m.dim, m.first_used, m.last_used, "
                "(SELECT count(*) FROM embeddings e WHERE e.model_id = m.id) "
                "FROM models m ORDER BY m.first_used, m.rowid"
            )
        ]

    # --- images (read) ------------------------------------------------------------------------

    def _image_row(self, r: tuple) -> ImageRow:
        return ImageRow(r[0], self.abspath(r[1]), *r[1:])

    def images(self, under: Path | str | None = None) -> list[ImageRow]:
        """Every image, ordered by id; with ``under``, only those in that subtree (matched literally)."""
        sql = f"SELECT {_IMAGE_COLUMNS} FROM images"
        params: list = []
        if under is not None:
            clause, params = self._under_clause(under)
            sql += " WHERE " + clause
        return [self._image_row(r) for r in self._conn.execute(sql + " ORDER BY id", params)]

    def image(self, image_id: int) -> ImageRow | None:
        row = self._conn.execute(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id = ?", (int(image_id),))
        found = row.fetchone()
        return None if found is None else self._image_row(found)

    def image_at(self, path: Path | str) -> ImageRow | None:
        """The row of the file at ``path`` (any spelling that resolves to it), if indexed."""
        cur = self._conn.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE path = ?", (self.stored_path(path),)
        )
        found = cur.fetchone()
        return None if found is None else self._image_row(found)

    def image_paths(self, ids: Sequence[int]) -> dict[int, Path]:
        """Absolute paths of the given image ids (unknown ids are left out)."""
        out: dict[int, Path] = {}
        for chunk in _chunks(ids):
            for i, p in self._conn.execute(
                f"SELECT id, path FROM images WHERE id IN ({_marks(chunk)})", chunk
            ):
                out[i] = self.abspath(p)
        return out

    def image_ids_under(self, under: Path | str) -> set[int]:
        """Ids of the images in the subtree ``under`` (literal match: ``%`` and ``_`` are plain)."""
        clause, params = self._under_clause(under)
        return {r[0] for r in self._conn.execute(f"SELECT id FROM images WHERE {clause}", params)}

    def has_image(self, image_id: int) -> bool:
        return (
            self._conn.execute("SELECT 1 FROM images WHERE id = ?", (int(image_id),)).fetchone() is not None
        )

    def embedded_hashes(self, model_id: str) -> set[str]:
        """Content hashes that have an embedding of ``model_id`` (their files need no model run)."""
        return {
            h
            for (h,) in self._conn.execute(
                "SELECT DISTINCT i.content_hash FROM images i JOIN embeddings e ON e.image_id = i.id "
                "WHERE e.model_id = ?",
                (model_id,),
            )
        }

    def embedded_twin(self, content_hash: str, model_id: str) -> ImageRow | None:
        """The oldest image of this content that has an embedding of ``model_id``, if any."""
        found = self._conn.execute(
            f"SELECT {', '.join('i.' + c for c in _IMAGE_COLUMNS.split(', '))} FROM images i "
            "JOIN embeddings e ON e.image_id = i.id "
            "WHERE i.content_hash = ? AND e.model_id = ? ORDER BY i.id LIMIT 1",
            (content_hash, model_id),
        ).fetchone()
        return None if found is None else self._image_row(found)

    # --- embeddings (read) --------------------------------------------------------------------

    def embeddings(
        self, model_id: str, under: Path | str | None = None, ids: Sequence[int] | None = None
    ) -> Embeddings:
        """``(ids int64 [N], absolute paths, L2-normalised float32 [N, D])`` of ``model_id``.

        ``under`` keeps a subtree (matched literally); ``ids`` keeps those image ids. Ordered by id.
        """
        import numpy as np

        sql = (
            "SELECT i.id, i.path, e.vector FROM embeddings e JOIN images i ON i.id = e.image_id "
            "WHERE e.model_id = ?"
        )
        params: list = [model_id]
        if under is not None:
            clause, p = self._under_clause(under, "i.path")
            sql += " AND " + clause
            params += p
        rows: list = []
        if ids is not None:
            for chunk in _chunks(ids):
                rows += self._conn.execute(sql + f" AND i.id IN ({_marks(chunk)})", params + chunk).fetchall()
            rows.sort(key=lambda r: r[0])
        else:
            rows = self._conn.execute(sql + " ORDER BY i.id", params).fetchall()
        dim = self.model_dim(model_id) or (len(rows[0][2]) // 4 if rows else 0)
        out_ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        blob = b"".join(r[2] for r in rows)
        if len(blob) != len(rows) * dim * 4 or any(len(r[2]) != dim * 4 for r in rows):
            raise LibraryError(
                f"{self.path} holds embeddings of {model_id!r} of the wrong size: "
                "run `clipsearch doctor` or index again with --model"
            )
        vectors = np.frombuffer(blob, dtype=np.float32).reshape(len(rows), dim).copy()  # [N, D]
        return Embeddings(out_ids, [self.abspath(r[1]) for r in rows], vectors)

    def embedding(self, image_id: int, model_id: str) -> np.ndarray | None:
        """The stored vector ``float32 [D]`` (L2-normalised) of one image, or None when it has none."""
        import numpy as np

        row = self._conn.execute(
            "SELECT vector FROM embeddings WHERE image_id = ? AND model_id = ?", (int(image_id), model_id)
        ).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32).copy()

    def has_embedding(self, image_id: int, model_id: str) -> bool:
        return (
            self._conn.execute(
                "SELECT 1 FROM embeddings WHERE image_id = ? AND model_id = ?", (int(image_id), model_id)
            ).fetchone()
            is not None
        )

    def embedding_ids(self, model_id: str) -> np.ndarray:
        """Image ids (int64, sorted) that have an embedding of ``model_id``."""
        import numpy as np

        rows = self._conn.execute(
            "SELECT image_id FROM embeddings WHERE model_id = ? ORDER BY image_id", (model_id,)
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def embedding_count(self, model_id: str) -> int:
        return self._conn.execute(
            "SELECT count(*) FROM embeddings WHERE model_id = ?", (model_id,)
        ).fetchone()[0]

    def embedding_id_range(self, model_id: str) -> tuple[int, int] | None:
        """``(lowest, highest)`` embedded image id of ``model_id``, None when it has none.

        Two probes of the ``embeddings_model`` index: SQLite answers a lone min() or max() from
        the index, both in one statement by a scan.
        """
        q = "SELECT {}(image_id) FROM embeddings WHERE model_id = ?"
        lo = self._conn.execute(q.format("min"), (model_id,)).fetchone()[0]
        if lo is None:
            return None
        hi = self._conn.execute(q.format("max"), (model_id,)).fetchone()[0]
        return int(lo), int(hi)

    # --- photo metadata and selections --------------------------------------------------------

    def images_by_id(self, ids: Sequence[int]) -> dict[int, ImageRow]:
        """``{id: ImageRow}`` of the given image ids (unknown ids are left out)."""
        out: dict[int, ImageRow] = {}
        for chunk in _chunks(ids):
            sql = f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id IN ({_marks(chunk)})"
            for r in self._conn.execute(sql, chunk):
                out[r[0]] = self._image_row(r)
        return out

    def image_ids_with_hash(self, content_hash: str) -> list[int]:
        """Ids of the photos with this content hash (copies of one file), oldest first."""
        sql = "SELECT id FROM images WHERE content_hash = ? ORDER BY id"
        return [r[0] for r in self._conn.execute(sql, (content_hash,))]

    def identical_groups(self) -> list[list[int]]:
        """Ids of byte-identical photos (same content hash), groups of two or more, by lowest id."""
        rows = self._conn.execute(
            "SELECT group_concat(id) FROM (SELECT id, content_hash FROM images ORDER BY id) "
            "GROUP BY content_hash HAVING count(*) > 1 ORDER BY min(id)"
        )
        return [[int(i) for i in r[0].split(",")] for r in rows]

    def photo_ids_where(self, cond: PhotoConditions) -> list[tuple[int, float | None, float | None]]:
        """``(id, lat, lon)`` of the photos meeting every condition in ``cond`` (see
        :class:`PhotoConditions`); a photo whose field is unknown meets no condition on it."""
        where: list[str] = []
        params: list = []
        if cond.taken_from is not None:
            where.append("taken_at >= ?")  # ISO strings: the wall-clock prefix orders them
            params.append(cond.taken_from)
        if cond.taken_before is not None:
            where.append("taken_at < ?")
            params.append(cond.taken_before)
        if cond.camera is not None:
            where.append("(instr(lower(camera_make), ?) > 0 OR instr(lower(camera_model), ?) > 0)")
            params += [cond.camera.lower(), cond.camera.lower()]
        if cond.box is not None:
            lat_min, lat_max, lon_min, lon_max = cond.box
            where.append("lat BETWEEN ? AND ?")
            params += [lat_min, lat_max]
            if lon_min <= lon_max:
                where.append("lon BETWEEN ? AND ?")
            else:
                where.append("(lon >= ? OR lon <= ?)")
            params += [lon_min, lon_max]
        if cond.types is not None:
            where.append(f"file_type IN ({','.join('?' * len(cond.types))})")
            params += list(cond.types)
        if cond.under is not None:
            clause, p = self._under_clause(cond.under)
            where.append(clause)
            params += p
        sql = "SELECT id, lat, lon FROM images" + (" WHERE " + " AND ".join(where) if where else "")
        return [(r[0], r[1], r[2]) for r in self._conn.execute(sql, params)]

    def mark_metadata_stale(self, ids: Iterable[int]) -> None:
        """Have the next :func:`clipsearch.indexer.refresh_metadata` read these photos' metadata again."""
        with self.transaction():
            for chunk in _chunks(ids):
                self._conn.execute(
                    f"UPDATE images SET metadata_version = NULL WHERE id IN ({_marks(chunk)})", chunk
                )

    def note_own_sidecar_writes(self, stamps: Iterable[tuple[int, int | None, int | None]]) -> int:
        """After clipsearch itself wrote sidecars (``label --write-xmp``): for each ``(image id, the
        photo's sidecar stamp before the write, after it)``, store the new stamp where the metadata
        was read at the old one, so the next index run does not read the headers again for its own
        keywords. A photo whose sidecar another program changed since it was read keeps its old stamp
        (the next run reads it). Returns how many rows changed."""
        changed = 0
        with self.transaction():
            for image_id, before, after in stamps:
                changed += self._conn.execute(
                    "UPDATE images SET sidecar_mtime_ns = ? WHERE id = ? AND sidecar_mtime_ns IS ? "
                    "AND metadata_version IS NOT NULL",
                    (after, int(image_id), before),
                ).rowcount
        return changed

    def metadata_stale_ids(self, version: int) -> set[int]:
        """Ids of photos whose metadata was read by an extractor older than ``version`` (or never)."""
        sql = "SELECT id FROM images WHERE metadata_version IS NULL OR metadata_version < ?"
        return {r[0] for r in self._conn.execute(sql, (int(version),))}

    def set_metadata(self, image_id: int, meta, version: int) -> None:
        """Store ``meta`` (a :class:`clipsearch.metadata.PhotoMetadata`) for one photo, read by
        extractor ``version``. Width, height and date are kept when ``meta`` does not know them."""
        with self.transaction():
            self._conn.execute(
                "UPDATE images SET width = coalesce(?, width), height = coalesce(?, height), "
                "taken_at = coalesce(?, taken_at), camera_make = ?, camera_model = ?, lens = ?, lat = ?, "
                "lon = ?, orientation = ?, file_type = ?, sidecar_mtime_ns = ?, metadata_version = ? WHERE id = ?",
                (
                    meta.width,
                    meta.height,
                    meta.taken_at,
                    meta.make,
                    meta.model,
                    meta.lens,
                    meta.lat,
                    meta.lon,
                    meta.orientation,
                    meta.file_type,
                    meta.sidecar_mtime_ns,
                    int(version),
                    int(image_id),
                ),
            )

    def copy_metadata(self, from_id: int, to_id: int) -> None:
        """Give photo ``to_id`` the metadata of ``from_id`` (a byte-identical copy)."""
        with self.transaction():
            self._conn.execute(
                "UPDATE images SET (width, height, taken_at, camera_make, camera_model, lens, lat, lon, "
                "orientation, file_type, metadata_version) = (SELECT width, height, taken_at, camera_make, "
                "camera_model, lens, lat, lon, orientation, file_type, metadata_version FROM images WHERE id = ?), "
                "sidecar_mtime_ns = NULL WHERE id = ?",  # its own sidecar, if any, is read by the next run
                (int(from_id), int(to_id)),
            )

    # --- images and embeddings (write; used by the indexer) -----------------------------------

    def add_image(
        self,
        path: Path | str,
        *,
        size: int,
        mtime_ns: int,
        content_hash: str,
        width: int | None = None,
        height: int | None = None,
        taken_at: str | None = None,
    ) -> int:
        """Insert (or replace, dropping its old embeddings and labels) the row for ``path``; clears
        its recorded error. Returns the new image id."""
        stored = self.stored_path(path)
        with self.transaction():
            self._delete_where("path = ?", [stored])
            cur = self._conn.execute(
                "INSERT INTO images (path, size, mtime_ns, content_hash, width, height, taken_at, indexed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (stored, size, mtime_ns, content_hash, width, height, taken_at, _now()),
            )
            self._conn.execute("DELETE FROM errors WHERE path = ?", (stored,))
            self._bump()
        return int(cur.lastrowid)

    def put_embedding(self, image_id: int, model_id: str, vector: np.ndarray) -> None:
        """Store one vector (float32, L2-normalised by the caller)."""
        import numpy as np

        blob = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        with self.transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO embeddings (image_id, model_id, vector) VALUES (?, ?, ?)",
                (int(image_id), model_id, blob),
            )
            self._bump()

    def copy_embeddings(self, from_id: int, to_id: int) -> int:
        """Give image ``to_id`` every embedding of ``from_id`` (a duplicate file); returns how many."""
        with self.transaction():
            cur = self._conn.execute(
                "INSERT OR REPLACE INTO embeddings (image_id, model_id, vector) "
                "SELECT ?, model_id, vector FROM embeddings WHERE image_id = ?",
                (int(to_id), int(from_id)),
            )
            self._bump()
        return cur.rowcount

    def move_image(self, image_id: int, new_path: Path | str, size: int, mtime_ns: int) -> None:
        """A file was moved or renamed: keep its id, embeddings and labels, change its path."""
        stored = self.stored_path(new_path)
        with self.transaction():
            self._delete_where("path = ? AND id != ?", [stored, int(image_id)])
            self._conn.execute(
                "UPDATE images SET path = ?, size = ?, mtime_ns = ? WHERE id = ?",
                (stored, size, mtime_ns, int(image_id)),
            )
            self._conn.execute("DELETE FROM errors WHERE path = ?", (stored,))
            self._bump()

    def touch_image(self, image_id: int, size: int, mtime_ns: int) -> None:
        """Same content, new size/mtime record (e.g. the file was copied over itself)."""
        with self.transaction():
            self._conn.execute(
                "UPDATE images SET size = ?, mtime_ns = ? WHERE id = ?", (size, mtime_ns, int(image_id))
            )

    def remove_images(self, ids: Iterable[int]) -> int:
        """Delete images with their embeddings and labels; returns how many rows went."""
        n = 0
        with self.transaction():
            for chunk in _chunks(ids):
                n += self._delete_where(f"id IN ({_marks(chunk)})", chunk)
        return n

    def _delete_where(self, where: str, params: list) -> int:
        c = self._conn
        ids = [r[0] for r in c.execute(f"SELECT id FROM images WHERE {where}", params)]
        if not ids:
            return 0
        for chunk in _chunks(ids):
            marks = _marks(chunk)
            c.execute(f"DELETE FROM labels WHERE image_id IN ({marks})", chunk)
            c.execute(f"DELETE FROM embeddings WHERE image_id IN ({marks})", chunk)
            c.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)
        self._bump()
        return len(ids)

    # --- scanned folders ----------------------------------------------------------------------

    def folder_device(self, folder: Path | str) -> int | None:
        """The ``st_dev`` ``folder`` was on at the last run that removed its vanished photos freely
        (see ``indexer.removal_hold``), or None if never recorded."""
        row = self._conn.execute(
            "SELECT st_dev FROM folders WHERE path = ?", (self.stored_path(folder),)
        ).fetchone()
        return row[0] if row else None

    def record_folder_device(self, folder: Path | str, st_dev: int) -> None:
        """Remember the device ``folder`` is on now."""
        with self.transaction():
            self._conn.execute(
                "INSERT INTO folders (path, st_dev, seen_at) VALUES (?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET st_dev = excluded.st_dev, seen_at = excluded.seen_at",
                (self.stored_path(folder), int(st_dev), _now()),
            )

    # --- errors -------------------------------------------------------------------------------

    def record_error(
        self,
        path: Path | str,
        reason: str,
        detail: str = "",
        *,
        size: int | None = None,
        mtime_ns: int | None = None,
        settings: str | None = None,
    ) -> None:
        """Remember that ``path`` could not be indexed (replaces an older error for it).

        ``size``/``mtime_ns``/``settings`` (when the file could be examined) let the next run skip
        it unread while nothing about it has changed (see :meth:`known_failures`)."""
        with self.transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO errors (path, reason, detail, seen_at, size, mtime_ns, settings) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.stored_path(path), reason, detail, _now(), size, mtime_ns, settings),
            )

    def known_failures(self) -> dict[str, KnownFailure]:
        """``{stored path: KnownFailure}`` of the failures recorded with their file's state."""
        return {
            p: KnownFailure(s, m, st, r)
            for p, s, m, st, r in self._conn.execute(
                "SELECT path, size, mtime_ns, settings, reason FROM errors WHERE size IS NOT NULL"
            )
        }

    def clear_errors(self, paths: Iterable[Path | str]) -> None:
        with self.transaction():
            for p in paths:
                self._conn.execute("DELETE FROM errors WHERE path = ?", (self.stored_path(p),))

    def clear_errors_where(self, keep: Callable[[Path], bool]) -> int:
        """Delete errors whose absolute path fails ``keep`` (e.g. files gone from a scanned tree)."""
        with self.transaction():
            gone = [p for (p,) in self._conn.execute("SELECT path FROM errors") if not keep(self.abspath(p))]
            for p in gone:
                self._conn.execute("DELETE FROM errors WHERE path = ?", (p,))
        return len(gone)

    def errors(self, limit: int | None = None) -> list[ErrorRow]:
        """Files that could not be indexed, newest first."""
        sql = "SELECT path, reason, detail, seen_at FROM errors ORDER BY seen_at DESC, path"
        params: list = []
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [ErrorRow(self.abspath(p), r, d, s) for p, r, d, s in self._conn.execute(sql, params)]

    # --- labels -------------------------------------------------------------------------------

    @staticmethod
    def class_set_key(classes: Sequence[str]) -> str:
        """The key of a class set: the sorted class list as JSON (order given does not matter)."""
        return json.dumps(sorted(classes), ensure_ascii=False)

    def replace_labels(
        self, model_id: str, classes: Sequence[str], rows: Iterable[tuple[int, str, float, int]]
    ) -> int:
        """Replace every label of this class set and model by ``rows`` ``(image_id, label, score,
        rank)``, in one transaction, so stale labels never linger. Rows of images no longer in the
        library are skipped. Returns the rows written."""
        key = self.class_set_key(classes)
        now = _now()
        with self.transaction():
            self._conn.execute("DELETE FROM labels WHERE model_id = ? AND class_set = ?", (model_id, key))
            cur = self._conn.executemany(
                "INSERT INTO labels (image_id, model_id, class_set, label, score, rank, created_at) "
                "SELECT ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM images WHERE id = ?)",
                (
                    (int(i), model_id, key, str(label), float(score), int(rank), now, int(i))
                    for i, label, score, rank in rows
                ),
            )
        return cur.rowcount

    def labels(
        self, model_id: str | None = None, classes: Sequence[str] | None = None, image_id: int | None = None
    ) -> list[LabelRow]:
        """Stored labels, by image then rank; optionally of one model, one class set, one image."""
        sql = (
            "SELECT l.image_id, i.path, l.model_id, l.class_set, l.label, l.score, l.rank, l.created_at "
            "FROM labels l JOIN images i ON i.id = l.image_id WHERE 1 = 1"
        )
        params: list = []
        if model_id is not None:
            sql += " AND l.model_id = ?"
            params.append(model_id)
        if classes is not None:
            sql += " AND l.class_set = ?"
            params.append(self.class_set_key(classes))
        if image_id is not None:
            sql += " AND l.image_id = ?"
            params.append(int(image_id))
        sql += " ORDER BY l.image_id, l.rank"
        return [
            LabelRow(i, self.abspath(p), m, json.loads(cs), lab, s, r, t)
            for i, p, m, cs, lab, s, r, t in self._conn.execute(sql, params)
        ]

    def top_label_counts(self, model_id: str) -> list[LabelCount]:
        """Per class set, each label with the number of images whose top label (rank 1) it is."""
        rows = self._conn.execute(
            "SELECT class_set, label, count(*) FROM labels WHERE model_id = ? AND rank = 1 "
            "GROUP BY class_set, label ORDER BY class_set, count(*) DESC, label",
            (model_id,),
        )
        return [LabelCount(json.loads(cs), label, n) for cs, label, n in rows]

    def top_labelled(self, model_id: str, label: str, limit: int, offset: int = 0) -> list[tuple[int, float]]:
        """``(image_id, score)`` of images whose top label is ``label`` (in any class set), most
        confident first; an image with it in two class sets comes once, with its higher score."""
        rows = self._conn.execute(
            "SELECT image_id, max(score) AS best FROM labels WHERE model_id = ? AND label = ? AND rank = 1 "
            "GROUP BY image_id ORDER BY best DESC, image_id LIMIT ? OFFSET ?",
            (model_id, label, int(limit), int(offset)),
        )
        return [(int(i), float(s)) for i, s in rows]

    # --- summary ------------------------------------------------------------------------------

    def stats(self) -> LibraryStats:
        """Counts of images, errors, labels and class sets, and the models with their counts."""
        q = self._conn.execute
        models = self.models()
        return LibraryStats(
            path=self.path,
            root=self.root,
            images=q("SELECT count(*) FROM images").fetchone()[0],
            models=models,
            embedded={m.id: m.embedded for m in models},
            errors=q("SELECT count(*) FROM errors").fetchone()[0],
            labels=q("SELECT count(*) FROM labels").fetchone()[0],
            class_sets=q("SELECT count(DISTINCT class_set) FROM labels").fetchone()[0],
            generation=self.generation(),
        )


# --- small SQLite files beside a model's text export ------------------------------------------


class TextFeatureCache:
    """Text features by exact text, in a small SQLite file of their own (one per text export).

    Only speed depends on it: a cache that cannot be read or written is logged and ignored.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        # It holds what the user searched for: private (0600), made so before SQLite opens it.
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            pass
        conn = sqlite3.connect(self.path, timeout=2)
        conn.execute("CREATE TABLE IF NOT EXISTS features (text TEXT PRIMARY KEY, vector BLOB NOT NULL)")
        return conn

    def get(self, texts: Iterable[str]) -> dict[str, bytes]:
        """``{text: float32 bytes}`` of the texts found."""
        if not self.path.is_file():
            return {}
        found = {}
        try:
            with contextlib.closing(self._connect()) as conn:
                for text in set(texts):
                    row = conn.execute("SELECT vector FROM features WHERE text = ?", (text,)).fetchone()
                    if row is not None:
                        found[text] = row[0]
        except (sqlite3.Error, OSError) as e:
            log.info("text cache %s unreadable (%s): encoding every text", self.path, e)
            return {}
        return found

    def put(self, items: dict[str, bytes]) -> None:
        try:
            with contextlib.closing(self._connect()) as conn, conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO features (text, vector) VALUES (?, ?)", list(items.items())
                )
        except (sqlite3.Error, OSError) as e:  # read-only or busy: only the next query's speed suffers
            log.info("text cache %s not written (%s)", self.path, e)


class BpeTable:
    """A BPE's vocabulary and merge ranks as a SQLite file, read a row at a time (see
    :class:`clipsearch.tokenizer_table.TableTokenizer`). Raises ``ValueError`` for a file that is not one."""

    def __init__(self, path: Path):
        try:
            # immutable: the file is replaced, never changed in place, so SQLite need not lock it
            self._conn = sqlite3.connect(
                f"{Path(path).resolve().as_uri()}?immutable=1", uri=True, check_same_thread=False
            )
            self.meta = {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM meta")}
        except sqlite3.Error as e:
            raise ValueError(f"{path} is not a tokenizer table: {e}") from e

    @staticmethod
    def write(
        path: Path, meta: dict, vocab: Iterable[tuple[str, int]], merges: Iterable[tuple[str, str]]
    ) -> None:
        """Write a new table at ``path`` (a fresh file: the caller renames it into place)."""
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("CREATE TABLE vocab (token TEXT PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID")
            conn.execute(
                "CREATE TABLE merges (a TEXT NOT NULL, b TEXT NOT NULL, rank INTEGER NOT NULL, "
                "PRIMARY KEY (a, b)) WITHOUT ROWID"
            )
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            conn.executemany("INSERT INTO vocab VALUES (?, ?)", vocab)
            # a pair listed twice keeps its first (lowest) rank, as the Rust BPE does
            conn.executemany(
                "INSERT OR IGNORE INTO merges VALUES (?, ?, ?)",
                ((a, b, r) for r, (a, b) in enumerate(merges)),
            )
        conn.close()

    def rank(self, a: str, b: str) -> int | None:
        """The merge rank of the pair ``(a, b)``, None when they never merge."""
        row = self._conn.execute("SELECT rank FROM merges WHERE a = ? AND b = ?", (a, b)).fetchone()
        return None if row is None else row[0]

    def token_id(self, token: str) -> int | None:
        row = self._conn.execute("SELECT id FROM vocab WHERE token = ?", (token,)).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        self._conn.close()
