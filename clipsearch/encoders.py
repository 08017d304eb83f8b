"""How a query is encoded: the one place that chooses between the ways, and says which it took.

A query's parts become vectors in one of three ways, cheapest first:

- an *indexed* part (a photo already in the library) is its stored vector, a *vector* part (made
  earlier, e.g. of an uploaded picture) is itself: no model at all;
- *text* parts go through the model's torch-free text encoder (:mod:`clipsearch.fastquery`: BPE
  table, text tower in numpy, features cached per exact text), once it has been exported;
- otherwise, and for *image* files, the model is loaded in torch (:class:`ModelEncoder`); after a
  query that needed it, its text tower is exported so the next text query need not.

:func:`choose` picks the encoder for a query and logs which and why (``clipsearch query --verbose``
prints it); :func:`encode` turns the query into one vector with it. The one caller is
:class:`clipsearch.search.Searcher` (a warm one, in the daemon and the web interface, hands
``choose`` the text encoder it keeps loaded).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from clipsearch.errors import LibraryError, QueryError

if TYPE_CHECKING:  # numpy is imported where vectors are made: a client of `clipsearch serve` needs none
    import numpy as np

    from clipsearch.search import Query
    from clipsearch.store import Library

log = logging.getLogger(__name__)

# The names an answer reports (``Answer.encoder``), one per way a query can be encoded.
DAEMON = "daemon"
TORCH_FREE = "torch-free"
MODEL = "model"
STORED = "stored-vectors"


class QueryEncoder:
    """Texts and image files -> L2-normalised vectors ``float32 [N, D]`` of one model.

    ``name`` is one of :data:`TORCH_FREE`, :data:`MODEL`, :data:`STORED`. The base class encodes
    neither (a query of stored vectors only needs none).
    """

    name = STORED

    def __init__(self, model_id: str):
        self.model_id = model_id

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        raise QueryError("this encoder has no text tower")  # choose() never pairs them

    def images(self, paths: Sequence[str]) -> np.ndarray:
        raise QueryError("image parts need the model loaded (choose() loads it for them)")


class ExportedTextEncoder(QueryEncoder):
    """Text through the model's torch-free export (:class:`clipsearch.fastquery.TextEncoder`).

    Raises :class:`clipsearch.fastquery.TextEncoderMissing` when the model was never exported.
    ``warm=True`` (the daemon) keeps the export loaded and notices when it is replaced.
    """

    name = TORCH_FREE

    def __init__(self, model_id: str, *, warm: bool = False):
        from clipsearch import fastquery

        super().__init__(model_id)
        self.warm = warm
        # the daemon holds its own (replaced when the export is); a query process shares this process's
        self._held = fastquery.TextEncoder(model_id) if warm else fastquery.encoder(model_id)

    @property
    def directory(self) -> Path:
        """The folder of the export this encoder runs."""
        return self._held.directory

    def is_current(self) -> bool:
        """Whether the export this encoder loaded is still the one on disk (the daemon asks)."""
        from clipsearch import fastquery

        return self._held.stamp == fastquery._stamp(self._held.directory)

    def load(self) -> None:
        """Load what the first query would (the daemon and the web do it before they listen): one
        text through the tower pages its memory-mapped weights in."""
        self._held(["a photo"])

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        from clipsearch import fastquery

        return fastquery.text_features(self.model_id, list(texts), encode=self._held)


class ModelEncoder(QueryEncoder):
    """The model itself, in torch: any text, and image files after the model's preprocessing."""

    name = MODEL

    def __init__(self, bundle):
        super().__init__(bundle.model_id)
        self.bundle = bundle

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            tokens = self.bundle.tokenizer(list(texts)).to(self.bundle.model.device)
            feats = self.bundle.model.encode_text(tokens).float()  # [T, D]
            feats = feats / feats.norm(dim=-1, keepdim=True)
        return feats.cpu().numpy()

    def images(self, paths: Sequence[str]) -> np.ndarray:
        import torch

        model = self.bundle.model
        with torch.no_grad():
            pixels = torch.stack(
                [self.bundle.preprocess(_open_query_image(p)) for p in paths]
            )  # [I, 3, H, W]
            feats = model.encode_image(pixels.to(device=model.device, dtype=model.dtype)).float()  # [I, D]
            feats = feats / feats.norm(dim=-1, keepdim=True)
        return feats.cpu().numpy()

    def export_text(self) -> None:
        """Export the text tower for torch-free queries, unless done; a failure only costs speed."""
        export_text_encoder(self.bundle)


