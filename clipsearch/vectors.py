"""The FAISS index: derived from the library, keyed by image ids, rebuildable at any time.

One index per model lives in ``<db>.faiss/<model-slug>.index`` with a JSON sidecar recording the
SQLite state it reflects (the library's ``generation``, the lowest and highest embedded id, the
vector count and a checksum of the ids).

Kinds (vectors are L2-normalised, so inner product is cosine similarity):

- ``flat``: exact search, O(N) per query.
- ``ivf``: IVF-flat: spherical k-means cells (``2·sqrt(N)`` of them, trained on a sample), a query
  scans the ``nprobe`` nearest cells with exact scores; ``nprobe`` is tuned at build time until
  sampled vectors querying their neighbours *and* text-like queries (the model's text embeddings
  of a few generic prompts, and sampled vectors moved across the modality gap) find their true top
  10 (mean recall@10 >= ``IVF_TARGET_RECALL``, 5th percentile >= ``IVF_TARGET_P5``): text queries
  sit away from the images and need more cells than images querying themselves
  (benchmarks/text_recall.md). Builds in minutes at 1M, answers in a few ms on clustered
  (CLIP-like) data; removes for real. On data without cluster structure the tuning must scan
  many cells of full float32 vectors: slow at 1M.
- ``ivfpq``: the same cells holding 4-bit product-quantised codes (:func:`pq_codes`: 32 bytes
  for 512-d) that FAISS scans with SIMD lookup tables ("fast scan"), many times faster per cell
  than IVF-flat's float32 vectors; each query's best ``rerank`` candidates (scaled with k beyond 10) are re-scored
  exactly against the float32 vectors, kept in an ``IndexIDMap(IndexFlatIP)`` beside it
  (``<slug>.vectors``, ids ascending, memory-mapped on open), so scores are exact and deletes
  are real in both. ``nprobe`` and the re-rank depth are tuned together at build with the sets
  and targets of IVF's ``nprobe`` (fewest cells first, then the shallowest re-rank).
- ``hnsw``: HNSW graph (M=32): fast queries on any data, also without cluster structure (low-rank
  vectors, where IVF must scan many cells); its search beam ``efSearch`` is tuned at build with
  the same query sets as IVF's ``nprobe`` (never below ``HNSW_EF_SEARCH``). A slower build, a
  slower open (the graph is read, not mapped) and no deletes: removed
  ids become *tombstones* kept in the sidecar and filtered at search time; past
  ``REBUILD_FRACTION`` of the index it is rebuilt from SQLite. On request only.

``auto`` (see :func:`resolve_kind`): flat below ``SCALABLE_THRESHOLD`` vectors; from there IVF-flat,
tuned, and where it then scans much per query (data without cluster structure: more than
ivfpq's deepest re-rank alone would read), ``ivfpq`` on the same cells, kept when it reaches the
recall targets at a lower :meth:`VectorIndex.scan_cost` (:meth:`VectorIndex.build`). On clustered
data IVF-flat scans a few cells exactly and ivfpq is not tried; where 4-bit codes cannot tell the
neighbours apart (tightly packed embeddings, no structure at all) ivfpq misses its targets and
IVF-flat stays. An index run that retunes an auto-built ``ivfpq`` with text probes it then misses
rebuilds it the same way.
Every figure behind these choices (query, build and open times, recall) is in
benchmarks/search_scale.md with the command that measured it. An existing index keeps its kind under ``auto`` unless it is out of
policy by a wide margin (a flat index past ``FLAT_KEEP_MAX``), and an IVF(-PQ) index whose library grew
or shrank so much that its ideal cell count is twice or half what it has is retrained. These
changes happen when the index is brought in step (after an index run), never on an in-step open.

Opening: a sidecar whose generation and id range match SQLite (three indexed lookups, O(log N)) is
memory-mapped read-only, without reading the vectors. One out of step is brought up to date by
adding and removing the ids that differ (image ids are never reused, and a changed file gets a new
id, so the id sets say everything); one that cannot be trusted (unreadable, of another kind or
dimension, sidecar mismatching the file) is rebuilt from SQLite.

Saving writes a temporary file (flock-ed while it is written) and renames it over the old one, then
the sidecar likewise (``ivfpq`` writes its exact vectors first, and the sidecar records both
files); a crash in between leaves a sidecar that mismatches a file, which is detected and rebuilt. Temporary files left by a killed save are removed on the next open.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipsearch.atomic import atomic_path, remove_stale_temps, write_text
from clipsearch.choices import INDEX_KINDS
from clipsearch.errors import ClipsearchError, LibraryError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from clipsearch.store import Library

KINDS = INDEX_KINDS  # the names live in clipsearch.choices (the CLI reads them without numpy)
SCALABLE_THRESHOLD = (
    50_000  # below, an exact flat search is fast enough; above, IVF pays off (search_scale.md)
)
FLAT_KEEP_MAX = 2 * SCALABLE_THRESHOLD  # under auto, an existing flat index is kept up to here
HNSW_M = 32  # graph degree: recall@10 >= 0.95 on 512-d CLIP-like vectors (benchmarks/search_scale.md)
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128  # the least beam: vectors querying themselves flatter a graph they are nodes of
HNSW_EF_SEARCHES = (128, 192, 256, 384, 512, 768, 1024)  # tried in order at build until recall holds
IVF_LISTS_PER_SQRT = (
    2  # nlist = 2·sqrt(N): 2,000 cells of ~500 at 1M; training costs nlist², so not 4·sqrt(N)
)
IVF_TRAIN_PER_LIST = 32  # k-means sample: 32 vectors per cell (training costs sample × nlist)
IVF_TRAIN_ITERS = 10  # k-means iterations; more changes recall by < 0.01 and costs linearly
IVF_TARGET_RECALL = 0.97  # nprobe is tuned until each tuning set finds this share of its exact top 10
IVF_TARGET_P5 = 0.8  # ... and its 5th-percentile query at least this (the mean hides the worst queries)
# Without text probes the image self-queries stand in for text, with a margin: text queries sit
# away from the images (the modality gap) and need ~2x the cells (benchmarks/text_recall.md).
IVF_IMAGE_ONLY_TARGET = (0.995, 1.0)  # (mean, 5th percentile)
IVF_TUNE_QUERIES = 200  # sampled vectors the tuning searches for (exact answers cost 200 × N dot products)
IVF_NPROBES = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # tried in order; else every cell
# Text-like tuning queries: generic things people search for, as typed and as a caption. Only
# their region of the embedding space matters (where the model puts text), not what they name.
TEXT_PROBE_SUBJECTS = (
    "person", "people", "child", "dog", "cat", "bird", "flower", "tree", "car", "house", "city",
    "beach", "mountain", "food", "cake", "drink", "book", "phone", "shoes", "shirt", "dress", "bag",
    "face", "hand", "heart", "flag", "sign", "sun", "snow", "night", "party", "sports",
)  # fmt: skip
TEXT_PROBE_TEMPLATES = ("{}", "a photo of a {}.", "a picture of {} outdoors", "a red {}")
# ivfpq: IVF cells of 4-bit product-quantised codes scanned with SIMD lookup tables (faiss "fast
# scan"), whose best ``rerank`` candidates are re-scored exactly against the float32 vectors.
PQ_DIMS_PER_CODE = 8  # one 4-bit code per 8 dimensions: 32 bytes for a 512-d vector
PQ_TRAIN_MIN = 65_536  # the PQ codebooks (16 centroids per sub-vector) train on at least this sample
RERANK_DEPTHS = (100, 200, 400, 800, 1600)  # shortlists re-scored exactly, tried per nprobe at build
# auto's choice between IVF-flat and ivfpq compares what a query reads (VectorIndex.scan_cost), in
# bytes of IVF-flat's sequential float32 scan: a fast-scan code byte costs about 3 of them, and a
# re-ranked row (a random read from a store of GBs) about 4x its own bytes (search_scale.md).
FAST_SCAN_BYTE_COST = 3
RERANK_ROW_COST = 4
REBUILD_FRACTION = 0.2  # rebuild an HNSW index once a fifth of it is tombstones
EXACT_SUBSET = 20_000  # a subtree filter with at most this many ids is searched exactly
GPU_MAX_K = 2048  # faiss-gpu's limit on k and nprobe
SIDECAR_VERSION = 2  # 2: IndexIDMap (not IDMap2) around flat/HNSW, ivf kind, id range


def model_slug(model_id: str) -> str:
    """A file-name-safe, collision-free name for a model id."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("._")[:60] or "model"
    return f"{readable}-{hashlib.sha256(model_id.encode()).hexdigest()[:10]}"


