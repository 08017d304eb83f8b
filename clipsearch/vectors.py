"""The FAISS index: derived from the library, keyed by image ids, rebuildable at any time.

One index per model lives in ``<db>.faiss/<model-slug>.index`` with a JSON sidecar recording the
SQLite state it reflects (the library's ``generation``, the vector count and a checksum of the ids).

- ``kind="flat"``: exact inner product (vectors are L2-normalised, so it is cosine similarity).
- ``kind="hnsw"``: HNSW graph (M=32), for large libraries; ``auto`` picks it from
  ``HNSW_THRESHOLD`` vectors up. HNSW cannot delete, so removed ids become *tombstones* kept in the
  sidecar and filtered out at search time; when tombstones pass ``REBUILD_FRACTION`` of the index,
  it is rebuilt from SQLite.
- On open, an index in step with SQLite is memory-mapped read-only. One out of step is brought up to
  date by adding and removing the ids that differ (image ids are never reused, and a changed file
  gets a new id, so the id sets say everything); an index that cannot be trusted (unreadable, of
  another kind or dimension, sidecar mismatching the file) is rebuilt from SQLite.
- Saving writes a temporary file and renames it over the old one, then the sidecar likewise; a
  crash between the two leaves a sidecar that mismatches the file, which is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipsearch.errors import LibraryError

if TYPE_CHECKING:
    from clipsearch.store import Library

HNSW_THRESHOLD = 50_000  # below this an exact flat search takes a few ms; above, HNSW pays off
HNSW_M = 32  # graph degree: recall@10 >= 0.95 on 512-d CLIP-like vectors (benchmarks/search_scale.md)
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128  # tuned in benchmarks/search_scale.py for recall@10 >= 0.95 at 1M
REBUILD_FRACTION = 0.2  # rebuild an HNSW index once a fifth of it is tombstones
EXACT_SUBSET = 20_000  # a subtree filter with at most this many ids is searched exactly
SIDECAR_VERSION = 1


def model_slug(model_id: str) -> str:
    """A file-name-safe, collision-free name for a model id."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("._")[:60] or "model"
    return f"{readable}-{hashlib.sha256(model_id.encode()).hexdigest()[:10]}"


def ids_checksum(ids: np.ndarray) -> str:
    """An order-independent fingerprint of a set of int64 ids."""
    return hashlib.blake2b(np.sort(np.asarray(ids, dtype=np.int64)).tobytes(), digest_size=16).hexdigest()


def choose_kind(kind: str, n: int) -> str:
    if kind == "auto":
        return "hnsw" if n >= HNSW_THRESHOLD else "flat"
    if kind not in ("flat", "hnsw"):
        raise LibraryError(f"unknown index kind {kind!r}: use flat, hnsw or auto")
    return kind


def _new_index(kind: str, dim: int):
    import faiss

    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
    else:
        base = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        base.hnsw.efSearch = HNSW_EF_SEARCH
    # IDMap2 keeps id -> slot so vectors can be reconstructed by id (exact subset search).
    return faiss.IndexIDMap2(base)


