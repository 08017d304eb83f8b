"""The text query path without PyTorch: ONNX text tower, tokenizer straight to numpy, FAISS.

``import torch`` alone costs 1.5-1.8 s on a small CPU, three times the whole budget of a query. So the
text tower is exported to ONNX once per model (:func:`ensure_text_encoder`, at index time or the first
query that has the model loaded anyway), and a query process then needs only ``tokenizers``,
``onnxruntime``, ``faiss`` and ``sqlite3``:

1. tokenise with the model's own BPE (saved beside the export as ``tokenizer.json``, the same ids
   as :class:`clipsearch.tokenizer.Tokenizer`) into an int64 array cut after the batch's last
   end-of-text token: the graph has a free sequence length, so a 3-word query runs 5 positions, not 77;
2. run the exported tower in ONNX Runtime and L2-normalise;
3. search the memory-mapped FAISS index (:class:`clipsearch.vectors.VectorIndex`).

Repeated queries skip steps 1-2: features are cached per (model, exact text) in a small SQLite file
beside the export, so they do not even load the ONNX model. Nothing here imports torch, and
onnxruntime/faiss are imported only when needed.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipsearch.backends import atomic_path, cache_dir
from clipsearch.errors import ClipsearchError, LibraryError

TEXT_ONNX = "text-fp32.onnx"
TEXT_META = "text.json"  # written last: its presence means the export is complete
TEXT_TOKENIZER = "tokenizer.json"
TEXT_CACHE = "text-cache.sqlite"
_FORMAT = "clipsearch-text-onnx"
_VERSION = 1


class TextEncoderMissing(ClipsearchError):
    """No ONNX text encoder has been exported for this model yet (load the model once to export it)."""


# --------------------------------------------------------------------------------------------------
# Export (needs torch: runs where the model is loaded anyway)


def ensure_text_encoder(bundle) -> Path:
    """Export ``bundle``'s text tower and tokenizer for torch-free queries, unless already done.

    Writes ``text-fp32.onnx``, ``tokenizer.json`` and ``text.json`` under
    :func:`clipsearch.backends.cache_dir` of ``bundle.model_id``, each atomically, the JSON last.
    Returns the ONNX file's path. Takes a few seconds for ViT-B/32; later calls only check a file.
    """
    directory = cache_dir(bundle.model_id)
    onnx_path = directory / TEXT_ONNX
    if _read_meta(directory, bundle.model_id) is not None and onnx_path.is_file():
        return onnx_path
    import copy

    import torch

    from clipsearch.backends import export_onnx

    model = bundle.model
    if model.dtype != torch.float32 or next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()
    tower = _text_tower_class()(model).eval()
    tok = bundle.tokenizer
    example = torch.tensor([[tok.sot_token_id, 320, 1929, tok.eot_token_id]] * 2)  # [B, n]
    (directory / TEXT_META).unlink(missing_ok=True)  # incomplete until the new one is written
    (directory / TEXT_CACHE).unlink(missing_ok=True)  # features of an older export must not be served
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".export-") as work:
        single = Path(work) / "single.onnx"  # the exporter writes graph and weights in one file
        export_onnx(
            tower,
            (example,),
            single,
            ["tokens"],
            ["features"],
            {"tokens": {0: "batch", 1: "length"}, "features": {0: "batch"}},
        )
        _split_weights(single, onnx_path)
    with atomic_path(directory / TEXT_TOKENIZER) as tmp:
        tok._tk.save(str(tmp))  # the BPE as built in memory: OpenAI's or a trained one, same ids
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "model_id": bundle.model_id,
        "context_length": int(tok.context_length),
        "sot_token_id": int(tok.sot_token_id),
        "eot_token_id": int(tok.eot_token_id),
        "dim": int(model.text_projection.shape[1]),
    }
    with atomic_path(directory / TEXT_META) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    _session_at.cache_clear()  # a re-export in this process replaces the files under a loaded session
    _tokenizer_at.cache_clear()
    return onnx_path


def _split_weights(source: Path, target: Path) -> None:
    """Rewrite ``source`` as ``target`` + ``target.data``: the graph, and the weights beside it.

    ONNX Runtime memory-maps weights kept in a separate file instead of parsing them out of the
    protobuf, which cuts the text tower's load time from ~0.6 to ~0.2 s of CPU (it dominates a query).
    """
    import onnx

    model = onnx.load(str(source))
    data_name = target.name + ".data"
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".export-") as work:
        onnx.save_model(
            model,
            str(Path(work) / target.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        umask = os.umask(0)
        os.umask(umask)
        for name in (data_name, target.name):  # the weights first, then the graph that names them
            os.chmod(Path(work) / name, 0o666 & ~umask)
            os.replace(Path(work) / name, target.parent / name)


def _text_tower_class():
    import torch

    class TextTower(torch.nn.Module):
        """``encode_text`` on tokens already cut after the last end-of-text (the cut is done in numpy).

        The model's own cut reads a token value (``argmax``) to pick a length, which a traced graph
        would freeze to the example's length; here the length is the input's, free in the graph.
        """

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens):  # [B, n] int64 -> [B, D]
            cut = self.model._eot_cut
            self.model._eot_cut = False
            try:
                return self.model.encode_text(tokens)
            finally:
                self.model._eot_cut = cut

    return TextTower


# --------------------------------------------------------------------------------------------------
# Query time (no torch)


def _read_meta(directory: Path, model_id: str) -> dict | None:
    try:
        meta = json.loads((directory / TEXT_META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        return None
    if meta.get("model_id") != model_id:
        return None
    return meta


def _meta(model_id: str) -> dict:
    meta = _read_meta(cache_dir(model_id), model_id)
    if meta is None:
        raise TextEncoderMissing(
            f"no fast text encoder for model {model_id!r} yet; it is exported when the model is loaded "
            "(index with it, or run one query with the model loaded)"
        )
    return meta


def _tokenizer(model_id: str):
    return _tokenizer_at(model_id, str(cache_dir(model_id)))


def _session(model_id: str):
    return _session_at(model_id, str(cache_dir(model_id)))


@functools.cache  # per directory too: a test, or a changed $CLIPSEARCH_HOME, must not reuse another's
def _tokenizer_at(model_id: str, directory: str):
    """The model's tokenizer from its saved ``tokenizer.json`` (clean-up and special-token handling
    are :class:`clipsearch.tokenizer.Tokenizer`'s; that module imports no torch)."""
    from tokenizers import Tokenizer as Backend

    from clipsearch.tokenizer import Tokenizer

    meta = _meta(model_id)
    backend = Backend.from_file(str(Path(directory) / TEXT_TOKENIZER))
    tok = Tokenizer(meta["context_length"], _backend=backend)
    if (tok.sot_token_id, tok.eot_token_id) != (meta["sot_token_id"], meta["eot_token_id"]):
        raise TextEncoderMissing(
            f"the saved tokenizer of {model_id!r} does not match its export; delete {cache_dir(model_id)}"
        )
    return tok


