"""Search a library: a query (texts, image files, indexed photos, weighted) -> the closest photos.

A query is a weighted sum of parts. Each part becomes an L2-normalised vector (a text through the
text tower, an image file through the image tower after the model's preprocessing, an indexed photo
as its stored vector); the parts are summed with their weights (a negative weight subtracts, e.g.
``"beach" --minus "people"``) and the sum is normalised again. Photos are ranked by cosine
similarity through the library's FAISS index, within the ids a
:class:`clipsearch.filters.PhotoFilter` allows.

Every caller goes through one pipeline, :class:`Searcher` (``clipsearch query``, ``similar``,
the query daemon, the web interface), and it goes one way down::

    Searcher.run  --(a daemon serves this library?)-->  clipsearch.daemon_client.ask  (None: answer here)
      |  no: the library, opened here (kept open by the daemon and the web)
      v
    clipsearch.encoders.choose  ->  search()  ->  clipsearch.encoders.encode  ->  clipsearch.vectors (FAISS)

:meth:`Searcher.run` answers a query (a command makes a :class:`Searcher` for its one query);
:func:`search` is the in-process step on an open library with a chosen encoder. Which way answered is logged
(``--verbose``) and returned in :class:`Answer`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipsearch.errors import LibraryError, QueryError
from clipsearch.filters import PhotoFilter

if TYPE_CHECKING:  # numpy is imported where vectors are made: a client of `clipsearch serve` needs none
    import numpy as np

    from clipsearch.encoders import QueryEncoder
    from clipsearch.store import Library

log = logging.getLogger(__name__)

PART_KINDS = ("text", "image", "indexed", "vector")


@dataclass(frozen=True)
class QueryPart:
    """One term of a query, with a weight: ``kind`` is ``"text"``, ``"image"`` (``value`` a file
    to encode), ``"indexed"`` (``value`` the decimal id of a photo in the library: its stored
    vector, no model needed; make one with :meth:`indexed`) or ``"vector"`` (a query vector made
    earlier, e.g. of an uploaded picture: ``vector``, normalised, with ``value`` saying what it is;
    make one with :meth:`given`)."""

    kind: str
    value: str
    weight: float = 1.0
    vector: tuple[float, ...] | None = None

    @classmethod
    def indexed(cls, image_id: int, weight: float = 1.0) -> QueryPart:
        return cls("indexed", str(int(image_id)), weight)

    @classmethod
    def given(cls, vector, what: str = "a picture", weight: float = 1.0) -> QueryPart:
        """A part that is already a vector (``float32 [D]``, normalised) of the library's model."""
        return cls("vector", what, weight, tuple(float(x) for x in vector))

    @property
    def image_id(self) -> int:
        """The library id of an ``indexed`` part."""
        return int(self.value)

    def describe(self) -> str:
        sign = "-" if self.weight < 0 else "+"
        w = abs(self.weight)
        scale = "" if w == 1.0 else f"{w:g}*"
        what = {"text": repr(self.value), "image": f"image:{self.value}", "vector": self.value}.get(
            self.kind, f"photo #{self.value}"
        )
        return f"{sign} {scale}{what}"


@dataclass
class Query:
    """A weighted sum of text and image parts."""

    parts: list[QueryPart] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        text: str | None = None,
        image: str | Path | None = None,
        add: Sequence[str] = (),
        minus: Sequence[str] = (),
        add_image: Sequence[str | Path] = (),
        minus_image: Sequence[str | Path] = (),
        minus_weight: float = 1.0,
    ) -> Query:
        """The query of ``clipsearch query``: positive parts weigh +1, ``minus`` parts -minus_weight."""
        parts = []
        if text is not None:
            parts.append(QueryPart("text", text, 1.0))
        if image is not None:
            parts.append(QueryPart("image", str(image), 1.0))
        parts += [QueryPart("text", t, 1.0) for t in add]
        parts += [QueryPart("image", str(p), 1.0) for p in add_image]
        parts += [QueryPart("text", t, -minus_weight) for t in minus]
        parts += [QueryPart("image", str(p), -minus_weight) for p in minus_image]
        return cls(parts)

    def describe(self) -> str:
        """A human-readable form, e.g. ``'beach' - 'people'``."""
        text = " ".join(p.describe() for p in self.parts)
        return text[2:] if text.startswith("+ ") else text

    def check(self) -> None:
        """Raise :class:`QueryError` for a query no encoder can run (no parts, an empty text)."""
        if not self.parts:
            raise QueryError("empty query: give a text, --image PATH, --add or --add-image")
        for p in self.parts:
            if p.kind not in PART_KINDS:
                raise QueryError(f"unknown query part kind {p.kind!r}")
            if p.kind == "text" and not p.value.strip():
                raise QueryError("empty query text")
            if p.kind == "indexed" and not p.value.isdigit():
                raise QueryError(f"an indexed part names a photo by its id, not {p.value!r}")
            if p.kind == "vector" and not p.vector:
                raise QueryError(f"the query part {p.value!r} has no vector")

    def combine(self, vectors: Sequence) -> np.ndarray:
        """The normalised weighted sum ``float32 [D]`` of the parts' normalised vectors (in order)."""
        import numpy as np

        total = sum(p.weight * np.asarray(v, np.float64) for p, v in zip(self.parts, vectors, strict=True))
        norm = float(np.linalg.norm(total))
        if not np.isfinite(norm) or norm < 1e-6:
            raise QueryError(f"the query parts cancel out ({self.describe()}): change the weights")
        return (total / norm).astype(np.float32)