class VectorIndex:
    """A FAISS index of one model's embeddings, keyed by image ids."""

    def __init__(self, index, kind: str, dim: int, tombstones: set[int] | None = None):
        self.index = index
        self.kind = kind
        self.dim = dim
        self.tombstones: set[int] = set(tombstones or ())
        self.path: Path | None = None
        self.rebuilt = False  # set by for_library when it had to build from SQLite
        self.updated = False  # set by for_library when it applied an incremental update
        self._gpu = None

    # --- building -----------------------------------------------------------------------------

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, *, kind: str = "auto") -> VectorIndex:
        """A fresh index of ``vectors`` (float32 [N, D], normalised) under ``ids`` (int64 [N])."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise ValueError(f"ids {ids.shape} and vectors {vectors.shape} disagree")
        kind = choose_kind(kind, len(ids))
        index = _new_index(kind, vectors.shape[1])
        if len(ids):
            index.add_with_ids(vectors, ids)
        return cls(index, kind, vectors.shape[1])

    @classmethod
    def for_library(
        cls, library: Library, model_id: str, *, kind: str = "auto", save: bool = True
    ) -> VectorIndex:
        """The index of ``model_id`` in ``library``, in step with SQLite.

        Loads ``<db>.faiss/<slug>.index`` memory-mapped when its sidecar matches the library's
        generation; otherwise updates it by id (or rebuilds it) and, with ``save`` and a writable
        library, saves it atomically.
        """
        import faiss

        directory = library.path.with_name(library.path.name + ".faiss")
        path = directory / f"{model_slug(model_id)}.index"
        sidecar = _read_sidecar(path)
        generation = library.generation()
        dim = library.model_dim(model_id)
        index = None
        if sidecar is not None and sidecar.get("model_id") == model_id and _file_matches(path, sidecar):
            wanted = choose_kind(kind, int(sidecar["count"]))
            if sidecar.get("kind") == wanted and (dim is None or sidecar.get("dim") == dim):
                fresh = (
                    sidecar.get("generation") == generation
                    and library.embedding_count(model_id) == sidecar["count"]
                )
                try:
                    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if fresh else 0
                    raw = faiss.read_index(str(path), flags)
                except RuntimeError:
                    raw = None  # unreadable: rebuilt below
                if raw is not None and raw.ntotal == sidecar["ntotal"]:
                    index = cls(raw, wanted, raw.d, set(sidecar.get("tombstones", [])))
                    if fresh:
                        index.path = path
                        return index
        sql_ids = library.embedding_ids(model_id)
        if index is not None:
            index._sync(library, model_id, sql_ids)
            if (
                choose_kind(kind, len(sql_ids)) != index.kind
                or index._tombstone_fraction() > REBUILD_FRACTION
            ):
                index = None
        if index is None:
            ids, _, vectors = library.embeddings(model_id, ids=None)
            if dim is None and not len(ids):
                dim = 0
            if not len(ids):
                vectors = np.zeros((0, dim or 0), dtype=np.float32)
            index = cls.build(ids, vectors, kind=kind)
            index.rebuilt = True
        index.path = path
        if save and not library.readonly:
            try:
                index.save(path, model_id=model_id, generation=generation)
            except OSError:
                pass  # a read-only folder: the index still works from memory
        return index

    def _sync(self, library: Library, model_id: str, sql_ids: np.ndarray) -> None:
        """Add the ids SQLite has and the index lacks; remove those it no longer has."""
        have = self.ids()
        want = set(sql_ids.tolist())
        missing = sorted(want - have)
        extra = sorted(have - want)
        if extra:
            self.remove(np.array(extra, dtype=np.int64))
        if missing:
            ids, _, vectors = library.embeddings(model_id, ids=missing)
            self.add(ids, vectors)
        self.updated = bool(missing or extra)

    # --- updates ------------------------------------------------------------------------------

    def ids(self) -> set[int]:
        """The ids searchable now (tombstones excluded)."""
        import faiss

        return set(faiss.vector_to_array(self.index.id_map).tolist()) - self.tombstones

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return
        revived = self.tombstones.intersection(ids.tolist())
        if revived:  # cannot happen with SQLite's never-reused ids; be safe anyway
            raise ValueError(f"ids {sorted(revived)[:5]} were removed from this HNSW index; rebuild it")
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        self._gpu = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids``: really for flat, as tombstones for HNSW. Returns how many were present."""
        import faiss

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        present = set(ids.tolist()) & self.ids()
        if self.kind == "flat":
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
        else:
            self.tombstones |= present
        self._gpu = None
        return len(present)

    def _tombstone_fraction(self) -> float:
        return len(self.tombstones) / max(1, self.index.ntotal)

    def save(self, path: Path, *, model_id: str, generation: int) -> None:
        """Write the index to a temp file and rename it into place, then the sidecar likewise."""
        import faiss

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        faiss.write_index(self.index, str(tmp))
        _fsync_file(tmp)
        os.replace(tmp, path)
        st = path.stat()
        ids = np.array(sorted(self.ids()), dtype=np.int64)
        meta = {
            "version": SIDECAR_VERSION,
            "model_id": model_id,
            "kind": self.kind,
            "dim": self.dim,
            "generation": generation,
            "count": len(ids),
            "ntotal": int(self.index.ntotal),
            "ids_checksum": ids_checksum(ids),
            "tombstones": sorted(self.tombstones),
            "file_size": st.st_size,
            "file_mtime_ns": st.st_mtime_ns,
        }
        side = _sidecar_path(path)
        tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta))
        _fsync_file(tmp)
        os.replace(tmp, side)
        self.path = path

    # --- search -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.index.ntotal) - len(self.tombstones)

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: set[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by inner product: ``(scores float32 [Q, k'], ids int64 [Q, k'])``, best first.

        ``queries`` float32 [Q, D] (normalised). ``k' = min(k, candidates)``; an approximate search
        may still leave slots empty (id -1, score -inf). ``allowed_ids`` restricts the candidates
        (a subtree); small sets are searched exactly.
        """
        import faiss

        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        if allowed_ids is not None:
            allowed = np.array(sorted(set(allowed_ids) - self.tombstones), dtype=np.int64)
            allowed = allowed[np.isin(allowed, faiss.vector_to_array(self.index.id_map))]
            n = len(allowed)
        else:
            allowed = None
            n = len(self)
        kk = min(int(k), n)
        if kk <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if allowed is not None and n <= EXACT_SUBSET:
            return _exact_subset(self.index, q, kk, allowed)
        params = None
        excluded = None
        if allowed is not None and self.kind == "flat":
            sel = faiss.IDSelectorBatch(allowed)
            params = faiss.SearchParameters(sel=sel)  # a flat scan with a filter is still exact
        elif allowed is not None:
            sel = faiss.IDSelectorBatch(allowed)
            # A selective filter starves the graph walk; widen the beam as the filter narrows.
            ef = max(HNSW_EF_SEARCH, kk, int(HNSW_EF_SEARCH * len(self) / max(1, n)))
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=min(ef, 4096))
        elif self.tombstones:
            excluded = faiss.IDSelectorBatch(np.array(sorted(self.tombstones), dtype=np.int64))
            sel = faiss.IDSelectorNot(excluded)
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(HNSW_EF_SEARCH, kk))
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, kk))
        index = self.index if params is not None else self._searcher()
        scores, ids = index.search(q, kk, params=params) if params is not None else index.search(q, kk)
        del excluded  # kept alive until the search is done (the selector points into it)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    def _searcher(self):
        """The index to search: a GPU copy of a flat index when faiss has GPUs, else the index."""
        import faiss

        if self.kind != "flat" or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
            return self.index
        if self._gpu is None:
            self._gpu = faiss.index_cpu_to_all_gpus(self.index)
        return self._gpu


def _exact_subset(index, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vectors = np.vstack([index.reconstruct(int(i)) for i in allowed])  # [n, D]
    sims = q @ vectors.T  # [Q, n]
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [Q, k]
    return np.take_along_axis(sims, top, axis=1).astype(np.float32), allowed[top]


def _sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_sidecar(path: Path) -> dict | None:
    try:
        meta = json.loads(_sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != SIDECAR_VERSION:
        return None
    return meta


def _file_matches(path: Path, meta: dict) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == meta.get("file_size") and st.st_mtime_ns == meta.get("file_mtime_ns")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
