"""Search a library: a query (texts, image files, indexed photos, weighted) -> the closest photos.

A query is a weighted sum of parts. Each part becomes an L2-normalised vector (a text through the
text tower, an image file through the image tower after the model's preprocessing, an indexed photo
as its stored vector); the parts are summed with their weights (a negative weight subtracts, e.g.
``"beach" --minus "people"``) and the sum is normalised again. Photos are ranked by cosine
similarity through the library's FAISS index, within the ids a
:class:`clipsearch.filters.PhotoFilter` allows.

The route goes one way down::

    run()  --(a daemon serves this library?)-->  clipsearch.serve.ask  -> the daemon's search()
      |  no: open the library
      v
    search()  ->  clipsearch.encoders (choose, encode)  ->  clipsearch.vectors (FAISS)

:func:`run` is what a command calls (``clipsearch query``, the web interface); :func:`search` is
the same on an open library with a chosen encoder (the daemon calls it with its warm one). Which
way answered is logged (``--verbose``) and returned in :class:`Answer`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipsearch.errors import ClipsearchError, LibraryError
from clipsearch.filters import PhotoFilter

if TYPE_CHECKING:  # numpy is imported where vectors are made: a client of `clipsearch serve` needs none
    import numpy as np

    from clipsearch.encoders import QueryEncoder
    from clipsearch.store import Library

log = logging.getLogger(__name__)

PART_KINDS = ("text", "image", "indexed")


class QueryError(ClipsearchError):
    """A query that cannot be run: empty, an unreadable query image, parts that cancel out."""


@dataclass(frozen=True)
class QueryPart:
    """One term of a query, with a weight: ``kind`` is ``"text"``, ``"image"`` (``value`` a file
    to encode) or ``"indexed"`` (``value`` the decimal id of a photo in the library: its stored
    vector, no model needed; make one with :meth:`indexed`)."""

    kind: str
    value: str
    weight: float = 1.0

    @classmethod
    def indexed(cls, image_id: int, weight: float = 1.0) -> QueryPart:
        return cls("indexed", str(int(image_id)), weight)

    @property
    def image_id(self) -> int:
        """The library id of an ``indexed`` part."""
        return int(self.value)

    def describe(self) -> str:
        sign = "-" if self.weight < 0 else "+"
        w = abs(self.weight)
        scale = "" if w == 1.0 else f"{w:g}*"
        what = {"text": repr(self.value), "image": f"image:{self.value}"}.get(
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
    ``model`` or ``stored-vectors`` (:mod:`clipsearch.encoders`)."""

    hits: list[Hit]
    encoder: str


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
    (the query daemon keeps one); by default it is opened here, while the query is encoded.
    """
    from concurrent.futures import ThreadPoolExecutor

    from clipsearch.encoders import encode
    from clipsearch.vectors import VectorIndex

    if top < 1:
        raise QueryError(f"--top must be at least 1, got {top}")
    model_id = encoder.model_id
    _check_model(library, model_id)
    query.check()
    if index is None:
        with ThreadPoolExecutor(1) as pool:  # open (or bring in step) the FAISS index meanwhile
            pending = pool.submit(VectorIndex.for_library, library, model_id, kind=index_kind)
            q = encode(query, encoder, library)  # a query error wins; leaving waits for the index anyway
            index = pending.result()
    else:
        q = encode(query, encoder, library)
    return search_vector(library, index, q, top, threshold, filters)


def _check_model(library, model_id: str) -> None:
    if model_id not in library.model_ids():
        known = ", ".join(library.model_ids()) or "none"
        raise LibraryError(
            f"the library has no embeddings of model {model_id!r} (it has: {known}): "
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
    from clipsearch.indexer import read_and_hash

    text = str(target)
    p = Path(text).expanduser()
    if not p.exists() and text.isdigit():
        image_id = int(text)
        if not library.image_paths([image_id]):
            raise QueryError(f"no photo with id {image_id} in the library (ids are in `query --json`)")
        return image_id
    if not p.is_file():
        raise QueryError(f"no such photo: {text} (give a file or a library id)")
    found = library.image_at(p)
    if found is not None:
        return found.id
    try:
        with open(p, "rb") as f:
            digest, _ = read_and_hash(f.fileno(), keep=False)
    except OSError as e:
        raise QueryError(f"cannot read {text}: {e.strerror}") from e
    same = library.image_ids_with_hash(digest)
    return same[0] if same else None


def similar(
    library,
    target: str | Path | int,
    model_id: str,
    top: int = 20,
    threshold: float | None = None,
    filters: PhotoFilter | None = None,
    *,
    encode_image: Callable[[Path], np.ndarray] | None = None,
    index=None,
) -> list[Hit]:
    """Photos like ``target`` (a library id or a photo file), best first, the photo itself included.

    An indexed photo (or a copy of one) is searched with its stored embedding of ``model_id``: no
    model is loaded and PyTorch is never imported. A file the library does not know is encoded by
    ``encode_image(path) -> float32 [D]`` (normalised); without one, :class:`QueryError`.
    """
    import numpy as np

    from clipsearch.vectors import VectorIndex

    if top < 1:
        raise QueryError(f"--top must be at least 1, got {top}")
    _check_model(library, model_id)
    image_id = resolve_photo(library, target)
    stored = library.embedding(image_id, model_id) if image_id is not None else None
    if stored is not None:
        log.info("similar: the stored embedding of photo %d", image_id)
        q = np.asarray(stored, dtype=np.float32)  # [D]
    elif encode_image is not None:
        log.info("similar: %s is not indexed with %s; encoding it", target, model_id)
        q = encode_image(Path(str(target)).expanduser())
    else:
        raise QueryError(f"{target} is not indexed with {model_id}: index it, or pass an encoder")
    if index is None:
        index = VectorIndex.for_library(library, model_id)
    return search_vector(library, index, q, top, threshold, filters)


def run(
    library_path: Path | str | None,
    query: Query,
    top: int = 20,
    filters: PhotoFilter | None = None,
    threshold: float | None = None,
    index_kind: str = "auto",
    *,
    model: str | None = None,
    load_model: Callable[[str, Library], object] | None = None,
    device: str = "auto",
    daemon: bool = True,
) -> Answer:
    """Answer ``query`` on the library at ``library_path`` (None: the default one), the cheapest way.

    A running ``clipsearch serve`` for the library answers when it can (no ``model`` named, no
    image files, no accelerator ``device`` named); otherwise the library is opened and
    :func:`search` runs with the encoder :func:`clipsearch.encoders.choose` picks. After the model
    had to be loaded for the library's own model, its text tower is exported so the next text query
    needs no torch. ``load_model(source, library) -> bundle`` loads a model (the CLI's shows a download bar
    and puts it on ``device``).
    """
    from clipsearch import encoders
    from clipsearch.store import Library

    query.check()
    torch_free = device in ("auto", "cpu")  # a GPU named explicitly runs the model there
    if daemon and model is None and torch_free:
        from clipsearch import serve

        hits = serve.ask(library_path, query, top, filters, threshold, index_kind)
        if hits is not None:
            return Answer(hits, encoders.DAEMON)
    with Library.open(library_path) as library:
        encoder = encoders.choose(library, query, model=model, load_model=load_model, torch_free=torch_free)
        hits = search(library, encoder, query, top, filters, threshold, index_kind)
    if isinstance(encoder, encoders.ModelEncoder) and model is None:
        encoder.export_text()  # so the next text query can skip torch
    return Answer(hits, encoder.name)