@dataclass(frozen=True)
class Hit:
    """One result: the photo's absolute path, its cosine similarity to the query, its library id."""

    path: Path
    score: float
    image_id: int


def cut_texts(query: Query, tokenizer) -> list[str]:
    """The text parts of ``query`` longer than the model's context: the encoder reads only their
    first ``context_length - 2`` tokens. ``tokenizer`` has ``encode(text)`` and ``context_length``."""
    room = int(tokenizer.context_length) - 2  # start and end tokens
    # A token covers at least one character: shorter texts fit without tokenizing them
    long = [p.value for p in query.parts if p.kind == "text" and len(p.value) > room]
    return [t for t in long if len(tokenizer.encode(t)) > room]


@dataclass
class Answer:
    """The hits of a query and which way answered: ``encoder`` is ``daemon``, ``torch-free``,
    ``model`` or ``stored-vectors`` (:mod:`clipsearch.encoders`). ``vector``: the query vector
    ``float32 [D]`` the hits were ranked by (None when the daemon answered)."""

    hits: list[Hit]
    encoder: str
    vector: np.ndarray | None = None


def search(
    library: Library,
    encoder: QueryEncoder,
    query: Query,
    top: int = 20,
    filters: PhotoFilter | None = None,
    threshold: float | None = None,
    index_kind: str = "auto",
    *,
    index=None,
) -> list[Hit]:
    """The ``top`` photos of ``library`` closest to ``query`` (cosine similarity, best first).

    ``encoder`` (:func:`clipsearch.encoders.choose`) makes the query vector; its model's embeddings
    are searched. ``filters`` limit the photos; ``threshold`` keeps hits scoring at least that.
    ``index``: an open :class:`clipsearch.vectors.VectorIndex` of them in step with the library
    (a :class:`Searcher` that is kept warm holds one); by default it is opened here, while the
    query is encoded.
    """
    return _rank(library, encoder, query, top, filters, threshold, index_kind, index)[0]


def _rank(
    library, encoder, query, top, filters, threshold, index_kind, index
) -> tuple[list[Hit], np.ndarray]:
    """:func:`search`, and the query vector it ranked by."""
    from concurrent.futures import ThreadPoolExecutor

    from clipsearch.encoders import encode
    from clipsearch.vectors import VectorIndex

    if top < 1:
        raise QueryError(f"--top must be at least 1, got {top}")
    check_model(library, encoder)
    query.check()
    if index is None:
        with ThreadPoolExecutor(1) as pool:  # open (or bring in step) the FAISS index meanwhile
            pending = pool.submit(VectorIndex.for_library, library, encoder.model_id, kind=index_kind)
            q = encode(query, encoder, library)  # a query error wins; leaving waits for the index anyway
            index = pending.result()
    else:
        q = encode(query, encoder, library)
    return search_vector(library, index, q, top, threshold, filters), q


def check_model(library, encoder) -> None:
    """Raise :class:`LibraryError` naming the model as the user gave it, and the library's own models,
    unless the library holds embeddings of ``encoder.model_id``."""
    if encoder.model_id not in library.model_ids():
        from clipsearch.encoders import ModelEncoder

        # only a model named with --model can be one the library never saw: its bundle names it
        name = encoder.bundle.name if isinstance(encoder, ModelEncoder) else encoder.model_id
        known = ", ".join(library.model_name(m) for m in library.model_ids()) or "none"
        raise LibraryError(
            f"the library has no embeddings of model {name} (it has: {known}): "
            "index with that model first or leave out --model"
        )


