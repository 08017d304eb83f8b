"""Search a library: a query (text, images, or a weighted mix of both) -> the closest photos.

A query is a weighted sum of parts. Each part is encoded by the model (text by the text tower only,
an image by the image tower after the model's own preprocessing) and L2-normalised; the parts are
summed with their weights (a negative weight subtracts, e.g. ``"beach" --minus "people"``) and the
sum is normalised again. Photos are ranked by cosine similarity through the library's FAISS index.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipsearch.errors import ClipsearchError, LibraryError
from clipsearch.filters import PhotoFilter

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # numpy is imported where vectors are made: a client of `clipsearch serve` needs none
    import numpy as np


class QueryError(ClipsearchError):
    """A query that cannot be run: empty, an unreadable query image, parts that cancel out."""


@dataclass(frozen=True)
class QueryPart:
    """One term of a query: ``kind`` is ``"text"`` or ``"image"`` (a file path), with a weight."""

    kind: str
    value: str
    weight: float = 1.0

    def describe(self) -> str:
        sign = "-" if self.weight < 0 else "+"
        w = abs(self.weight)
        scale = "" if w == 1.0 else f"{w:g}*"
        what = repr(self.value) if self.kind == "text" else f"image:{self.value}"
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
            if p.kind not in ("text", "image"):
                raise QueryError(f"unknown query part kind {p.kind!r}")
            if p.kind == "text" and not p.value.strip():
                raise QueryError("empty query text")

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


def encode_query(bundle, query: Query) -> np.ndarray:
    """The normalised query vector ``float32 [D]``: the weighted sum of normalised part vectors."""
    import torch

    query.check()
    model = bundle.model
    device = model.device
    texts = [p for p in query.parts if p.kind == "text"]
    images = [p for p in query.parts if p.kind == "image"]
    vectors: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        if texts:
            tokens = bundle.tokenizer([p.value for p in texts]).to(device)
            feats = model.encode_text(tokens).float()  # [T, D]
            for p, f in zip(texts, feats, strict=True):
                vectors[id(p)] = f / f.norm()
        if images:
            preprocess = bundle.preprocess
            pixels = torch.stack([preprocess(_open_query_image(p.value)) for p in images])  # [I, 3, H, W]
            feats = model.encode_image(pixels.to(device=device, dtype=model.dtype)).float()  # [I, D]
            for p, f in zip(images, feats, strict=True):
                vectors[id(p)] = f / f.norm()
    return query.combine([vectors[id(p)].cpu().numpy() for p in query.parts])


def search(
    library,
    bundle,
    query: Query,
    top: int = 20,
    under: Path | str | None = None,
    threshold: float | None = None,
    index_kind: str = "auto",
    *,
    model_id: str | None = None,
    encode: Callable[[Query], np.ndarray] | None = None,
    index=None,
    filters: PhotoFilter | None = None,
) -> list[Hit]:
    """The ``top`` photos closest to ``query`` (cosine similarity, best first).

    ``under`` keeps photos in that folder's subtree (matched literally); ``filters`` keeps those
    passing a :class:`clipsearch.filters.PhotoFilter`, inside the vector search (the ``top`` best
    of the photos that pass); ``threshold`` keeps hits scoring at least that much. Uses the
    library's embeddings of ``bundle.model_id``.

    ``encode(query) -> float32 [D]`` (normalised) replaces :func:`encode_query` on ``bundle``, e.g.
    :func:`clipsearch.fastquery.encode_query` without torch; ``model_id`` then names the embeddings
    (``bundle`` may be None). ``index``: an open :class:`clipsearch.vectors.VectorIndex` of them in
    step with the library (the query daemon keeps one); by default it is opened here, while the
    query is encoded.
    """
    from concurrent.futures import ThreadPoolExecutor

    from clipsearch.vectors import VectorIndex

    if top < 1:
        raise QueryError(f"--top must be at least 1, got {top}")
    model_id = model_id or bundle.model_id
    if encode is None:
        encode = functools.partial(encode_query, bundle)
    _check_model(library, model_id)
    if index is None:
        with ThreadPoolExecutor(1) as pool:  # open (or bring in step) the FAISS index meanwhile
            pending = pool.submit(VectorIndex.for_library, library, model_id, kind=index_kind)
            q = encode(query)  # a query error wins; leaving the block waits for the index anyway
            index = pending.result()
    else:
        q = encode(query)
    return search_vector(library, index, q, top, threshold, (filters or PhotoFilter()).with_under(under))


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
        logger.info("similar: the stored embedding of photo %d", image_id)
        q = np.asarray(stored, dtype=np.float32)  # [D]
    elif encode_image is not None:
        logger.info("similar: %s is not indexed with %s; encoding it", target, model_id)
        q = encode_image(Path(str(target)).expanduser())
    else:
        raise QueryError(f"{target} is not indexed with {model_id}: index it, or pass an encoder")
    if index is None:
        index = VectorIndex.for_library(library, model_id)
    return search_vector(library, index, q, top, threshold, filters)


def _open_query_image(path: str):
    from clipsearch.errors import ImageDecodeError
    from clipsearch.imageio import open_image

    p = Path(path).expanduser()
    if not p.is_file():
        raise QueryError(f"query image not found: {path}")
    try:
        return open_image(p)
    except ImageDecodeError as e:
        raise QueryError(f"cannot read the query image {path}: {e.reason}") from e
