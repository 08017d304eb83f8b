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
import functools
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from clipsearch.errors import LibraryError

if TYPE_CHECKING:  # numpy is imported where vectors are read or written: a query client needs none
    import numpy as np

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

# Named and ordered; a migration never changes once released, new ones are appended.
MIGRATIONS: list[tuple[str, str]] = [
    ("001_initial", _M001),
    ("002_error_file_state", _M002),
    ("003_library_id", _M003),
]


# --- paths ------------------------------------------------------------------------------------


def _absolute(path: Path | str) -> Path:
    """Absolute and normalised, without resolving symlinks inside the photo tree."""
    return Path(os.path.abspath(os.fspath(path)))


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


class Library:
    """A photo library database. Open with :meth:`Library.open`; use as a context manager."""

    def __init__(self, path: Path, conn: sqlite3.Connection, readonly: bool):
        self.path = path
        self.root = path.parent
        self.readonly = readonly
        self.conn = conn
        self._lock_fd: int | None = None

    @functools.cached_property
    def db(self):
        """The connection as a ``sqlite_utils.Database``, for ad-hoc inspection.

        Made on first use: importing sqlite-utils costs ~0.07 s, a seventh of a query's budget.
        """
        import sqlite_utils

        return sqlite_utils.Database(self.conn)

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str | None = None, *, create: bool = False, readonly: bool = False) -> Library:
        """Open the library at ``path`` (default: ``clipsearch.paths.default_library_path()``).

        ``create`` makes a new database when none exists; ``readonly`` neither creates nor migrates
        and refuses writes. Raises :class:`LibraryError` with one line when the file is missing,
        not a SQLite database, corrupt, or written by a newer clipsearch.
        """
        path = resolve_path(path)
        if path.is_dir():
            raise LibraryError(f"{path} is a folder, not a library database: pass a file path")
        if not path.exists():
            if not create or readonly:
                raise LibraryError(f"no library at {path}: run `clipsearch index PATH` first")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LibraryError(f"cannot create the library folder {path.parent}: {e.strerror}") from e
        try:
            if readonly:
                conn = sqlite3.connect(
                    f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
                )
            else:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise LibraryError(f"cannot open the library {path}: {e}") from e
        lib = cls(path, conn, readonly)
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
        c = self.conn
        c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Reading the schema is the first access: a non-database file fails here.
        c.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if not self.readonly:
            mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LibraryError(
                    f"cannot put {self.path} in WAL mode (got {mode}): is it on a network drive?"
                )
            c.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a crash loses no committed batch
        c.execute("PRAGMA foreign_keys = ON")

    def _migrate(self) -> None:
        c = self.conn
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "migrations" not in tables:
            raise LibraryError(f"{self.path} is a SQLite database but not a clipsearch library")
        applied: list[str] = []
        if "migrations" in tables:
            applied = [r[0] for r in c.execute("SELECT name FROM migrations ORDER BY id")]
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

    def close(self) -> None:
        """Release the writer lock if held and close the connection."""
        self.release_writer_lock()
        self.conn.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transactions and the writer lock -----------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): committed on success, rolled back on error."""
        if self.readonly:
            raise LibraryError(f"{self.path} was opened read-only")
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (e.g. on a full disk); a second ROLLBACK would
            # replace the real error with "no transaction is active".
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

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
            return LibraryError(
                f"the library {self.path} is read-only here ({e.strerror}): queries, status and export "
                "work; to index, copy it to a writable folder or pass --db"
            )
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
        # Names that are not UTF-8 (possible on Linux) are kept readable rather than failing SQLite.
        return os.fsencode(text).decode("utf-8", "backslashreplace")

    def abspath(self, stored: str) -> Path:
        """A stored path as an absolute path (relative ones are under :attr:`root`)."""
        p = Path(stored)
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
        return self.conn.execute("SELECT value FROM meta WHERE key = 'library_id'").fetchone()[0]

    def generation(self) -> int:
        """A counter bumped by every committed change to images or embeddings."""
        return int(self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def _bump(self) -> None:
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    # --- models -------------------------------------------------------------------------------

    def register_model(self, model_id: str, source: str, dim: int | None = None, config: dict | None = None):
        """Record that ``model_id`` (loadable again from ``source``) is used now."""
        now = _now()
        with self.transaction() as c:
            c.execute(
                "INSERT INTO models (id, source, dim, config, first_used, last_used) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET source = excluded.source, last_used = excluded.last_used, "
                "dim = coalesce(excluded.dim, models.dim), config = coalesce(excluded.config, models.config)",
                (model_id, source, dim, json.dumps(config) if config is not None else None, now, now),
            )

    def default_model_id(self) -> str | None:
        """The model the library was last indexed with (None for an empty library)."""
        row = self.conn.execute(
            "SELECT id FROM models ORDER BY last_used DESC, rowid DESC LIMIT 1"
        ).fetchone()
        return row[0] if row else None

    def model_ids(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT id FROM models ORDER BY first_used, rowid")]

    def model_source(self, model_id: str) -> str:
        """What to pass to ``load_bundle`` to get ``model_id`` again."""
        row = self.conn.execute("SELECT source FROM models WHERE id = ?", (model_id,)).fetchone()
        if row is None:
            raise LibraryError(f"the library has no embeddings of model {model_id!r}: index with it first")
        return row[0]

    def model_dim(self, model_id: str) -> int | None:
        row = self.conn.execute("SELECT dim FROM models WHERE id = ?", (model_id,)).fetchone()
        return row[0] if row else None

    # --- images and embeddings (read) ---------------------------------------------------------

    def embeddings(
        self, model_id: str, under: Path | str | None = None, ids: Sequence[int] | None = None
    ) -> tuple[np.ndarray, list[Path], np.ndarray]:
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
            ids = [int(i) for i in ids]
            for start in range(0, len(ids), 900):  # stay under SQLite's parameter limit
                chunk = ids[start : start + 900]
                marks = ",".join("?" * len(chunk))
                rows += self.conn.execute(sql + f" AND i.id IN ({marks})", params + chunk).fetchall()
            rows.sort(key=lambda r: r[0])
        else:
            rows = self.conn.execute(sql + " ORDER BY i.id", params).fetchall()
        dim = self.model_dim(model_id) or (len(rows[0][2]) // 4 if rows else 0)
        out_ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        blob = b"".join(r[2] for r in rows)
        if len(blob) != len(rows) * dim * 4 or any(len(r[2]) != dim * 4 for r in rows):
            raise LibraryError(
                f"{self.path} holds embeddings of {model_id!r} of the wrong size: "
                "run `clipsearch doctor` or index again with --model"
            )
        vectors = np.frombuffer(blob, dtype=np.float32).reshape(len(rows), dim).copy()  # [N, D]
        return out_ids, [self.abspath(r[1]) for r in rows], vectors

    def embedding_ids(self, model_id: str) -> np.ndarray:
        """Image ids (int64, sorted) that have an embedding of ``model_id``."""
        import numpy as np

        rows = self.conn.execute(
            "SELECT image_id FROM embeddings WHERE model_id = ? ORDER BY image_id", (model_id,)
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def embedding_count(self, model_id: str) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM embeddings WHERE model_id = ?", (model_id,)
        ).fetchone()[0]

    def image_paths(self, ids: Sequence[int]) -> dict[int, Path]:
        """Absolute paths of the given image ids (unknown ids are left out)."""
        out: dict[int, Path] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for i, p in self.conn.execute(f"SELECT id, path FROM images WHERE id IN ({marks})", chunk):
                out[i] = self.abspath(p)
        return out

    def image_ids_under(self, under: Path | str) -> set[int]:
        """Ids of the images in the subtree ``under`` (literal match: ``%`` and ``_`` are plain)."""
        clause, params = self._under_clause(under)
        return {r[0] for r in self.conn.execute(f"SELECT id FROM images WHERE {clause}", params)}

    def images(self, under: Path | str | None = None) -> list[dict]:
        """Every image row (absolute ``path``), optionally only those in a subtree."""
        sql = "SELECT id, path, size, mtime_ns, content_hash, width, height, taken_at, indexed_at FROM images"
        params: list = []
        if under is not None:
            clause, params = self._under_clause(under)
            sql += " WHERE " + clause
        cur = self.conn.execute(sql + " ORDER BY id", params)
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur]
        for r in rows:
            r["path"] = self.abspath(r["path"])
        return rows

    # --- images and embeddings (write; used by the indexer) -----------------------------------

    def add_image(
        self,
        c: sqlite3.Connection,
        path: Path | str,
        *,
        size: int,
        mtime_ns: int,
        content_hash: str,
        width: int | None = None,
        height: int | None = None,
        taken_at: str | None = None,
    ) -> int:
        """Insert (or replace, dropping its old embeddings and labels) the row for ``path``; inside
        a :meth:`transaction` (pass its connection ``c``). Returns the new image id."""
        stored = self.stored_path(path)
        self._delete_where(c, "path = ?", [stored])
        cur = c.execute(
            "INSERT INTO images (path, size, mtime_ns, content_hash, width, height, taken_at, indexed_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (stored, size, mtime_ns, content_hash, width, height, taken_at, _now()),
        )
        c.execute("DELETE FROM errors WHERE path = ?", (stored,))
        self._bump()
        return int(cur.lastrowid)

    def put_embedding(self, c: sqlite3.Connection, image_id: int, model_id: str, vector: np.ndarray) -> None:
        """Store one vector (float32, L2-normalised by the caller) inside a transaction."""
        import numpy as np

        blob = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        c.execute(
            "INSERT OR REPLACE INTO embeddings (image_id, model_id, vector) VALUES (?, ?, ?)",
            (int(image_id), model_id, blob),
        )
        self._bump()

    def embedding_blob(self, image_id: int, model_id: str) -> bytes | None:
        row = self.conn.execute(
            "SELECT vector FROM embeddings WHERE image_id = ? AND model_id = ?", (int(image_id), model_id)
        ).fetchone()
        return row[0] if row else None

    def copy_embeddings(self, c: sqlite3.Connection, from_id: int, to_id: int) -> int:
        """Give image ``to_id`` every embedding of ``from_id`` (a duplicate file); returns how many."""
        cur = c.execute(
            "INSERT OR REPLACE INTO embeddings (image_id, model_id, vector) "
            "SELECT ?, model_id, vector FROM embeddings WHERE image_id = ?",
            (int(to_id), int(from_id)),
        )
        self._bump()
        return cur.rowcount

    def move_image(
        self, c: sqlite3.Connection, image_id: int, new_path: Path | str, size: int, mtime_ns: int
    ):
        """A file was moved or renamed: keep its id, embeddings and labels, change its path."""
        stored = self.stored_path(new_path)
        self._delete_where(c, "path = ? AND id != ?", [stored, int(image_id)])
        c.execute(
            "UPDATE images SET path = ?, size = ?, mtime_ns = ? WHERE id = ?",
            (stored, size, mtime_ns, int(image_id)),
        )
        c.execute("DELETE FROM errors WHERE path = ?", (stored,))
        self._bump()

    def touch_image(self, c: sqlite3.Connection, image_id: int, size: int, mtime_ns: int) -> None:
        """Same content, new size/mtime record (e.g. the file was copied over itself)."""
        c.execute("UPDATE images SET size = ?, mtime_ns = ? WHERE id = ?", (size, mtime_ns, int(image_id)))

    def remove_images(self, c: sqlite3.Connection, ids: Iterable[int]) -> int:
        """Delete images with their embeddings and labels; returns how many rows went."""
        ids = [int(i) for i in ids]
        n = 0
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            n += self._delete_where(c, f"id IN ({','.join('?' * len(chunk))})", chunk)
        return n

    def _delete_where(self, c: sqlite3.Connection, where: str, params: list) -> int:
        ids = [r[0] for r in c.execute(f"SELECT id FROM images WHERE {where}", params)]
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        c.execute(f"DELETE FROM labels WHERE image_id IN ({marks})", ids)
        c.execute(f"DELETE FROM embeddings WHERE image_id IN ({marks})", ids)
        c.execute(f"DELETE FROM images WHERE id IN ({marks})", ids)
        self._bump()
        return len(ids)

    # --- errors -------------------------------------------------------------------------------

    def record_error(
        self,
        c: sqlite3.Connection,
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
        c.execute(
            "INSERT OR REPLACE INTO errors (path, reason, detail, seen_at, size, mtime_ns, settings) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (self.stored_path(path), reason, detail, _now(), size, mtime_ns, settings),
        )

    def known_failures(self) -> dict[str, tuple[int, int, str, str]]:
        """``{stored path: (size, mtime_ns, settings, reason)}`` of failures recorded with file state."""
        return {
            p: (s, m, st, r)
            for p, s, m, st, r in self.conn.execute(
                "SELECT path, size, mtime_ns, settings, reason FROM errors WHERE size IS NOT NULL"
            )
        }

    def clear_errors(self, c: sqlite3.Connection, paths: Iterable[Path | str]) -> None:
        for p in paths:
            c.execute("DELETE FROM errors WHERE path = ?", (self.stored_path(p),))

    def clear_errors_where(self, c: sqlite3.Connection, keep: Callable[[Path], bool]) -> int:
        """Delete errors whose absolute path fails ``keep`` (e.g. files gone from a scanned tree)."""
        gone = [p for (p,) in c.execute("SELECT path FROM errors") if not keep(self.abspath(p))]
        for p in gone:
            c.execute("DELETE FROM errors WHERE path = ?", (p,))
        return len(gone)

    def errors(self, limit: int | None = None) -> list[dict]:
        """Files that could not be indexed, newest first: ``{path, reason, detail, seen_at}``."""
        sql = "SELECT path, reason, detail, seen_at FROM errors ORDER BY seen_at DESC, path"
        params: list = []
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [
            {"path": self.abspath(p), "reason": r, "detail": d, "seen_at": s}
            for p, r, d, s in self.conn.execute(sql, params)
        ]

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
        with self.transaction() as c:
            c.execute("DELETE FROM labels WHERE model_id = ? AND class_set = ?", (model_id, key))
            cur = c.executemany(
                "INSERT INTO labels (image_id, model_id, class_set, label, score, rank, created_at) "
                "SELECT ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM images WHERE id = ?)",
                (
                    (int(i), model_id, key, str(label), float(score), int(rank), now, int(i))
                    for i, label, score, rank in rows
                ),
            )
            return cur.rowcount

    def labels(self, model_id: str | None = None, classes: Sequence[str] | None = None) -> list[dict]:
        """Stored labels: ``{image_id, path, model_id, classes, label, score, rank, created_at}``."""
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
        sql += " ORDER BY l.image_id, l.rank"
        return [
            {
                "image_id": i,
                "path": self.abspath(p),
                "model_id": m,
                "classes": json.loads(cs),
                "label": lab,
                "score": s,
                "rank": r,
                "created_at": t,
            }
            for i, p, m, cs, lab, s, r, t in self.conn.execute(sql, params)
        ]

    # --- summary ------------------------------------------------------------------------------

    def stats(self) -> dict:
        """``{path, root, images, models: [{id, source, dim, embedded, first_used, last_used}],
        errors, labels, generation}``."""
        q = self.conn.execute
        models = [
            {"id": m, "source": s, "dim": d, "embedded": n, "first_used": f, "last_used": last}
            for m, s, d, f, last, n in q(
                "SELECT m.id, m.source, m.dim, m.first_used, m.last_used, "
                "(SELECT count(*) FROM embeddings e WHERE e.model_id = m.id) "
                "FROM models m ORDER BY m.first_used, m.rowid"
            )
        ]
        return {
            "path": self.path,
            "root": self.root,
            "images": q("SELECT count(*) FROM images").fetchone()[0],
            "models": models,
            "embedded": {m["id"]: m["embedded"] for m in models},
            "errors": q("SELECT count(*) FROM errors").fetchone()[0],
            "labels": q("SELECT count(*) FROM labels").fetchone()[0],
            "class_sets": q("SELECT count(DISTINCT class_set) FROM labels").fetchone()[0],
            "generation": self.generation(),
        }
