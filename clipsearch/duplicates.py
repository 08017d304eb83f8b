"""Duplicates: byte-identical copies and near-duplicates (resized, recompressed, re-encoded, lightly
cropped) among the indexed photos, grouped, the best copy first. Nothing is ever deleted or moved.

Algorithm:

1. Exact copies share a content hash (the indexer gives them the same embedding).
2. Near-duplicates are pairs of photos whose stored embeddings have a cosine similarity of at least
   ``threshold``, found by a FAISS range search of every stored vector against the others: exact
   (a flat inner-product index, in blocks) up to :data:`EXACT_MAX` photos, beyond that through an
   IVF index (the library's own when it has one, else one built for the scan), whose cells hold
   near-identical vectors together, so a scan costs about ``N * N * nprobe / nlist`` products
   instead of ``N * N``.
3. Photos linked by such pairs form a group (union-find; a chain A~B~C is one group even when A and
   C are further apart than the threshold, so ``similarity`` reports the loosest member).
4. In a group the best copy comes first: the most pixels, then the original format (camera RAW,
   then lossless PNG/TIFF/BMP, then JPEG, then the lossy formats phones and the web re-encode to),
   then the least compressed (most bytes per pixel), then the oldest in the library.

``similarity`` is the lowest cosine similarity between the best copy and another member.

Why :data:`DEFAULT_THRESHOLD` is 0.95: a resized or recompressed copy keeps its CLIP embedding
within cosine 0.98-1.0 of the original; a light crop or a re-encode to another format within
about 0.95-0.98; two different shots of one scene (a burst, a retake) usually score 0.90-0.95,
and are not copies. Lower it (``--threshold 0.92``) to gather bursts, raise it (0.98) for copies
only. (Figures from the ViT-B/32 behaviour these tools are known for, not measured here: no
trained weights were available in this environment; the tests plant copies with a random model.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clipsearch.errors import ClipsearchError, LibraryError
from clipsearch.raw import RAW_TYPES

if TYPE_CHECKING:
    import numpy as np

    from clipsearch.filters import PhotoFilter
    from clipsearch.store import ImageRow, Library

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.95
EXACT_MAX = 20_000  # up to here the scan is exact (N² products); IVF above (benchmarks/photo_features.md)
QUERY_BLOCK = 4096  # vectors searched per range-search call: bounds the result buffers

_LOSSLESS = {"png", "tiff", "bmp"}


@dataclass(frozen=True)
class DuplicateGroup:
    """Photos that are copies of one another, the best copy first."""

    photos: list[ImageRow]
    similarity: float  # lowest cosine similarity of a copy to the best one; 1.0 for identical files
    identical: bool  # every member has the same bytes


class DuplicatesError(ClipsearchError):
    """The duplicates scan cannot run as asked."""


def format_rank(file_type: str | None) -> int:
    """How original a file type is: RAW 0, lossless 1, JPEG 2, other lossy 3, unknown 4."""
    if file_type in RAW_TYPES:
        return 0
    if file_type in _LOSSLESS:
        return 1
    if file_type == "jpeg":
        return 2
    return 3 if file_type else 4


def best_first(photos: list[ImageRow]) -> list[ImageRow]:
    """``photos`` ordered best copy first (see the module doc)."""

    def key(p: ImageRow):
        pixels = (p.width or 0) * (p.height or 0)
        density = p.size / pixels if pixels else 0.0
        return (-pixels, format_rank(p.file_type), -density, p.id)

    return sorted(photos, key=key)


def similar_pairs(
    ids: np.ndarray, vectors: np.ndarray, threshold: float, index=None
) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` of positions (``i < j``) in ``vectors`` (float32 [N, D], normalised) with
    cosine similarity >= ``threshold``. ``index``: a :class:`clipsearch.vectors.VectorIndex` of
    the same vectors keyed by ``ids`` to search instead (used above :data:`EXACT_MAX`)."""
    import faiss
    import numpy as np

    n = len(ids)
    if n < 2:
        return []
    if n <= EXACT_MAX or index is None:
        searcher = faiss.IndexFlatIP(vectors.shape[1])
        searcher.add(np.ascontiguousarray(vectors, dtype=np.float32))
        to_position = None  # results are positions already
        logger.info("duplicates: exact range search over %d vectors", n)
    else:
        searcher = index.index
        to_position = ids  # results are image ids: sorted, so searchsorted maps them back
        logger.info(
            "duplicates: %s range search over %d vectors (nprobe %s)", index.kind, n, index.index.nprobe
        )
    pairs: list[tuple[int, int]] = []
    for start in range(0, n, QUERY_BLOCK):
        block = np.ascontiguousarray(vectors[start : start + QUERY_BLOCK], dtype=np.float32)
        lims, _, found = searcher.range_search(block, float(threshold))
        for row in range(len(block)):
            hits = found[lims[row] : lims[row + 1]]
            if to_position is not None:
                where = np.searchsorted(to_position, hits)
                where = np.clip(where, 0, n - 1)
                hits = where[to_position[where] == hits]  # ids outside this scan (filtered) drop out
            i = start + row
            pairs += [(i, int(j)) for j in hits if j > i]
    return pairs


def _components(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def find_duplicates(
    library: Library,
    model_id: str,
    threshold: float = DEFAULT_THRESHOLD,
    filters: PhotoFilter | None = None,
    *,
    index=None,
) -> list[DuplicateGroup]:
    """Groups of copies among the photos embedded with ``model_id`` (those ``filters`` allow),
    surest first (highest similarity, then most copies). ``index``: the library's
    :class:`clipsearch.vectors.VectorIndex` of the model, opened here when needed."""
    import numpy as np

    if not -1.0 <= threshold <= 1.0:
        raise DuplicatesError(f"--threshold {threshold}: give a cosine similarity between -1 and 1")
    if model_id not in library.model_ids():
        raise LibraryError(f"the library has no embeddings of model {model_id!r}: index with it first")
    allowed = filters.allowed_ids(library) if filters is not None else None
    if allowed is not None and len(allowed) < 2:
        return []
    ids, _, vectors = library.embeddings(model_id, ids=sorted(allowed) if allowed is not None else None)
    if index is None and len(ids) > EXACT_MAX:
        from clipsearch.vectors import VectorIndex

        index = VectorIndex.for_library(library, model_id)
        if index.kind != "ivf":  # a flat or HNSW index: a temporary IVF makes the scan sub-quadratic
            index = VectorIndex.build(ids, vectors, kind="ivf")
    pairs = similar_pairs(ids, vectors, threshold, index)
    position = {int(i): p for p, i in enumerate(ids.tolist())}
    for same in library.identical_groups():  # byte-identical copies, whatever their vectors say
        members = [position[i] for i in same if i in position]
        pairs += [(members[0], m) for m in members[1:]]
    groups = []
    for members in _components(len(ids), pairs):
        rows = library.images_by_id([int(ids[m]) for m in members])
        photos = best_first(list(rows.values()))
        if len(photos) < 2:
            continue  # removed by a concurrent index run
        best = vectors[position[photos[0].id]]
        sims = [float(np.dot(best, vectors[position[p.id]])) for p in photos[1:]]
        identical = len({p.content_hash for p in photos}) == 1
        similarity = 1.0 if identical else min(1.0, round(min(sims), 6))
        groups.append(DuplicateGroup(photos, similarity, identical))
    groups.sort(key=lambda g: (-g.similarity, -len(g.photos), g.photos[0].id))
    return groups