def export_text_encoder(bundle) -> None:
    """Export ``bundle``'s text tower for torch-free queries (seconds, once per model), unless done.

    Only speed depends on it, so a failure is a logged warning, not an error: text queries of
    this model keep loading it.
    """
    from clipsearch import fastquery

    try:
        fastquery.ensure_text_encoder(bundle)
    except Exception as e:  # speed only: the photos are indexed, queries load the model instead
        first = str(e).splitlines()[0][:160] if str(e) else ""
        log.warning(
            "no fast text encoder for %s (%s: %s); text queries will load the model (slower)",
            bundle.name,
            type(e).__name__,
            first,
        )


def _open_query_image(path: str):
    from clipsearch.errors import ImageDecodeError
    from clipsearch.imageio import open_image
    from clipsearch.walk import why_not_a_file

    p = Path(path).expanduser()
    why = why_not_a_file(p)
    if why is not None:
        raise QueryError(f"query image {path}: {why}")
    try:
        return open_image(p)
    except ImageDecodeError as e:
        raise QueryError(f"cannot read the query image {path}: {e.reason}") from e


# (model source, the library) -> bundle: clipsearch.search.Searcher.model
LoadModel = Callable[[str, "Library"], object]
# (lazy bundle, ONNX backend name) -> the image encoder running that export: a warm Searcher keeps it
ImageExport = Callable[[object, str], Callable]


def make_image_export(bundle, backend: str):
    """The image encoder running ``bundle``'s ``backend`` export (an ONNX session: built per call)."""
    from clipsearch import backends

    return backends.make_image_encoder(bundle, backend)


def choose(
    library: Library,
    query: Query,
    *,
    load_model: LoadModel,
    model: str | None = None,
    torch_free: bool = True,
    text_encoder: Callable[[str], ExportedTextEncoder] = ExportedTextEncoder,
    image_export: ImageExport = make_image_export,
) -> QueryEncoder:
    """The encoder for ``query`` on ``library``, cheapest first (see the module doc); logs which and why.

    ``model``: a model source the user named (``--model``): it is loaded in torch. Otherwise the
    library's own model (:meth:`Library.default_model_id`) answers. ``load_model(source, library)``
    loads a bundle. ``torch_free=False`` (an accelerator named with ``--device``) runs the model even
    for text. ``text_encoder(model_id)`` gives the torch-free one, ``image_export(bundle, backend)``
    the ONNX image encoder (a warm caller keeps both loaded).
    """
    if model is not None:
        log.info("encoder: the model %s in torch (named with --model)", model)
        return ModelEncoder(load_model(model, library))
    model_id = library.require_default_model()
    name = library.model_name(model_id)
    kinds = {p.kind for p in query.parts}
    if "image" in kinds:
        return for_images(
            library,
            load_model=load_model,
            torch_free=torch_free,
            texts="text" in kinds,
            text_encoder=text_encoder,
            image_export=image_export,
        )
    if "text" not in kinds:
        log.info("encoder: none (every part is a stored vector of %s)", name)
        return QueryEncoder(model_id)
    return for_texts(library, load_model=load_model, torch_free=torch_free, text_encoder=text_encoder)


def for_texts(
    library: Library,
    *,
    load_model: LoadModel,
    torch_free: bool = True,
    text_encoder: Callable[[str], ExportedTextEncoder] = ExportedTextEncoder,
) -> QueryEncoder:
    """The text encoder of ``library``'s own model: its torch-free export when there is one (and
    ``torch_free``), else the model loaded in torch (``load_model``, as in :func:`choose`). Logs which
    and why. Queries and zero-shot labels (``clipsearch label``) both come here."""
    model_id = library.require_default_model()
    name = library.model_name(model_id)
    if not torch_free:
        log.info("encoder: the model %s in torch (a device was named with --device)", name)
        return ModelEncoder(load_model(library.model_source(model_id), library))
    from clipsearch import fastquery

    try:
        encoder = text_encoder(model_id)
    except fastquery.TextEncoderMissing:
        why = f"no torch-free export of {name} yet; it is made after this query"
    except ImportError as e:  # a broken numpy/faiss install: the model still answers
        why = f"the torch-free path cannot import {e.name or e}"
    else:
        log.info("encoder: torch-free text tower of %s (its export is in %s)", name, encoder.directory)
        return encoder
    log.info("encoder: the model %s in torch (%s)", name, why)
    return ModelEncoder(load_model(library.model_source(model_id), library))