def ids_checksum(ids: np.ndarray) -> str:
    """An order-independent fingerprint of a set of int64 ids."""
    return hashlib.blake2b(np.sort(np.asarray(ids, dtype=np.int64)).tobytes(), digest_size=16).hexdigest()


def _check_kind(kind: str) -> None:
    if kind != "auto" and kind not in KINDS:
        raise LibraryError(f"unknown index kind {kind!r}: use auto, {', '.join(KINDS)}")


def choose_kind(kind: str, n: int) -> str:
    """The kind a fresh index of ``n`` vectors starts as: ``kind`` itself unless it is ``auto``
    (flat, or IVF, which :meth:`VectorIndex.build` may turn into ``ivfpq``)."""
    _check_kind(kind)
    if kind == "auto":
        return "ivf" if n >= SCALABLE_THRESHOLD else "flat"  # build() may make it ivfpq
    return kind


def resolve_kind(requested: str, n: int, existing: str | None = None) -> str:
    """The kind the index of ``n`` vectors should have, given the kind it has (``existing``).

    An explicit request wins. Under ``auto`` an existing index keeps its kind unless it is out of
    policy by a wide margin: HNSW and IVF serve any size well (HNSW on 10 vectors is fine), a flat
    index is kept up to ``FLAT_KEEP_MAX`` vectors (twice the threshold, so a library hovering around
    it is not rebuilt back and forth) and replaced by IVF beyond. Without an index, the policy of
    :func:`choose_kind`: flat below ``SCALABLE_THRESHOLD`` (exact, free to build), IVF above,
    which :meth:`VectorIndex.build` makes ``ivfpq`` where that reads less per query. IVF-flat opens
    fully mapped and scans exactly, fast on clustered data; ``ivfpq`` answers 1M vectors without
    cluster structure within a few ms; both delete for real and retune themselves; HNSW builds and opens several times slower, holds its graph in RAM and
    needs tombstone rebuilds (benchmarks/search_scale.md has the figures). An existing index of
    any kind is kept under ``auto`` (``--index-kind`` converts it).
    """
    _check_kind(requested)
    if requested != "auto":
        return requested
    if existing == "flat":
        return "flat" if n < FLAT_KEEP_MAX else choose_kind("auto", n)
    if existing in ("ivf", "ivfpq", "hnsw"):
        return existing
    return choose_kind("auto", n)


