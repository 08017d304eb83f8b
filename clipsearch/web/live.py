"""A library kept open for many requests: its text encoder and vector index warm, in step with SQLite.

Every request asks :class:`LiveLibrary`; it reads the library's generation first and reopens the
FAISS index when an ``index`` run has committed since (SQLite's WAL lets it read while the indexer
writes). Searches go through the library's own search functions with the warm parts handed in, so
the web answers exactly what ``clipsearch query`` answers. One lock serialises use of the single
SQLite connection and the index; the slow work (thumbnails, sending files) happens outside it.

Image queries (an uploaded picture) need the model itself; it is loaded on the first one only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from clipsearch.errors import LibraryError
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
        from clipsearch.store import Library

        self.library = Library.open(library_path)
        self.path = self.library.path
        self._lock = threading.RLock()
        self._index = None  # (model_id, generation, VectorIndex)
        self._encoder = None  # clipsearch.encoders.ExportedTextEncoder, kept warm
        self._bundle = None
        self._model_lock = threading.Lock()  # loading and running the torch model
        self._uploads: OrderedDict[str, object] = OrderedDict()
        self._duplicates = None  # ((generation, model_id, threshold), [DuplicateGroup])
        self.reloads = 0  # times the index was reopened because the library changed

    def close(self) -> None:
        with self._lock:
            self.library.close()

    # --- the warm parts -------------------------------------------------------------------------

    def model_id(self) -> str:
        return self.library.require_default_model()

    def warm_up(self) -> None:
        """Load the text encoder and open the index now, so the first search does not wait."""
        with self._lock:
            model_id = self.model_id()
            self._vector_index(model_id)
            self._text_encoder(model_id).load()  # pages the memory-mapped weights in

    def _vector_index(self, model_id: str):
        from clipsearch.vectors import VectorIndex

        generation = self.library.generation()
        held = self._index
        if held is None or held[0] != model_id or held[1] != generation:
            if held is not None:
                self.reloads += 1
                log.info("library changed (generation %s -> %s): index reopened", held[1], generation)
            held = self._index = (model_id, generation, VectorIndex.for_library(self.library, model_id))
        return held[2]

    def _text_encoder(self, model_id: str):
        from clipsearch import fastquery
        from clipsearch.encoders import ExportedTextEncoder

        held = self._encoder
        if held is not None and held.model_id == model_id and held.is_current():
            return held
        try:
            encoder = ExportedTextEncoder(model_id, warm=True)
        except fastquery.TextEncoderMissing:
            log.info("no torch-free text encoder of %s yet: exporting it once from the model", model_id)
            with self._model_lock:
                fastquery.ensure_text_encoder(self._model(model_id, self.library.model_source(model_id)))
            encoder = ExportedTextEncoder(model_id, warm=True)
        self._encoder = encoder
        return encoder

    def _model(self, model_id: str, source: str):
        """The model itself (torch), loaded once; callers hold ``_model_lock``, not ``_lock``, so
        searches and thumbnails go on while it loads."""
        if self._bundle is None or self._bundle.model_id != model_id:
            from clipsearch.checkpoints import load_bundle

            log.info("loading the model %s (image queries need it)", model_id)
            self._bundle = load_bundle(source, library=self.library)
        return self._bundle

    # --- searching ------------------------------------------------------------------------------

    def search_text(self, text: str, *, offset: int = 0, limit: int = 60, filters=None) -> Page:
        """A text query, as ``clipsearch query TEXT`` ranks it; ``filters``: a
        :class:`clipsearch.filters.PhotoFilter` applied inside the vector search."""
        from clipsearch.search import Query, search

        with self._lock:
            model_id = self.model_id()
            hits = search(
                self.library,
                self._text_encoder(model_id),
                Query.build(text),
                offset + limit + 1,
                filters,
                index=self._vector_index(model_id),
            )
            return self._page(hits, offset, limit)

    def search_vector(
        self,
        vector,
        *,
        offset: int = 0,
        limit: int = 60,
        filters=None,
        exclude: int | None = None,
    ) -> Page:
        """Photos closest to a query vector (float32 [D], normalised) of the library's model."""
        from clipsearch.search import search_vector

        with self._lock:
            model_id = self.model_id()
            extra = 1 if exclude is not None else 0
            hits = search_vector(
                self.library,
                self._vector_index(model_id),
                vector,
                offset + limit + 1 + extra,
                None,
                filters,
            )
            hits = [h for h in hits if h.image_id != exclude]
            return self._page(hits, offset, limit)

    def similar(self, image_id: int, **kwargs) -> Page:
        """Photos like library photo ``image_id`` (its stored embedding; the photo itself left out)."""
        return self.search_vector(self.stored_vector(image_id), exclude=image_id, **kwargs)

    def stored_vector(self, image_id: int):
        with self._lock:
            vector = self.library.embedding(image_id, self.model_id())  # float32 [D]
        if vector is None:
            raise LibraryError(f"photo {image_id} has no embedding of the library's model")
        return vector

    def remember_upload(self, data: bytes, uploads_dir: Path) -> str:
        """Encode an uploaded picture with the model; returns a key for :meth:`upload_vector`.

        The bytes go to a private temporary file under ``uploads_dir`` (in the clipsearch home, never
        beside the photos) only while they are decoded, and are deleted at once.
        """
        from clipsearch.encoders import ModelEncoder, encode
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
            with self._lock:
                model_id = self.model_id()
                source = self.library.model_source(model_id)
            with self._model_lock:
                try:
                    bundle = self._model(model_id, source)
                    vector = encode(Query.build(image=tmp), ModelEncoder(bundle), None)
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

    def upload_vector(self, key: str):
        """The vector of an uploaded picture, or None when it is no longer remembered."""
        with self._lock:
            return self._uploads.get(key)

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
                    self.library, model_id, threshold, index=self._vector_index(model_id)
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