def search_vector(
    library,
    index,
    q: np.ndarray,
    top: int,
    threshold: float | None = None,
    filters: PhotoFilter | None = None,
) -> list[Hit]:
    """The ``top`` photos of ``index`` (a :class:`clipsearch.vectors.VectorIndex` in step with
    ``library``) closest to the normalised vector ``q`` float32 [D], among those ``filters`` allows."""
    allowed = filters.allowed_ids(library) if filters is not None else None
    if allowed is not None and not allowed:
        return []
    scores, ids = index.search(q[None, :], top, allowed_ids=allowed)
    pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
    if threshold is not None:
        pairs = [(s, i) for s, i in pairs if s >= threshold]
    paths = library.image_paths([i for _, i in pairs])
    # An id the index still has but SQLite lost meanwhile (a concurrent index run) is skipped.
    return [Hit(paths[i], s, i) for s, i in pairs if i in paths]


def resolve_photo(library, target: str | Path | int) -> int | None:
    """The id of the indexed photo ``target`` names: an image id, a path indexed as it is, or a
    file whose content is indexed (a copy elsewhere). None for a file the library does not know.
    Raises :class:`QueryError` when ``target`` is neither an id of the library nor a file."""
    text = str(target)
    p = Path(text).expanduser()
    if not p.exists() and text.isdigit():
        image_id = int(text)
        if image_id >= 1 << 63 or not library.image_paths([image_id]):  # beyond SQLite's integers: none
            raise QueryError(f"no photo with id {image_id} in the library (ids are in `query --json`)")
        return image_id
    from clipsearch.walk import why_not_a_file

    why = why_not_a_file(p)
    if why is not None:
        raise QueryError(f"{text}: {why} (give a photo file or a library id)")
    found = library.image_at(p)
    if found is not None:
        st = p.stat()
        if (st.st_size, st.st_mtime_ns) == (found.size, found.mtime_ns):  # the indexer's "unchanged"
            return found.id
        # changed since it was indexed: its stored vector is the old picture's; known by content, or not
    from clipsearch.indexer import read_and_hash  # the content hash the indexer keys photos by

    try:
        with open(p, "rb") as f:
            digest, _ = read_and_hash(f.fileno(), keep=False)
    except OSError as e:
        raise QueryError(f"cannot read {text}: {e.strerror}") from e
    same = library.image_ids_with_hash(digest)
    return same[0] if same else None