@functools.cache
def _session_at(model_id: str, directory: str):
    from clipsearch.backends import ort_session

    _meta(model_id)
    return ort_session(Path(directory) / TEXT_ONNX, quick_start=True)


def tokenize(model_id: str, texts: Sequence[str]) -> np.ndarray:
    """Token ids ``int64 [N, n]``: start, tokens, end, zeros; ``n`` is the longest row (<= context).

    Rows equal :class:`clipsearch.tokenizer.Tokenizer`'s output cut after the batch's last end-of-text.
    """
    tok = _tokenizer(model_id)
    length = tok.context_length
    rows = [
        [tok.sot_token_id, *ids[: length - 2], tok.eot_token_id] for ids in _encode_texts(tok, list(texts))
    ]
    out = np.zeros((len(rows), max((len(r) for r in rows), default=2)), np.int64)  # [N, n]
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


# printable ASCII and the whitespace split() removes, without "&" (no HTML entity possible)
_PLAIN = frozenset(map(chr, range(0x20, 0x7F))) - {"&"} | {"\t", "\n", "\r"}


def _encode_texts(tok, texts: list[str]) -> list[list[int]]:
    """``tok.encode_batch(texts)``, skipping ftfy (0.1 s to import) where it cannot change anything.

    On printable ASCII without ``&`` (most typed queries), ftfy's fixes (mojibake, curly quotes,
    ligatures, control characters) and HTML unescaping are the identity, so the clean-up is the
    whitespace collapse and lower-casing alone; the split into words and the merges are the
    Tokenizer's own. Tests check the ids equal ``Tokenizer``'s on such texts and on others.
    """
    from clipsearch.tokenizer import _word_pattern

    if not all(set(t) <= _PLAIN for t in texts):
        return tok.encode_batch(texts)
    words = [_word_pattern().findall(" ".join(t.split()).lower()) for t in texts]
    return [e.ids for e in tok._tk.encode_batch(words, is_pretokenized=True, add_special_tokens=False)]


def _encode(model_id: str, texts: list[str]) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # parse the tokenizer while ONNX Runtime maps the model
        session = pool.submit(_session, model_id)
        tokens = tokenize(model_id, texts)  # [N, n]
        session = session.result()
    return session.run(None, {"tokens": tokens})[0].astype(np.float32, copy=False)  # [N, D]