def ivf_lists(n: int) -> int:
    """IVF cells for ``n`` vectors: ``2·sqrt(n)``, but at least ``IVF_TRAIN_PER_LIST`` vectors each."""
    return max(1, min(int(IVF_LISTS_PER_SQRT * math.sqrt(n)), n // IVF_TRAIN_PER_LIST))


def tune_nprobe(
    ivf, ids: np.ndarray, vectors: np.ndarray, text_like: np.ndarray | None = None, k: int = 10, seed: int = 0
) -> float:
    """Set ``ivf.nprobe`` to the fewest cells at which every tuning set reaches its target; returns
    the lowest mean recall@10 of the sets there.

    Measured, not assumed, against the exact answer (tie-aware: a result counts when its score
    reaches the exact ``k``-th score). The sets: ``IVF_TUNE_QUERIES`` of the indexed ``vectors``
    (float32 [N, D] under ``ids`` int64 [N]) searching for their ``k`` nearest *other* vectors, as
    ``similar`` does; and with ``text_like`` (float32 [T, D], the model's text embeddings of
    :data:`TEXT_PROBE_SUBJECTS`), those texts plus as many sampled vectors moved by the modality gap
    (the mean text minus the mean image): text queries sit away from the images, where a query's
    nearest cells hold fewer of its neighbours. Each set must reach a mean of ``IVF_TARGET_RECALL``
    and a 5th percentile of ``IVF_TARGET_P5``; without text the images alone must reach the stricter
    ``IVF_IMAGE_ONLY_TARGET``. Clustered data stops at a few cells; data without structure scans
    many (up to all).
    """
    if ivf.nlist == 1 or len(ids) <= k + 1:
        ivf.nprobe = 1
        return 1.0

    def search(nprobe: int, queries: np.ndarray, kk: int):
        ivf.nprobe = nprobe
        return ivf.search(queries, kk)

    candidates = [*(p for p in IVF_NPROBES if p < ivf.nlist), ivf.nlist]  # all cells: exact
    nprobe, worst, tuned_on, met = _tune(search, candidates, ids, vectors, text_like, k, seed)
    if not met:
        log.warning("IVF: no nprobe reached the recall target (lowest mean recall@10 %.3f)", worst)
    ivf.nprobe = nprobe
    log.info(
        "IVF nprobe %d of %d cells, tuned on %s (lowest mean recall@10 %.3f)",
        nprobe,
        ivf.nlist,
        tuned_on,
        worst,
    )
    return worst


def tune_ef_search(
    index,
    ids: np.ndarray,
    vectors: np.ndarray,
    text_like: np.ndarray | None = None,
    k: int = 10,
    seed: int = 0,
) -> tuple[int, float]:
    """The smallest HNSW ``efSearch`` of ``HNSW_EF_SEARCHES`` at which every tuning set of
    :func:`tune_nprobe` reaches its target (else the largest), and the lowest mean recall@10 there.
    ``index``: the ``IndexIDMap(IndexHNSWFlat)`` holding ``vectors`` under ``ids``. It only ever
    widens the beam past ``HNSW_EF_SEARCH``: a vector querying itself starts at its own node, whose
    links are its neighbours, so image self-queries say little; text-like ones and hard data do."""
    import faiss

    if len(ids) <= k + 1:
        return HNSW_EF_SEARCH, 1.0

    def search(ef: int, queries: np.ndarray, kk: int):
        return index.search(queries, kk, params=faiss.SearchParametersHNSW(efSearch=max(ef, kk)))

    ef, worst, tuned_on, met = _tune(search, HNSW_EF_SEARCHES, ids, vectors, text_like, k, seed)
    if not met:
        log.warning("HNSW: no efSearch reached the recall target (lowest mean recall@10 %.3f)", worst)
    log.info("HNSW efSearch %d, tuned on %s (lowest mean recall@10 %.3f)", ef, tuned_on, worst)
    return ef, worst


def _tune(search, candidates, ids, vectors, text_like, k: int, seed: int, give_up=None) -> tuple:
    """The first of ``candidates`` (cheapest first) at which ``search(value, queries, k')`` meets
    every tuning set's target (else the last, or the one at which ``give_up(value, lowest mean
    recall)`` said further ones cannot help): ``(value, lowest mean recall, what it was tuned on,
    whether the targets were met)``."""
    n = len(ids)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(n, min(IVF_TUNE_QUERIES, n), replace=False))
    images = np.ascontiguousarray(vectors[picks])  # [T, D]
    # (queries [T, D], exact k-th score [T], own id [T] or None, mean target, p5 target)
    sets = [(images, _kth_score(images, vectors, k, own=picks), ids[picks], *IVF_IMAGE_ONLY_TARGET)]
    if text_like is not None and len(text_like):
        text = np.ascontiguousarray(text_like, dtype=np.float32)  # [P, D]
        gap = text.mean(axis=0) - vectors[picks].mean(axis=0)  # [D]
        shifted = vectors[np.sort(rng.choice(n, min(IVF_TUNE_QUERIES, n), replace=False))] + gap
        shifted = np.ascontiguousarray(shifted / np.linalg.norm(shifted, axis=1, keepdims=True), np.float32)
        queries = np.concatenate([text, shifted])  # [P + T, D]
        sets = [
            (images, sets[0][1], ids[picks], IVF_TARGET_RECALL, IVF_TARGET_P5),
            (queries, _kth_score(queries, vectors, k), None, IVF_TARGET_RECALL, IVF_TARGET_P5),
        ]
    worst = 0.0
    for value in candidates:
        worst, met = 1.0, True
        for queries, kth, own, want_mean, want_p5 in sets:
            extra = 0 if own is None else 1  # a vector querying itself finds itself too
            scores, got = search(value, queries, k + extra)  # [Q, k+extra]
            found = (scores >= kth[:, None] - 1e-5) & (got >= 0)
            if own is not None:
                found &= got != own[:, None]
            recall = np.minimum(found.sum(axis=1), k) / k  # [Q]
            worst = min(worst, float(recall.mean()))
            met = bool(recall.mean() >= want_mean and np.percentile(recall, 5) >= want_p5)
            if not met:
                break  # the next setting, without searching the other sets
        if met or (give_up is not None and give_up(value, worst)):
            break
    return value, worst, "images and text" if len(sets) > 1 else "images only", met


def _kth_score(queries: np.ndarray, vectors: np.ndarray, k: int, own: np.ndarray | None = None) -> np.ndarray:
    """The exact ``k``-th best inner product of each query (float32 [Q]); with ``own`` (rows of
    ``vectors`` that are the queries themselves) among the other vectors."""
    import faiss

    extra = 0 if own is None else 1
    scores, rows = faiss.knn(queries, vectors, k + extra, metric=faiss.METRIC_INNER_PRODUCT)  # [Q, k+extra]
    if own is None:
        return scores[:, k - 1]
    # Drop each query's own row (or, should ties have pushed it out, the last one).
    keep = rows != own[:, None]
    keep[keep.all(axis=1), -1] = False
    return scores[keep].reshape(len(queries), k)[:, k - 1]


def text_probes(model_id: str) -> np.ndarray | None:
    """The model's text embeddings of the probe texts (float32 [T, D]) for tuning, from its
    torch-free text export; None (logged) when the model has none yet."""
    from clipsearch import fastquery

    texts = [t.format(s) for s in TEXT_PROBE_SUBJECTS for t in TEXT_PROBE_TEMPLATES]
    try:
        return fastquery.text_features(model_id, texts, cache=False)
    except ClipsearchError as e:  # not exported (yet), or unsupported tower
        log.info("no text export for %s (%s): IVF tuned on images only, with a margin", model_id, e)
        return None


def _new_index(kind: str, dim: int):
    import faiss

    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
    else:
        base = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        base.hnsw.efSearch = HNSW_EF_SEARCH
    # IndexIDMap keeps slot -> id; no id -> slot table (IDMap2's costs O(N) on every open).
    return faiss.IndexIDMap(base)


def pq_codes(dim: int) -> int:
    """4-bit codes per ``ivfpq`` vector: one per ``PQ_DIMS_PER_CODE`` dimensions (the largest
    divisor of ``dim`` up to ``dim / PQ_DIMS_PER_CODE``; FAISS splits a vector into equal parts)."""
    return next(m for m in range(max(1, dim // PQ_DIMS_PER_CODE), 0, -1) if dim % m == 0)


def _new_ivf(vectors: np.ndarray, seed: int = 0):
    """An IVF-flat index trained on a sample of ``vectors`` (float32 [N, D]), still empty."""
    import faiss

    n, dim = vectors.shape
    nlist = ivf_lists(n)
    ivf = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    if nlist == 1:
        # Too few vectors to train: one cell with any centroid is an exact scan.
        faiss.downcast_index(ivf.quantizer).add(np.zeros((1, dim), dtype=np.float32))
        ivf.is_trained = True
    else:
        ivf.cp.niter = IVF_TRAIN_ITERS
        ivf.cp.spherical = True  # centroids on the sphere, like the vectors: cells by cosine
        ivf.cp.min_points_per_centroid = 1  # we choose the sample size; no warning below 39
        ivf.cp.seed = seed
        take = min(n, nlist * IVF_TRAIN_PER_LIST)
        sample = (
            vectors if take == n else vectors[np.sort(np.random.default_rng(seed).choice(n, take, False))]
        )
        ivf.train(np.ascontiguousarray(sample))
    return ivf


def _with_codes(cells, vectors: np.ndarray, seed: int):
    """An empty ``ivfpq`` code index on the trained IVF ``cells``' centroids, its PQ codebooks
    trained on the residuals of a sample of at least ``PQ_TRAIN_MIN`` vectors; tiny samples are
    padded with random unit vectors (k-means needs 16 points per codebook; a library that small
    is re-ranked whole)."""
    import faiss

    n, dim = vectors.shape
    ivf = faiss.index_factory(dim, f"IVF{cells.nlist},PQ{pq_codes(dim)}x4fs", faiss.METRIC_INNER_PRODUCT)
    centroids = faiss.downcast_index(cells.quantizer).reconstruct_n(0, cells.nlist)  # [nlist, D]
    ivf.quantizer.add(centroids)  # a trained quantizer holding nlist centroids is not retrained
    ivf.pq.cp.min_points_per_centroid = 1  # no warnings on stderr for small libraries
    ivf.pq.cp.seed = seed
    rng = np.random.default_rng(seed)
    take = min(n, max(cells.nlist * IVF_TRAIN_PER_LIST, PQ_TRAIN_MIN))
    sample = vectors if take == n else vectors[np.sort(rng.choice(n, take, replace=False))]
    if len(sample) < 256:
        pad = rng.standard_normal((256 - len(sample), dim)).astype(np.float32)
        sample = np.concatenate([sample, pad / np.linalg.norm(pad, axis=1, keepdims=True)])
    ivf.train(np.ascontiguousarray(sample, dtype=np.float32))
    return ivf


def _read_flags(kind: str) -> int:
    """faiss read flags that map the file instead of reading it (flat codes / inverted lists)."""
    import faiss

    if kind == "ivfpq":
        return 0  # fast-scan lists are read (their codes are small); the exact store is mapped as flat
    if kind == "ivf":
        return faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY  # inverted lists as OnDiskInvertedLists
    # IO_FLAG_MMAP alone still copies a flat index's vectors (benchmarks/search_scale.md); MMAP_IFC maps them.
    return getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY


def _id_range(library: Library, model_id: str) -> list[int] | None:
    """``[lowest, highest]`` embedded image id of ``model_id``, as the sidecar records it (JSON)."""
    found = library.embedding_id_range(model_id)
    return None if found is None else list(found)


class VectorIndex:
    """A FAISS index of one model's embeddings, keyed by image ids."""

    def __init__(self, index, kind: str, dim: int, tombstones: set[int] | None = None, exact=None):
        self.index = index
        # ivfpq: the same vectors in float32 under the same ids, ascending (IndexIDMap(IndexFlatIP)),
        # for the exact re-rank of the shortlist the codes find; None for the other kinds.
        self.exact = exact
        self.rerank = RERANK_DEPTHS[0]  # ivfpq: candidates re-scored exactly (at k=10), tuned at build
        self.meets_target = True  # ivfpq: whether its last tuning reached the recall targets
        self.kind = kind
        self.dim = dim
        self.tombstones: set[int] = set(tombstones or ())
        self.path: Path | None = None
        self.rebuilt = False  # set by for_library when it had to build from SQLite
        self.updated = False  # set by for_library when it applied an incremental update
        self.mapped = False  # memory-mapped read-only: the first update reads the file into memory
        self.tuned_with: str | None = None  # IVF/HNSW: "text" or "images" (the tuning sets); None: unknown
        self.ef_search = HNSW_EF_SEARCH  # HNSW: the search beam, tuned at build (tune_ef_search)
        self._gpu = None

    # --- building -----------------------------------------------------------------------------

    @classmethod
    def build(
        cls, ids: np.ndarray, vectors: np.ndarray, *, kind: str = "auto", text_like: np.ndarray | None = None
    ) -> VectorIndex:
        """A fresh index of ``vectors`` (float32 [N, D], normalised) under ``ids`` (int64 [N]).

        ``text_like``: the model's text embeddings (float32 [T, D], :func:`text_probes`) an IVF
        index tunes its ``nprobe`` with, besides the vectors themselves (:func:`tune_nprobe`)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise ValueError(f"ids {ids.shape} and vectors {vectors.shape} disagree")
        requested, kind = kind, choose_kind(kind, len(ids))
        if kind == "ivfpq":
            return cls._build_ivfpq(ids, vectors, _new_ivf(vectors), text_like, warn=True)
        if kind == "ivf":
            index = _new_ivf(vectors)
        else:
            index = _new_index(kind, vectors.shape[1])
        if len(ids):
            index.add_with_ids(vectors, ids)
        built = cls(index, kind, vectors.shape[1])
        del index  # held by built alone, so that _or_ivfpq can free IVF-flat's vectors
        if kind != "flat":
            built._tune(ids, vectors, text_like)
        # Only where IVF-flat reads more than ivfpq's deepest re-rank alone would is ivfpq tried.
        deepest = RERANK_DEPTHS[-1] * vectors.shape[1] * 4 * RERANK_ROW_COST
        if requested == "auto" and kind == "ivf" and built.scan_cost() > deepest:
            return built._or_ivfpq(ids, vectors, text_like)
        return built

    @classmethod
    def _build_ivfpq(cls, ids, vectors, cells, text_like, warn: bool) -> VectorIndex:
        """An ``ivfpq`` index of ``vectors`` under ``ids`` on the trained IVF ``cells``, tuned."""
        if np.any(ids[1:] <= ids[:-1]):  # the exact store keeps its ids ascending (re-rank lookups)
            order = np.argsort(ids, kind="stable")
            ids, vectors = ids[order], vectors[order]
        exact = _new_index("flat", vectors.shape[1])
        exact.add_with_ids(vectors, ids)
        built = cls(_with_codes(cells, vectors, seed=0), "ivfpq", vectors.shape[1], exact=exact)
        built.index.add_with_ids(vectors, ids)
        if not built._tune(ids, vectors, text_like) and warn:
            log.warning(
                "ivfpq: no (nprobe, re-rank) reached the recall target: --index-kind ivf may serve better"
            )
        return built

    def _or_ivfpq(self, ids: np.ndarray, vectors: np.ndarray, text_like: np.ndarray | None) -> VectorIndex:
        """auto, for this tuned IVF-flat index that scans much per query (data without cluster
        structure): ``ivfpq`` on the same cells when it reaches the recall targets at a lower
        :meth:`scan_cost`, else this index again. Its vectors are dropped while ivfpq is built
        and tuned (one copy of the vectors in memory besides ``vectors``), and added back if
        IVF-flat stays."""
        import faiss

        flat_cost, nprobe, nlist = self.scan_cost(), self.index.nprobe, self.index.nlist
        centroids = faiss.downcast_index(self.index.quantizer).reconstruct_n(0, nlist)  # [nlist, D]
        # A new empty index on the same cells frees the vectors (reset() keeps their allocation).
        self.index = faiss.index_factory(self.dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        faiss.downcast_index(self.index.quantizer).add(centroids)
        self.index.is_trained = True
        pq = self._build_ivfpq(ids, vectors, self.index, text_like, warn=False)
        if pq.meets_target and pq.scan_cost() < flat_cost:
            log.info(
                "auto: ivfpq (scan cost %.1f MB) rather than IVF-flat (%.1f MB)",
                pq.scan_cost() / 1e6,
                flat_cost / 1e6,
            )
            return pq
        log.info(
            "auto: IVF-flat (scan cost %.1f MB) rather than ivfpq (%.1f MB, recall target %s)",
            flat_cost / 1e6,
            pq.scan_cost() / 1e6,
            "met" if pq.meets_target else "missed",
        )
        del pq
        self.index.add_with_ids(vectors, ids)
        self.index.nprobe = nprobe
        return self

    def scan_cost(self) -> float:
        """What one query (k=10) reads, in bytes of IVF-flat's sequential float32 scan: the cells'
        vectors (IVF-flat) or codes (ivfpq, ``FAST_SCAN_BYTE_COST`` each) plus the re-ranked rows
        (``RERANK_ROW_COST`` times their bytes). A model of the figures in
        benchmarks/search_scale.md that auto chooses between the two by; 0 for other kinds."""
        if self.kind not in ("ivf", "ivfpq") or not len(self):
            return 0.0
        scanned = self.index.nprobe / self.index.nlist * len(self)  # vectors in the cells scanned
        if self.kind == "ivf":
            return scanned * self.dim * 4
        rows = min(self.rerank, len(self))
        return scanned * self.index.code_size * FAST_SCAN_BYTE_COST + rows * self.dim * 4 * RERANK_ROW_COST

    def _tune(self, ids: np.ndarray, vectors: np.ndarray, text_like: np.ndarray | None) -> bool:
        """Tune nprobe (IVF), nprobe and re-rank depth (ivfpq) or efSearch (HNSW) on these vectors,
        with ``text_like`` when given; whether ivfpq met its recall targets (the others: True)."""
        import faiss

        met = True
        if self.kind == "ivf":
            tune_nprobe(self.index, ids, vectors, text_like)
        elif self.kind == "ivfpq":
            self.index.nprobe, self.rerank, met = self._tune_shortlist(ids, vectors, text_like)
            self.meets_target = met
        else:
            self.ef_search, _ = tune_ef_search(self.index, ids, vectors, text_like)
            faiss.downcast_index(self.index.index).hnsw.efSearch = self.ef_search  # kept in the file too
        self.tuned_with = "images" if text_like is None or not len(text_like) else "text"
        return met

    def _tune_shortlist(
        self, ids: np.ndarray, vectors: np.ndarray, text_like: np.ndarray | None, k: int = 10, seed: int = 0
    ) -> tuple[int, int, bool]:
        """ivfpq: the cheapest (``nprobe``, re-rank depth) at which every tuning set of
        :func:`tune_nprobe` reaches its target, scanning fewer cells first and, per ``nprobe``,
        re-ranking ``RERANK_DEPTHS`` in turn (a deeper shortlist costs less than more cells); with
        whether it was reached (else the deepest search of all cells)."""
        import faiss

        ivf = self.index
        if len(ids) <= k + 1:
            return ivf.nlist, RERANK_DEPTHS[0], True  # every cell, every vector re-ranked: exact
        nprobes = [*(p for p in IVF_NPROBES if p < ivf.nlist), ivf.nlist]
        # (nprobe, id of the query set) -> (candidate ids [Q, deepest], their exact scores so far):
        # one scan per nprobe; deeper re-ranks only score the candidates they add.
        shortlists: dict = {}

        def search(value: tuple[int, int], queries: np.ndarray, kk: int):
            nprobe, depth = value
            depth = max(depth, kk)
            key = (nprobe, id(queries))
            if key not in shortlists:
                if any(p != nprobe for p, _ in shortlists):
                    shortlists.clear()  # the ladder moved on to more cells
                params = faiss.SearchParametersIVF(nprobe=nprobe)
                cand = ivf.search(queries, max(RERANK_DEPTHS[-1], kk), params=params)[1]
                shortlists[key] = (cand, np.zeros((len(queries), 0), np.float32))
            cand, sims = shortlists[key]
            if sims.shape[1] < depth:
                more = self._exact_scores(queries, np.ascontiguousarray(cand[:, sims.shape[1] : depth]))
                sims = np.concatenate([sims, more], axis=1)
                shortlists[key] = (cand, sims)
            return _top_k(sims[:, :depth], cand[:, :depth], kk)

        deepest: list[float] = []  # recall at the deepest re-rank, per nprobe tried

        def give_up(value: tuple[int, int], recall: float) -> bool:
            # Codes too coarse for these neighbours: more cells only crowd the shortlist, and recall
            # at the deepest re-rank falls (benchmarks/text_recall.md); stop instead of scanning all.
            if value[1] != RERANK_DEPTHS[-1]:
                return False
            deepest.append(recall)
            return len(deepest) > 1 and recall < deepest[-2] - 0.01

        ladder = [(p, r) for p in nprobes for r in RERANK_DEPTHS]
        (nprobe, depth), worst, tuned_on, met = _tune(
            search, ladder, ids, vectors, text_like, k, seed, give_up
        )
        log.info(
            "IVF-PQ nprobe %d of %d cells, re-rank %d, tuned on %s (lowest mean recall@10 %.3f)",
            nprobe,
            ivf.nlist,
            depth,
            tuned_on,
            worst,
        )
        return nprobe, depth, met

    @classmethod
    def for_library(
        cls,
        library: Library,
        model_id: str,
        *,
        kind: str = "auto",
        save: bool = True,
        rebuild: bool = False,
        retune: bool = False,
    ) -> VectorIndex:
        """The index of ``model_id`` in ``library``, in step with SQLite.

        Memory-maps ``<db>.faiss/<slug>.index`` when its sidecar matches the library's generation
        and id range; otherwise updates it by id (or rebuilds it, also with ``rebuild``) and, with
        ``save`` and a writable library, saves it atomically. ``kind``: ``auto`` keeps the saved
        index's kind within policy (:func:`resolve_kind`); an explicit kind rebuilds another.
        An IVF index is tuned with the model's text probes when it has a text export
        (:func:`text_probes`); ``retune`` (index runs) retunes one that was tuned without them
        once they exist (its sidecar records the new setting; the file is unchanged).
        """
        import faiss

        _check_kind(kind)
        directory = library.path.with_name(library.path.name + ".faiss")
        path = directory / f"{model_slug(model_id)}.index"
        if not library.readonly:
            remove_stale_temps(directory)
        # The generation is read before any content, so an index is never labelled newer than
        # what it holds (a commit in between only makes the next open sync again).
        generation = library.generation()
        sidecar = _read_sidecar(path)
        dim = library.model_dim(model_id)
        index = None
        existing = None  # the saved index's kind, kept by a rebuild under auto
        if sidecar is None:  # an older format's sidecar still tells it
            hint = (_read_sidecar(path, any_version=True) or {}).get("kind")
            existing = hint if hint in KINDS else None
        if sidecar is not None and sidecar.get("library_id") is None and sidecar.get("kind") in KINDS:
            existing = sidecar["kind"]  # saved before libraries had an identity: rebuilt, kind kept
        if (
            sidecar is not None
            and sidecar.get("library_id") == library.library_id()  # never a recreated database's
            and sidecar.get("model_id") == model_id
            and sidecar.get("kind") in KINDS
            and (dim is None or sidecar.get("dim") == dim)
        ):
            existing = sidecar["kind"]
            if not rebuild and kind in ("auto", existing) and _file_matches(path, sidecar):
                fresh = sidecar.get("generation") == generation and sidecar.get("id_range") == _id_range(
                    library, model_id
                )
                try:
                    raw = faiss.read_index(str(path), _read_flags(existing) if fresh else 0)
                except RuntimeError:
                    raw = None  # unreadable: rebuilt below
                exact = _read_exact(path, sidecar, fresh) if existing == "ivfpq" and raw is not None else None
                if existing == "ivfpq" and (exact is None or exact.ntotal != sidecar["ntotal"]):
                    raw = None  # its exact vectors are missing or another save's: rebuilt below
                if raw is not None and raw.ntotal == sidecar["ntotal"] and raw.d == sidecar["dim"]:
                    index = cls(raw, existing, raw.d, set(sidecar.get("tombstones", [])), exact=exact)
                    index._apply_tuning(sidecar)
                    if fresh:
                        index.path = path
                        index.mapped = True
                        if not (retune and not library.readonly and index._retune(library, model_id)):
                            return index
                        if not index._misses_target(kind):
                            _write_sidecar(path, {**sidecar, **index._tuning()}, _private(library.path))
                            return index
                        index = None  # rebuilt below, as auto chooses with the text probes
        if index is not None:
            sql_ids = library.embedding_ids(model_id)
            index._sync(library, model_id, sql_ids)
            if index._out_of_policy(kind, len(sql_ids)):
                index = None
            elif retune and index._retune(library, model_id) and index._misses_target(kind):
                index = None
        if index is None:
            ids, _, vectors = library.embeddings(model_id, ids=None)
            if not len(ids):
                vectors = np.zeros((0, dim or 0), dtype=np.float32)
            resolved = resolve_kind(kind, len(ids), existing)
            # Under auto an index of the kind auto builds is rebuilt by auto, which may then choose
            # otherwise (ivfpq falls back to IVF-flat where its codes miss the neighbours).
            auto = kind == "auto" and resolved in ("ivf", "ivfpq") and choose_kind("auto", len(ids)) == "ivf"
            text_like = text_probes(model_id) if choose_kind(resolved, len(ids)) != "flat" else None
            index = cls.build(ids, vectors, kind="auto" if auto else resolved, text_like=text_like)
            index.rebuilt = True
        index.path = path
        if save and not library.readonly:
            try:
                index.save(
                    path,
                    model_id=model_id,
                    generation=generation,
                    id_range=_id_range(library, model_id),
                    library_id=library.library_id(),
                    private=_private(library.path),
                )
            except OSError as e:
                index.unsaved = e  # a read-only folder: the index still works from memory
        return index

    def _retune(self, library: Library, model_id: str) -> bool:
        """Retune an IVF or HNSW index tuned without text probes, once the model has them; whether
        it did (an HNSW index with tombstones waits for its rebuild)."""
        if self.kind == "flat" or self.tuned_with == "text" or self.tombstones:
            return False
        text_like = text_probes(model_id)
        if text_like is None:
            return False
        ids, _, vectors = library.embeddings(model_id, ids=None)
        if len(ids) != len(self):
            return False  # not in step (cannot happen after _sync): leave it for the next run
        self._tune(ids, vectors, text_like)
        return True

    def _misses_target(self, requested: str) -> bool:
        """Whether an ivfpq index auto chose missed its recall targets when (re)tuned: auto then
        rebuilds it (as IVF-flat, see :meth:`build`); an explicit request keeps it."""
        return requested == "auto" and self.kind == "ivfpq" and not self.meets_target

    def _tuning(self) -> dict:
        """What the sidecar records of the tuning (the file's own setting may be older)."""
        if self.kind in ("ivf", "ivfpq"):
            cells = {"nprobe": int(self.index.nprobe), "cells": int(self.index.nlist)}
            rerank = {"rerank": int(self.rerank)} if self.kind == "ivfpq" else {}
            return {**cells, **rerank, "tuned_with": self.tuned_with}
        if self.kind == "hnsw":
            return {"ef_search": int(self.ef_search), "tuned_with": self.tuned_with}
        return {}

    def _apply_tuning(self, sidecar: dict) -> None:
        """Take the tuning a sidecar records (absent from sidecars written before it was)."""
        if self.kind == "flat":
            return
        self.tuned_with = sidecar.get("tuned_with")
        if self.kind in ("ivf", "ivfpq") and isinstance(sidecar.get("nprobe"), int):
            self.index.nprobe = max(1, min(sidecar["nprobe"], self.index.nlist))
        if self.kind == "ivfpq" and isinstance(sidecar.get("rerank"), int):
            self.rerank = max(1, sidecar["rerank"])
        if self.kind == "hnsw" and isinstance(sidecar.get("ef_search"), int):
            self.ef_search = max(1, sidecar["ef_search"])

    def _out_of_policy(self, requested: str, n: int) -> bool:
        """Whether an index just brought in step with ``n`` vectors should be rebuilt."""
        if resolve_kind(requested, n, self.kind) != self.kind:
            return True
        if self.kind == "hnsw":
            return self._tombstone_fraction() > REBUILD_FRACTION
        if self.kind in ("ivf", "ivfpq"):
            # Trained for another size: cells grew too full (slow) or too sparse (poor recall).
            have, ideal = self.index.nlist, ivf_lists(n)
            return ideal >= 2 * have or 2 * ideal <= have
        return False

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

    def _all_ids(self) -> np.ndarray:
        """Every id stored in the index, tombstones included (int64, index order)."""
        import faiss

        if self.kind == "ivfpq":
            return faiss.vector_to_array(self.exact.id_map)  # the same ids as the codes', ascending
        if self.kind != "ivf":
            return faiss.vector_to_array(self.index.id_map)
        invlists = self.index.invlists
        parts = [np.zeros(0, dtype=np.int64)]
        for cell in range(self.index.nlist):
            size = invlists.list_size(cell)
            if size:
                parts.append(faiss.rev_swig_ptr(invlists.get_ids(cell), size).copy())
        return np.concatenate(parts)

    def ids(self) -> set[int]:
        """The ids searchable now (tombstones excluded)."""
        return set(self._all_ids().tolist()) - self.tombstones

    def _writable(self) -> None:
        """A memory-mapped index is read-only: read the file into memory before changing it."""
        import faiss

        if self.mapped and self.kind == "ivfpq":
            self.exact = faiss.read_index(str(_exact_path(self.path)))  # the codes are read already
        elif self.mapped:
            self.index = faiss.read_index(str(self.path))
        self.mapped = False

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return
        revived = self.tombstones.intersection(ids.tolist())
        if revived:  # cannot happen with SQLite's never-reused ids; be safe anyway
            raise ValueError(f"ids {sorted(revived)[:5]} were removed from this HNSW index; rebuild it")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._writable()
        self.index.add_with_ids(vectors, ids)
        if self.kind == "ivfpq":
            self._add_exact(ids, vectors)
        self._gpu = None

    def _add_exact(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add to the exact store, keeping its ids ascending: appended when all are newer (SQLite's
        new ids are), else the store is rebuilt in order."""
        order = np.argsort(ids, kind="stable")
        ids, vectors = ids[order], vectors[order]
        have, xb = self._stored()
        if len(have) and ids[0] <= have[-1]:
            ids = np.concatenate([have, ids])
            vectors = np.concatenate([xb, vectors])
            order = np.argsort(ids, kind="stable")
            ids, vectors = ids[order], np.ascontiguousarray(vectors[order])
            self.exact = _new_index("flat", self.dim)
        self.exact.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids``: really for flat and IVF, as tombstones for HNSW. Returns how many were present."""
        import faiss

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        present = set(ids.tolist()) & self.ids()
        if not present:
            return 0
        if self.kind == "hnsw":
            self.tombstones |= present
        else:
            self._writable()
            gone = np.array(sorted(present), dtype=np.int64)
            self.index.remove_ids(faiss.IDSelectorBatch(gone))
            if self.kind == "ivfpq":
                self.exact.remove_ids(faiss.IDSelectorBatch(gone))  # compacts in order: still ascending
        self._gpu = None
        return len(present)

    def _tombstone_fraction(self) -> float:
        return len(self.tombstones) / max(1, self.index.ntotal)

    def save(
        self,
        path: Path,
        *,
        model_id: str,
        generation: int,
        id_range: list[int] | None = None,
        library_id: str | None = None,
        private: bool = False,
    ) -> None:
        """Write the index to a temp file and rename it into place, then the sidecar likewise.

        ``generation`` and ``id_range`` (``[lowest, highest]`` id in SQLite) describe the SQLite
        state the index reflects; ``id_range`` defaults to the index's own ids. ``library_id``
        (:meth:`Library.library_id`) names the database: an index is only ever reused by its own.
        ``private``: the files ``0600`` and their folder ``0700``, as the library they describe (its
        vectors say what the photos show).
        """
        import faiss

        path.parent.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
        if private and path.parent.stat().st_mode & 0o077:
            with contextlib.suppress(OSError):  # made before this rule, or not ours to change
                path.parent.chmod(0o700)
        exact = {}
        if self.kind == "ivfpq":  # first: a crash before the index file leaves a sidecar mismatching both
            with atomic_path(_exact_path(path), private=private) as tmp:
                faiss.write_index(self.exact, str(tmp))
            st = _exact_path(path).stat()
            exact = {
                "exact": {
                    "file_size": st.st_size,
                    "file_mtime_ns": st.st_mtime_ns,
                    "owner_mac": _owner_mac(st, model_id, library_id),
                }
            }
        with atomic_path(path, private=private) as tmp:
            faiss.write_index(self.index, str(tmp))
        st = path.stat()
        ids = np.sort(np.fromiter(self.ids(), dtype=np.int64))
        if id_range is None and len(ids):
            id_range = [int(ids[0]), int(ids[-1])]
        meta = {
            "version": SIDECAR_VERSION,
            "model_id": model_id,
            "library_id": library_id,
            "kind": self.kind,
            "dim": self.dim,
            "generation": generation,
            "id_range": id_range,
            "count": len(ids),
            "ntotal": int(self.index.ntotal),
            "ids_checksum": ids_checksum(ids),
            "tombstones": sorted(self.tombstones),
            "file_size": st.st_size,
            "file_mtime_ns": st.st_mtime_ns,
            "owner_mac": _owner_mac(st, model_id, library_id),
            **self._tuning(),
            **exact,
        }
        _write_sidecar(path, meta, private=private)
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
            allowed = allowed[np.isin(allowed, self._all_ids())]
            n = len(allowed)
        else:
            allowed = None
            n = len(self)
        kk = min(int(k), n)
        if kk <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        params = None
        excluded = None
        if allowed is not None and self.kind == "ivf":
            sel = faiss.IDSelectorBatch(allowed)
            nlist = self.index.nlist
            # Every cell for a small subset is an exact scan of it; a wide filter widens nprobe.
            widened = math.ceil(self.index.nprobe * len(self) / max(1, n))
            nprobe = nlist if n <= EXACT_SUBSET else min(nlist, max(self.index.nprobe, widened))
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        elif allowed is not None and n <= EXACT_SUBSET:
            return self._exact_subset(q, kk, allowed)
        elif allowed is not None and self.kind == "ivfpq":
            widened = math.ceil(self.index.nprobe * len(self) / max(1, n))
            nprobe = min(self.index.nlist, max(self.index.nprobe, widened))
            params = faiss.SearchParametersIVF(sel=faiss.IDSelectorBatch(allowed), nprobe=nprobe)
        elif allowed is not None and self.kind == "flat":
            sel = faiss.IDSelectorBatch(allowed)
            params = faiss.SearchParameters(sel=sel)  # a flat scan with a filter is still exact
        elif allowed is not None:
            sel = faiss.IDSelectorBatch(allowed)
            # A selective filter starves the graph walk; widen the beam as the filter narrows.
            ef = max(self.ef_search, kk, int(self.ef_search * len(self) / max(1, n)))
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=min(ef, 4096))
        elif self.tombstones:
            excluded = faiss.IDSelectorBatch(np.array(sorted(self.tombstones), dtype=np.int64))
            sel = faiss.IDSelectorNot(excluded)
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.ef_search, kk))
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, kk))
        elif self.kind == "ivfpq":
            params = faiss.SearchParametersIVF(nprobe=self.index.nprobe)
        # FAISS scans a flat index for fewer than 20 queries one query per thread, yet still wakes
        # every OpenMP thread, whose barrier costs a single query more than the scan on a loaded box
        # (benchmarks/search_scale.md). The setting is the calling thread's own.
        one_thread = self.kind == "flat" and len(q) < 20
        threads = faiss.omp_get_max_threads()
        if one_thread:
            faiss.omp_set_num_threads(1)
        try:
            if self.kind == "ivfpq":
                depth = min(n, math.ceil(self.rerank * max(kk, 10) / 10))  # tuned for k=10, deeper for more
                scores, ids = self._rescore(q, self.index.search(q, depth, params=params)[1], kk)
            elif params is not None:
                scores, ids = self.index.search(q, kk, params=params)
            else:
                scores, ids = self._searcher(kk).search(q, kk)
        finally:
            if one_thread:
                faiss.omp_set_num_threads(threads)
        del excluded  # kept alive until the search is done (the selector points into it)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    def _stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Views of the float32 vectors flat, HNSW and the ivfpq exact store keep in a flat array:
        ``(ids int64 [N], vectors float32 [N, D])`` in slot order (ivfpq: ids ascending). Valid
        until the index changes."""
        import faiss

        holder = self.exact if self.kind == "ivfpq" else self.index  # an IndexIDMap
        base = faiss.downcast_index(holder.index)
        storage = faiss.downcast_index(base.storage) if self.kind == "hnsw" else base
        n = storage.ntotal
        if n == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        ids = faiss.rev_swig_ptr(holder.id_map.data(), n)  # [N]
        xb = faiss.rev_swig_ptr(storage.get_xb(), n * self.dim).reshape(n, self.dim)  # [N, D]
        return ids, xb

    def _rescore(self, q: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """ivfpq: the exact top ``k`` of each query's ``candidates`` (int64 [Q, R] ids, -1 empty)
        by inner product with the stored float32 vectors: ``(scores [Q, k], ids [Q, k])``."""
        return _top_k(self._exact_scores(q, candidates), candidates, k)

    def _exact_scores(self, q: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Inner products of each query (float32 [Q, D]) with its ``candidates`` (int64 [Q, R]
        ids) from the exact store: float32 [Q, R], -inf where a candidate is empty or unknown."""
        import faiss

        store_ids, xb = self._stored()
        if not len(store_ids) or not candidates.size:
            return np.full(candidates.shape, -np.inf, np.float32)
        rows = np.minimum(np.searchsorted(store_ids, candidates), len(store_ids) - 1)  # [Q, R]
        rows = np.ascontiguousarray(np.where(store_ids[rows] == candidates, rows, -1), dtype=np.int64)
        q = np.ascontiguousarray(q, dtype=np.float32)
        sims = np.empty(rows.shape, np.float32)
        # Gathers each query's rows itself (no [Q, R, D] copy); a row of -1 scores -inf.
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(sims), faiss.swig_ptr(q), faiss.swig_ptr(xb), faiss.swig_ptr(rows), self.dim,
            len(q), rows.shape[1],
        )  # fmt: skip
        return sims

    def _exact_subset(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the stored vectors of ``allowed`` (flat, HNSW and ivfpq keep them in a
        flat array)."""
        all_ids, xb = self._stored()  # [N], [N, D] in slot order
        slots = np.flatnonzero(np.isin(all_ids, allowed))  # [n]
        sims = q @ xb[slots].T  # [Q, n]
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [Q, k]
        return np.take_along_axis(sims, top, axis=1).astype(np.float32), all_ids[slots][top]

    def _searcher(self, k: int):
        """The index for an unfiltered search: a GPU copy of a flat or IVF index when faiss has GPUs.

        (Unverified on GPU hardware; faiss-gpu takes k and nprobe up to 2048.)
        """
        import faiss

        if (
            self.kind in ("hnsw", "ivfpq")
            or k > GPU_MAX_K
            or (self.kind == "ivf" and self.index.nprobe > GPU_MAX_K)
            or not hasattr(faiss, "get_num_gpus")
            or faiss.get_num_gpus() == 0
        ):
            return self.index
        if self._gpu is None:
            self._gpu = faiss.index_cpu_to_all_gpus(self.index)
        return self._gpu


def _sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _write_sidecar(path: Path, meta: dict, private: bool = False) -> None:
    write_text(_sidecar_path(path), json.dumps(meta), private=private)


def _private(db: Path) -> bool:
    """Whether the library file ``db`` is readable by its owner alone (as clipsearch makes it): its
    vector index is then kept as private. A library its owner shared (``chmod g+r``) shares it too."""
    try:
        return not os.stat(db).st_mode & 0o077
    except OSError:
        return True


def _read_sidecar(path: Path, any_version: bool = False) -> dict | None:
    try:
        meta = json.loads(_sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or (meta.get("version") != SIDECAR_VERSION and not any_version):
        return None
    return meta


def _owner_mac(st: os.stat_result, model_id: str, library_id: str | None) -> str | None:
    """A MAC, with this user's key, of the index file as it was written (inode, size, mtime).

    A copy made elsewhere (another user, machine or folder) gets another inode and another key, so
    its MAC fails and it is rebuilt from SQLite instead of handed to FAISS's parser. None when the
    key cannot be had (a read-only home): nothing is then trusted, and indexes are built in memory.
    """
    import hmac

    from clipsearch.paths import user_key

    try:
        key = user_key()
    except OSError:
        return None
    text = f"{library_id}|{model_id}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
    return hmac.new(key, text.encode("utf-8"), "sha256").hexdigest()


def _file_matches(path: Path, meta: dict) -> bool:
    """Whether ``path`` is the file this user's clipsearch wrote with sidecar ``meta``."""
    import hmac

    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != meta.get("file_size") or st.st_mtime_ns != meta.get("file_mtime_ns"):
        return False
    mac = _owner_mac(st, str(meta.get("model_id")), meta.get("library_id"))
    if mac is None or not hmac.compare_digest(mac, str(meta.get("owner_mac"))):
        log.info("FAISS index %s was not written by this user here: rebuilding it from the library", path)
        return False
    return True


def _top_k(sims: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each row of ``sims`` (float32 [Q, R], -inf: none) with their ids from
    ``candidates`` (int64 [Q, R]): ``(scores [Q, k], ids [Q, k])``, -inf / -1 where rows run out."""
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [Q, k'] (k' <= k when R < k)
    scores = np.full((len(sims), k), -np.inf, np.float32)
    ids = np.full((len(sims), k), -1, np.int64)
    best = np.take_along_axis(sims, top, axis=1)
    scores[:, : top.shape[1]] = best
    ids[:, : top.shape[1]] = np.where(np.isfinite(best), np.take_along_axis(candidates, top, axis=1), -1)
    return scores, ids


def describe_index(library: Library, model_id: str) -> dict | None:
    """What ``clipsearch status`` shows of a model's saved index, from its sidecar (nothing is
    read or built): ``kind``, ``vectors``, ``bytes`` on disk, ``in_step`` with SQLite, and the
    tuning (``nprobe`` of ``cells`` and ``rerank`` for IVF kinds, ``ef_search`` for HNSW,
    ``tuned_with``); None when there is no index (it is built by the next index run or query)."""
    path = library.path.with_name(library.path.name + ".faiss") / f"{model_slug(model_id)}.index"
    meta = _read_sidecar(path)
    if meta is None or meta.get("model_id") != model_id or meta.get("kind") not in KINDS:
        return None
    try:
        size = path.stat().st_size
        if meta["kind"] == "ivfpq":
            size += _exact_path(path).stat().st_size
    except OSError:
        return None
    in_step = meta.get("library_id") == library.library_id() and (
        meta.get("generation") == library.generation()
        and meta.get("id_range") == _id_range(library, model_id)
    )
    keys = ("nprobe", "cells", "rerank", "ef_search", "tuned_with")
    return {
        "kind": meta["kind"],
        "vectors": meta.get("count"),
        "bytes": size,
        "in_step": in_step,
        **{k: meta[k] for k in keys if meta.get(k) is not None},
    }


def _exact_path(path: Path) -> Path:
    """The ivfpq exact store beside ``path``: the float32 vectors its shortlists are re-ranked with."""
    return path.with_suffix(".vectors")


def _read_exact(path: Path, sidecar: dict, fresh: bool):
    """The ivfpq exact store of the index at ``path`` when the sidecar's record of it matches the
    file this user wrote (mapped when ``fresh``), else None (logged; the index is rebuilt)."""
    import faiss

    exact_path = _exact_path(path)
    record = sidecar.get("exact")
    if not isinstance(record, dict) or not _file_matches(exact_path, {**sidecar, **record}):
        log.info("the exact vectors of %s are missing or another save's: rebuilding", path)
        return None
    try:
        return faiss.read_index(str(exact_path), _read_flags("flat") if fresh else 0)
    except RuntimeError:
        log.info("the exact vectors of %s are unreadable: rebuilding", path)
        return None