class Searcher:
    """The one query pipeline of a library: decides how each query is answered, and says which way.

    :meth:`run` asks a running ``clipsearch serve`` first (``ask_daemon``; not when a model is
    named, a GPU ``device`` is, or the query has image files or vectors, which the daemon cannot
    take); otherwise it opens the library and :func:`clipsearch.encoders.choose` picks the cheapest
    encoder (stored vectors, the torch-free text tower, the model in torch), then :func:`search`
    ranks through :mod:`clipsearch.vectors`. After the library's own model had to be loaded, its
    text tower is exported so the next text query needs no torch. :meth:`similar` is a query by an
    indexed photo (its stored vector) or a photo file. Each choice is a ``logging`` line
    (``--verbose``).

    A command makes one for its one query. The daemon and the web interface keep one
    (``warm=True``): the library stays open (reopened when its file is replaced), and the text
    encoder, the image export's session, the model and each vector index are kept while they are
    current. Calls are serialised
    (``lock``); the daemon passes ``allow_model=False``: a query that needs the model is refused
    (:class:`QueryError`) and its client answers it itself.

    ``load_model(source, library) -> bundle`` loads a model (default
    :func:`clipsearch.checkpoints.load_bundle` on the CPU; the CLI's shows a download bar and puts it
    on ``--device``).
    """

    def __init__(
        self,
        library_path: Path | str | None = None,
        *,
        warm: bool = False,
        ask_daemon: bool = True,
        allow_model: bool = True,
        device: str = "auto",
        load_model: Callable[[str, Library], object] | None = None,
    ):
        from clipsearch.store import resolve_path

        self.library_path = resolve_path(library_path)
        self.warm = warm
        self.ask_daemon = ask_daemon
        self.allow_model = allow_model
        self.torch_free = device in ("auto", "cpu")  # a GPU named explicitly runs the model there
        self._load_model = load_model
        self.lock = threading.RLock()
        self.reloads = 0  # times the library, an index or the text encoder were reopened after a change
        self._library = None
        self._file = None  # (st_dev, st_ino) of the library file when it was opened
        self._text_encoders: dict = {}  # model_id -> ExportedTextEncoder (warm)
        self._image_exports: dict = {}  # (model_id, backend) -> its ONNX image encoder (warm)
        self._indexes: dict = {}  # (model_id, kind) -> (generation, VectorIndex) (warm)
        self._bundle = None  # (source, bundle) (warm)
        self._model_lock = threading.Lock()

    # --- what a warm searcher keeps ------------------------------------------------------------

    def library(self) -> Library:
        """The open library; a warm searcher reopens it when its file was replaced (or removed)."""
        from clipsearch.store import Library

        with self.lock:
            if self._library is not None and self.warm and _file_identity(self.library_path) != self._file:
                log.info("library: %s was replaced; reopening it", self.library_path)
                self.reloads += 1
                self._library.close()
                self._library = None
                self._indexes.clear()
            if self._library is None:
                self._library = Library.open(self.library_path)
                self._file = _file_identity(self.library_path)
            return self._library

    def index(self, model_id: str, kind: str = "auto"):
        """The :class:`clipsearch.vectors.VectorIndex` of ``model_id``'s embeddings, in step with the
        library (a warm searcher keeps it until the library's generation changes)."""
        from clipsearch.vectors import VectorIndex

        with self.lock:
            library = self.library()
            generation = library.generation()
            held = self._indexes.get((model_id, kind))
            if held is not None and held[0] == generation:
                return held[1]
            if held is not None:
                self.reloads += 1
                log.info("library changed (generation %s -> %s): index reopened", held[0], generation)
            index = VectorIndex.for_library(library, model_id, kind=kind)
            if self.warm:
                self._indexes[(model_id, kind)] = (generation, index)
            return index

    def model(self, source: str):
        """The model at ``source`` (loaded once by a warm searcher). Loading does not hold
        :attr:`lock`: searches of texts and indexed photos go on meanwhile."""
        with self.lock:  # taken before the model's lock, never after: a query holds both in this order
            library = self.library()
        with self._model_lock:
            if self._bundle is not None and self._bundle[0] == source:
                return self._bundle[1]
            if self._load_model is not None:
                bundle = self._load_model(source, library)
            else:
                from clipsearch.checkpoints import load_bundle

                bundle = load_bundle(source, library=library)
            if self.warm:
                self._bundle = (source, bundle)
            return bundle

    def _load_for_query(self, source: str, library) -> object:
        if not self.allow_model:
            raise QueryError("this query needs the model, which is not loaded here")
        held = self._bundle  # read without its lock: a loading thread holds that for seconds
        if self.warm and (held is None or held[0] != source):
            raise _ModelNeeded(source)  # run() loads it without holding the searcher's lock
        return self.model(source)

    def _text_encoder(self, model_id: str):
        """The torch-free text encoder of ``model_id`` (raises ``fastquery.TextEncoderMissing``)."""
        from clipsearch.encoders import ExportedTextEncoder

        held = self._text_encoders.get(model_id)
        if held is not None and held.is_current():
            return held
        encoder = ExportedTextEncoder(model_id, warm=self.warm)
        if self.warm:
            if held is not None:
                self.reloads += 1
                log.info("the text export of %s was replaced; reloaded", self.library().model_name(model_id))
            self._text_encoders[model_id] = encoder
        return encoder

    def _image_export(self, bundle, backend: str):
        """The image encoder running ``bundle``'s ONNX ``backend`` export (kept by a warm searcher:
        an uploaded picture after the first does not build its session again)."""
        from clipsearch.encoders import make_image_export

        key = (bundle.model_id, backend)
        held = self._image_exports.get(key)
        if held is None:
            held = make_image_export(bundle, backend)
            if self.warm:
                self._image_exports[key] = held
        return held

    def warm_up(self, say: Callable[[str], None] | None = None) -> None:
        """Open the library, its model's index and torch-free text encoder now, so the first query
        does not wait. A model never exported is exported once (loads it: seconds; ``say`` tells)."""
        from clipsearch import fastquery
        from clipsearch.encoders import export_text_encoder

        with self.lock:
            library = self.library()
            model_id = library.require_default_model()
            self.index(model_id)
            try:
                encoder = self._text_encoder(model_id)
            except fastquery.TextEncoderMissing:
                name = library.model_name(model_id)
                log.info("no torch-free text encoder of %s yet: exporting it once from the model", name)
                if say is not None:
                    say(f"Exporting the text model of {name} for fast queries...")
                export_text_encoder(self.model(library.model_source(model_id)))
                encoder = self._text_encoder(model_id)
            encoder.load()

    # --- queries ---------------------------------------------------------------------------------

    def run(
        self,
        query: Query,
        top: int = 20,
        filters: PhotoFilter | None = None,
        threshold: float | None = None,
        index_kind: str = "auto",
        *,
        model: str | None = None,
    ) -> Answer:
        """Answer ``query`` the cheapest way (see the class doc). ``model``: a model source the user
        named (``--model``), loaded in torch."""
        from clipsearch import encoders

        query.check()
        if top < 1:
            raise QueryError(f"--top must be at least 1, got {top}")
        if model is None:
            query = self._indexed_images(query)
        if self._daemon_may_answer(model):
            from clipsearch import daemon_client

            hits = daemon_client.ask(self.library_path, query, top, filters, threshold, index_kind)
            if hits is not None:
                return Answer([Hit(*h) for h in hits], encoders.DAEMON)
        for _ in range(_MODEL_LOAD_TRIES):
            try:
                with self.lock:
                    library = self.library()
                    encoder = encoders.choose(
                        library,
                        query,
                        model=model,
                        load_model=self._load_for_query,
                        torch_free=self.torch_free,
                        text_encoder=self._text_encoder,
                        image_export=self._image_export,
                    )
                    index = self.index(encoder.model_id, index_kind) if self.warm else None
                    hits, q = _rank(library, encoder, query, top, filters, threshold, index_kind, index)
                break
            except _ModelNeeded as needed:
                # A warm searcher (the web's) loads a model for seconds: not under the lock every
                # search takes, so texts and indexed photos are answered meanwhile; then again.
                self.model(needed.source)
        else:
            raise QueryError("the model was replaced by another query's while loading; try again")
        if isinstance(encoder, encoders.ModelEncoder) and model is None:
            encoder.export_text()  # so the next text query can skip torch
        return Answer(hits, encoder.name, q)

    def _indexed_images(self, query: Query) -> Query:
        """``query`` with each image file the library has indexed (that path, or a copy of its
        content) as that photo's stored vector: the same vector its own search ranks by (a photo
        scores 1.0 against itself, as with :meth:`similar`), and no model to load for it."""
        if not any(p.kind == "image" for p in query.parts):
            return query
        parts = []
        with self.lock:
            library = self.library()
            model_id = library.default_model_id()
            for part in query.parts:
                if part.kind == "image" and model_id is not None:
                    try:
                        image_id = resolve_photo(library, part.value)
                    except QueryError:
                        image_id = None  # not readable here: encoding it says why
                    if image_id is not None and library.has_embedding(image_id, model_id):
                        log.info(
                            "query image %s is photo #%d of the library: its stored vector",
                            part.value,
                            image_id,
                        )
                        part = QueryPart.indexed(image_id, part.weight)
                parts.append(part)
        return Query(parts)

    def _daemon_may_answer(self, model: str | None) -> bool:
        if not self.ask_daemon:
            return False
        if model is not None:
            log.info("daemon: not asked (--model names a model: it is loaded here)")
            return False
        if not self.torch_free:
            log.info("daemon: not asked (--device names an accelerator: the model runs here)")
            return False
        return True

    def similar(
        self,
        target: str | Path | int,
        top: int = 20,
        filters: PhotoFilter | None = None,
        threshold: float | None = None,
    ) -> Answer:
        """Photos like ``target`` (a library id or a photo file), best first, the photo itself included.

        An indexed photo (or a copy of one) is a query by its stored embedding: no model, no torch,
        and a running daemon may answer. A file the library does not know is encoded by the model.
        """
        with self.lock:
            library = self.library()
            model_id = library.require_default_model()
            image_id = resolve_photo(library, target)
            name = library.model_name(model_id)
            if image_id is not None and library.has_embedding(image_id, model_id):
                log.info("similar: photo #%d is in the library: its stored vector of %s", image_id, name)
                query = Query([QueryPart.indexed(image_id)])
            elif Path(str(target)).expanduser().is_file():
                log.info("similar: %s has no vector of %s in the library: the file is encoded", target, name)
                query = Query.build(image=Path(str(target)).expanduser())
            else:
                raise QueryError(f"photo #{image_id} has no embedding of {name}: index it again")
        answer = self.run(query, top, filters, threshold)
        # The photo itself first: an identical copy ties with it at 1.0 and may come back before it.
        answer.hits.sort(key=lambda h: h.image_id != image_id)  # stable: the rest keep their order
        return answer

    def close(self) -> None:
        """Close the library (a later call opens it again)."""
        with self.lock:
            if self._library is not None:
                self._library.close()
                self._library = None
            self._indexes.clear()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_MODEL_LOAD_TRIES = 3  # another query may swap the warm searcher's one model between two tries


class _ModelNeeded(Exception):
    """Raised inside :meth:`Searcher.run`'s lock when the query needs a model the warm searcher
    does not hold yet; ``run`` loads it outside the lock and tries again."""

    def __init__(self, source: str):
        super().__init__(source)
        self.source = source


def _file_identity(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