class ExportedImageEncoder(QueryEncoder):
    """Image files through the model's ONNX export (the backend its verdict chose), texts through
    ``texts`` (another :class:`QueryEncoder`): no torch when both are exports."""

    name = TORCH_FREE

    def __init__(self, model_id: str, preprocess_cfg, image_encoder, texts: QueryEncoder | None = None):
        from clipsearch.transform import image_transform

        super().__init__(model_id)
        self._transform = image_transform(preprocess_cfg)
        self._images = image_encoder
        self._texts = texts

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        if self._texts is None:
            return super().texts(texts)
        return self._texts.texts(texts)

    def images(self, paths: Sequence[str]) -> np.ndarray:
        import numpy as np

        pixels = np.stack([self._transform.array(_open_query_image(p)) for p in paths])  # [I, 3, H, W]
        feats = self._images(pixels)  # [I, D]
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def for_images(
    library: Library,
    *,
    load_model: LoadModel,
    torch_free: bool = True,
    texts: bool = False,
    text_encoder: Callable[[str], ExportedTextEncoder] = ExportedTextEncoder,
    image_export: ImageExport = make_image_export,
) -> QueryEncoder:
    """The encoder of ``library``'s own model for image files (and texts when ``texts``): its ONNX
    image export (run by ``image_export``) when the model's backend verdict on this machine chose
    one (and ``torch_free``), else the model in torch. Logs which and why."""
    model_id = library.require_default_model()
    name = library.model_name(model_id)
    source = library.model_source(model_id)
    why = "a device was named with --device"
    if torch_free:
        from clipsearch import backends
        from clipsearch.checkpoints import LazyBundle, open_bundle
        from clipsearch.errors import ClipsearchError

        try:
            bundle = open_bundle(source, "cpu", library=library, load=lambda on: load_model(source, library))
        except ClipsearchError as e:
            bundle, why = None, f"its model cannot be opened without torch: {e}"
        if isinstance(bundle, LazyBundle):
            chosen = backends.cached_choice(bundle)
            if chosen is not None and chosen.startswith("onnx-"):
                try:
                    images = image_export(bundle, chosen)
                except backends.BackendError as e:
                    why = f"its {chosen} export does not run here ({e})"
                else:
                    words = None
                    if texts:
                        words = for_texts(library, load_model=load_model, text_encoder=text_encoder)
                    log.info("encoder: image files through the %s export of %s", chosen, name)
                    return ExportedImageEncoder(model_id, bundle.preprocess_cfg, images, words)
            else:
                why = f"its backend verdict here is {chosen or 'not measured yet'}, not ONNX"
        elif (
            bundle is not None
        ):  # loaded already: a GPU, a download, an architecture known from its weights only
            log.info(
                "encoder: the model %s in torch (the query has image files; it opens only in torch)", name
            )
            return ModelEncoder(bundle)
    log.info("encoder: the model %s in torch (the query has image files; %s)", name, why)
    return ModelEncoder(load_model(source, library))


def encode(query: Query, encoder: QueryEncoder, library: Library) -> np.ndarray:
    """The query's vector ``float32 [D]``: the normalised weighted sum of its parts' normalised vectors.

    Indexed parts read their stored vector of ``encoder.model_id`` from ``library``; vector parts
    are their own vector.
    """
    import numpy as np

    query.check()
    vectors: dict[int, np.ndarray] = {}
    texts = [i for i, p in enumerate(query.parts) if p.kind == "text"]
    images = [i for i, p in enumerate(query.parts) if p.kind == "image"]
    if texts:
        for i, v in zip(texts, encoder.texts([query.parts[i].value for i in texts]), strict=True):
            vectors[i] = v
    if images:
        for i, v in zip(images, encoder.images([query.parts[i].value for i in images]), strict=True):
            vectors[i] = v
    for i, p in enumerate(query.parts):
        if p.kind == "indexed":
            stored = library.embedding(p.image_id, encoder.model_id)
            if stored is None:
                raise LibraryError(
                    f"photo #{p.image_id} has no embedding of {library.model_name(encoder.model_id)} in {library.path}: "
                    "index it with that model first"
                )
            vectors[i] = stored
        elif p.kind == "vector":
            vectors[i] = np.asarray(p.vector, dtype=np.float32)
    return query.combine([vectors[i] for i in range(len(query.parts))])
