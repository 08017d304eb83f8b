"""A library kept open for many requests: its text encoder and vector index warm, in step with SQLite.

Every request asks :class:`LiveLibrary`. Searches (words, "more like this", an uploaded picture) go
through the library's one query pipeline, a :class:`clipsearch.search.Searcher` kept warm: it reads
the library's generation first and reopens the FAISS index when an ``index`` run has committed
since (SQLite's WAL lets it read while the indexer writes), so the web answers exactly what
``clipsearch query`` answers. The searcher's lock serialises use of the single SQLite connection
and the index; the slow work (thumbnails, sending files) happens outside it.

An uploaded picture is a query of an image file, answered the way ``clipsearch query --image`` is:
through the model's ONNX image export when its backend verdict on this machine chose one (no torch;
the warm searcher keeps its session), else the model in torch, loaded on the first upload (other
searches wait for that load).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from clipsearch.store import ImageRow

log = logging.getLogger(__name__)

MAX_UPLOADS_KEPT = 64  # query vectors of uploaded pictures remembered for paging (2 KB each)


@dataclass(frozen=True)
class Photo:
    """One library photo as the pages show it: its :class:`clipsearch.store.ImageRow` (whose fields
    it answers for: ``photo.id``, ``photo.taken_at``...) and, in results, its score."""

    row: ImageRow
    score: float | None = None

    def __getattr__(self, name: str):
        return getattr(self.row, name)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def camera(self) -> str | None:
        from clipsearch.metadata import camera_name

        return camera_name(self.row.camera_make, self.row.camera_model)


@dataclass(frozen=True)
class DuplicateGroup:
    """Copies of one photo, the best first; ``similarity``: the lowest to the best (1.0: same bytes)."""

    photos: list[Photo]
    similarity: float
    identical: bool


@dataclass(frozen=True)
class Page:
    """One page of results: ``photos`` from ``offset``; ``more`` when another page follows."""

    photos: list[Photo]
    offset: int
    more: bool


class LiveLibrary:
    """The library at ``library_path``, open and warm; safe to use from several threads."""

    def __init__(self, library_path: Path | str | None = None):
        from clipsearch.search import Searcher

        self.searcher = Searcher(library_path, warm=True, ask_daemon=False)
        self.path = self.searcher.library_path
        self._lock = self.searcher.lock
        self.searcher.library()  # opened now: a missing library fails here
        self._uploads: OrderedDict[str, object] = OrderedDict()
        self._duplicates = None  # ((generation, model_id, threshold), [DuplicateGroup])

    @property
    def library(self):
        """The open :class:`clipsearch.store.Library` (reopened when its file is replaced)."""
        return self.searcher.library()

    @property
    def reloads(self) -> int:
        """Times the index (or the library, or the text encoder) was reopened because it changed."""
        return self.searcher.reloads

    def close(self) -> None:
        self.searcher.close()

    def model_id(self) -> str:
        return self.library.require_default_model()

    def warm_up(self) -> None:
        """Load the text encoder and open the index now, so the first search does not wait."""
        self.searcher.warm_up()

    # --- searching ------------------------------------------------------------------------------

    def search_text(self, text: str, *, offset: int = 0, limit: int = 60, filters=None) -> Page:
        """A text query, as ``clipsearch query TEXT`` ranks it; ``filters``: a
        :class:`clipsearch.filters.PhotoFilter` applied inside the vector search."""
        from clipsearch.search import Query

        return self._search(Query.build(text), offset, limit, filters)

    def search_upload(self, key: str, *, offset: int = 0, limit: int = 60, filters=None) -> Page | None:
        """Photos like an uploaded picture (:meth:`remember_upload`), or None when it is no longer
        remembered."""
        from clipsearch.search import Query, QueryPart

        with self._lock:
            vector = self._uploads.get(key)
        if vector is None:
            return None
        return self._search(Query([QueryPart.given(vector, "the uploaded picture")]), offset, limit, filters)

    def similar(self, image_id: int, *, offset: int = 0, limit: int = 60, filters=None) -> Page:
        """Photos like library photo ``image_id`` (its stored embedding; the photo itself left out)."""
        from clipsearch.search import Query, QueryPart

        return self._search(Query([QueryPart.indexed(image_id)]), offset, limit, filters, exclude=image_id)

    def _search(self, query, offset: int, limit: int, filters, exclude: int | None = None) -> Page:
        extra = 1 if exclude is not None else 0
        # run() takes the lock itself, and leaves it while a model loads (seconds): not held here
        hits = self.searcher.run(query, offset + limit + 1 + extra, filters).hits
        hits = [h for h in hits if h.image_id != exclude]
        with self._lock:
            return self._page(hits, offset, limit)  # a photo removed meanwhile is left out

    def remember_upload(self, data: bytes, uploads_dir: Path) -> str:
        """Encode an uploaded picture as ``clipsearch query --image`` would; returns a key for
        :meth:`search_upload`.

        The bytes go to a private temporary file under ``uploads_dir`` (in the clipsearch home, never
        beside the photos) only while they are decoded, and are deleted at once.
        """
        from clipsearch.errors import ImageDecodeError
        from clipsearch.search import Query, QueryError

        key = hashlib.sha256(data).hexdigest()[:24]
        with self._lock:
            if key in self._uploads:
                self._uploads.move_to_end(key)
                return key
        uploads_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=uploads_dir, prefix="upload-", suffix=".img")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                vector = self.searcher.run(Query.build(image=tmp), top=1).vector
            except QueryError as e:  # not a picture: the decoder's reason, not our temp file's name
                if isinstance(e.__cause__, ImageDecodeError):
                    raise e.__cause__ from None
                raise
            with self._lock:
                self._uploads[key] = vector
                while len(self._uploads) > MAX_UPLOADS_KEPT:
                    self._uploads.popitem(last=False)
        finally:
            os.unlink(tmp)
        return key

    # --- photos, labels, status -----------------------------------------------------------------

    def photo(self, image_id: int) -> Photo | None:
        with self._lock:
            row = self.library.image(image_id)
        return None if row is None else _photo(row)

    def photo_count(self) -> int:
        with self._lock:
            return self.library.embedding_count(self.model_id())

    def _page(self, hits, offset: int, limit: int) -> Page:
        window = hits[offset : offset + limit]
        rows = [(self.library.image(h.image_id), h.score) for h in window]
        # a photo removed by an index run since the search is left out
        photos = [_photo(row, score) for row, score in rows if row is not None]
        return Page(photos, offset, more=len(hits) > offset + limit)

    def label_sets(self) -> list[dict]:
        """The stored zero-shot labels: ``[{classes, labels: [(label, photos)]}]``, top label per photo."""
        with self._lock:
            counts = self.library.top_label_counts(self.model_id())
        sets: dict[tuple, dict] = {}
        for c in counts:
            entry = sets.setdefault(tuple(c.classes), {"classes": c.classes, "labels": []})
            entry["labels"].append((c.label, c.photos))
        return list(sets.values())

    def labelled(self, label: str, *, offset: int = 0, limit: int = 60) -> Page:
        """Photos whose top label is ``label`` (in any class set), most confident first."""
        with self._lock:
            window = self.library.top_labelled(self.model_id(), label, limit + 1, offset)
            found = [(self.library.image(i), s) for i, s in window[:limit]]
        photos = [_photo(row, s) for row, s in found if row is not None]
        return Page(photos, offset, more=len(window) > limit)

    def labels_of(self, image_id: int) -> list[tuple[str, float]]:
        """A photo's stored labels, best first."""
        with self._lock:
            rows = self.library.labels(model_id=self.model_id(), image_id=image_id)
        return sorted(((r.label, r.score) for r in rows), key=lambda x: -x[1])

    def duplicates(self, threshold: float) -> list:
        """Groups of copies (:func:`clipsearch.duplicates.find_duplicates`) as lists of :class:`Photo`
        with their similarity; computed once per library generation and threshold."""
        from clipsearch.duplicates import find_duplicates

        with self._lock:
            model_id = self.model_id()
            key = (self.library.generation(), model_id, threshold)
            if self._duplicates is None or self._duplicates[0] != key:
                groups = find_duplicates(
                    self.library, model_id, threshold, index=self.searcher.index(model_id)
                )
                found = [
                    DuplicateGroup([Photo(r) for r in g.photos], g.similarity, g.identical) for g in groups
                ]
                self._duplicates = (key, found)
            return self._duplicates[1]

    def status(self) -> dict:
        """``{stats: LibraryStats, recent_errors: [ErrorRow], default_model, reloads}``."""
        with self._lock:
            return {
                "stats": self.library.stats(),
                "recent_errors": self.library.errors(limit=50),
                "default_model": self.library.default_model_id(),
                "reloads": self.reloads,
            }


def _photo(row: ImageRow, score: float | None = None) -> Photo:
    return Photo(row, score)