class _TextCache:
    """Unnormalised text features by exact text, in ``text-cache.sqlite`` beside the export."""

    def __init__(self, model_id: str):
        self.path = cache_dir(model_id) / TEXT_CACHE

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=2)
        conn.execute("CREATE TABLE IF NOT EXISTS features (text TEXT PRIMARY KEY, vector BLOB NOT NULL)")
        return conn

    def get(self, texts: list[str]) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        found = {}
        with self._connect() as conn:
            for text in set(texts):
                row = conn.execute("SELECT vector FROM features WHERE text = ?", (text,)).fetchone()
                if row is not None:
                    found[text] = np.frombuffer(row[0], dtype=np.float32)
        return found

    def put(self, items: dict[str, np.ndarray]) -> None:
        rows = [(t, np.ascontiguousarray(v, np.float32).tobytes()) for t, v in items.items()]
        with self._connect() as conn:
            conn.executemany("INSERT OR REPLACE INTO features (text, vector) VALUES (?, ?)", rows)


def text_features(
    model_id: str, texts: Sequence[str], *, normalize: bool = True, cache: bool = True
) -> np.ndarray:
    """Text features ``float32 [N, D]`` of ``texts`` for ``model_id``, without importing torch.

    L2-normalised unless ``normalize=False`` (then equal to ``model.encode_text``). Needs a prior
    :func:`ensure_text_encoder` for the model (else :class:`TextEncoderMissing`). With ``cache``, texts
    seen before are read from the on-disk cache and new ones are added to it.
    """
    texts = [str(t) for t in ([texts] if isinstance(texts, str) else texts)]
    meta = _meta(model_id)
    if not texts:
        return np.zeros((0, meta["dim"]), np.float32)
    store = _TextCache(model_id) if cache else None
    known: dict[str, np.ndarray] = {}
    if store is not None:
        try:
            known = store.get(texts)
        except sqlite3.Error:
            known = {}  # an unreadable cache only costs speed: compute everything, rewrite below
    todo = list(dict.fromkeys(t for t in texts if t not in known))
    if todo:
        fresh = dict(zip(todo, _encode(model_id, todo), strict=True))
        known.update(fresh)
        if store is not None:
            try:
                store.put(fresh)
            except sqlite3.Error:
                pass  # a read-only or busy cache only costs speed next time; the features are right
    out = np.stack([known[t] for t in texts]).astype(np.float32)  # [N, D]
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def encode_query(model_id: str, query) -> np.ndarray:
    """The normalised vector ``float32 [D]`` of a text-only :class:`clipsearch.search.Query`.

    The same weighted sum of normalised part vectors as :func:`clipsearch.search.encode_query`.
    """
    from clipsearch.search import QueryError

    parts = list(query.parts)
    if not parts:
        raise QueryError("empty query: give a text, --image PATH, --add or --add-image")
    for p in parts:
        if p.kind != "text":
            raise QueryError("the fast query path takes text only; image parts need the model loaded")
        if not p.value.strip():
            raise QueryError("empty query text")
    feats = text_features(model_id, [p.value for p in parts])  # [P, D], normalised
    total = sum(p.weight * f for p, f in zip(parts, feats.astype(np.float64), strict=True))
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise QueryError(f"the query parts cancel out ({query.describe()}): change the weights")
    return (total / norm).astype(np.float32)


def search(
    library,
    model_id: str,
    query,
    top: int = 20,
    under: Path | str | None = None,
    threshold: float | None = None,
    index_kind: str = "auto",
):
    """:func:`clipsearch.search.search` for text-only queries, given a model id instead of a bundle.

    Returns ``list[clipsearch.search.Hit]``, best first. Raises :class:`TextEncoderMissing` when the
    model has not been exported yet (the caller then loads it, calls :func:`ensure_text_encoder`, and
    may fall back to the regular path).
    """
    from clipsearch.search import Hit, QueryError
    from clipsearch.vectors import VectorIndex

    if top < 1:
        raise QueryError(f"--top must be at least 1, got {top}")
    if model_id not in library.model_ids():
        known = ", ".join(library.model_ids()) or "none"
        raise LibraryError(
            f"the library has no embeddings of model {model_id!r} (it has: {known}): "
            "index with that model first or leave out --model"
        )
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # open (or bring in step) the FAISS index while encoding the text
        pending = pool.submit(VectorIndex.for_library, library, model_id, kind=index_kind)
        q = encode_query(model_id, query)  # a query error wins; leaving the block waits for the index
        index = pending.result()
    allowed = library.image_ids_under(Path(under)) if under is not None else None
    if allowed is not None and not allowed:
        return []
    scores, ids = index.search(q[None, :], top, allowed_ids=allowed)
    pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
    if threshold is not None:
        pairs = [(s, i) for s, i in pairs if s >= threshold]
    paths = library.image_paths([i for _, i in pairs])
    return [Hit(paths[i], s, i) for s, i in pairs if i in paths]
