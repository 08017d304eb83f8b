"""The text query path without PyTorch: ONNX text tower, tokenizer straight to numpy, FAISS.

``import torch`` alone costs 1.5-1.8 s on a small CPU, three times the whole budget of a query. So the
text tower is exported to ONNX once per model (:func:`ensure_text_encoder`, at index time or the first
query that has the model loaded anyway), and a query process then needs only ``numpy``,
``faiss`` and ``sqlite3`` (and ``regex`` to split non-ASCII text):

1. tokenise with the model's own BPE (saved beside the export as a SQLite table that
   :class:`clipsearch.tokenizer.TableTokenizer` opens in ~1 ms; the same ids as
   :class:`clipsearch.tokenizer.Tokenizer`) into an int64 array cut after the batch's last
   end-of-text token: the graph has a free sequence length, so a 3-word query runs 5 positions, not 77;
2. run the exported tower and L2-normalise: a query process computes it in numpy on the export's
   memory-mapped weights (:class:`NumpyTextTower`: no onnxruntime import or session load, ~0.1 s
   of CPU saved); the daemon (:mod:`clipsearch.serve`) keeps an ONNX Runtime session, which also
   runs any model the numpy tower was not verified for at export;
3. search the memory-mapped FAISS index (:func:`clipsearch.search.search` with this module's encoder,
   which opens the index on another thread meanwhile).

Repeated queries skip steps 1-2: features are cached per (model, exact text) in a small SQLite file
beside the export, so they do not even load the text tower. Nothing here imports torch, and
onnxruntime/faiss are imported only when needed.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipsearch.atomic import atomic_path, commit
from clipsearch.errors import ClipsearchError
from clipsearch.paths import cache_dir
from clipsearch.store import TextFeatureCache

TEXT_ONNX = "text-fp32.onnx"
TEXT_META = "text.json"  # written last: its presence means the export is complete
TEXT_TOKENIZER = "tokenizer.sqlite"  # clipsearch.tokenizer.TableTokenizer: opens in ~1 ms
TEXT_CACHE = "text-cache.sqlite"
_FORMAT = "clipsearch-text-onnx"
_VERSION = 2  # 2: the tokenizer as a SQLite table (1 had tokenizer.json: 0.15 s to load)


class TextEncoderMissing(ClipsearchError):
    """No ONNX text encoder has been exported for this model yet (load the model once to export it)."""


# --------------------------------------------------------------------------------------------------
# Export (needs torch: runs where the model is loaded anyway)


def ensure_text_encoder(bundle) -> Path:
    """Export ``bundle``'s text tower and tokenizer for torch-free queries, unless already done.

    Writes ``text-fp32.onnx`` (+ ``.data``), ``tokenizer.sqlite`` and ``text.json`` under
    :func:`clipsearch.paths.cache_dir` of ``bundle.model_id``, each atomically, the JSON last.
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
    if model.dtype != torch.float32 or model.device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()
    tower = _text_tower_class()(model).eval()
    tok = bundle.tokenizer
    # ids the tokenizer itself makes, so they exist in a model trained with a small vocabulary
    words = (tok.encode("a photo of a dog") + [tok.eot_token_id] * 2)[:2]
    example = torch.tensor([[tok.sot_token_id, *words, tok.eot_token_id]] * 2)  # [B, n]
    (directory / TEXT_META).unlink(missing_ok=True)  # incomplete until the new one is written
    (directory / TEXT_CACHE).unlink(missing_ok=True)  # features of an older export must not be served
    (directory / "tokenizer.json").unlink(missing_ok=True)  # what version 1 exports had instead
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
    tok.save_table(directory / TEXT_TOKENIZER)  # the BPE as built in memory: OpenAI's or a trained one
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "model_id": bundle.model_id,
        "context_length": int(tok.context_length),
        "sot_token_id": int(tok.sot_token_id),
        "eot_token_id": int(tok.eot_token_id),
        "dim": int(model.text_projection.shape[1]),
        "numpy": _numpy_layout(model, onnx_path, example),  # None: this model runs in ONNX Runtime only
    }
    with atomic_path(directory / TEXT_META) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    _ENCODERS.clear()  # a re-export in this process replaces the files under a loaded session
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
            size_threshold=0,  # every weight in the .data file, where the numpy tower finds it too
        )
        for name in (data_name, target.name):  # the weights first, then the graph that names them
            commit(Path(work) / name, target.parent / name)


def _numpy_layout(model, onnx_path: Path, example) -> dict | None:
    """Where :class:`NumpyTextTower` finds each weight in the export's ``.data`` file, or None.

    The ONNX file's weights are the model's, some transposed and equal ones stored once; each of
    ours is found there by its content, so the numpy tower reads the same bytes as ONNX Runtime and
    costs no disk. None when a weight is not found as such or the architecture is not the one the
    tower computes: then queries run the graph in ONNX Runtime, as before. The tower is checked
    against the model on ``example`` before the layout is returned.
    """
    import hashlib
    import mmap

    import onnx
    import torch

    blocks = list(model.transformer.resblocks)
    acts = {type(b.mlp.gelu).__name__ for b in blocks}
    gelus = {getattr(b.mlp.gelu, "approximate", "none") for b in blocks}
    if len(acts) != 1 or acts - {"QuickGELU", "GELU"} or gelus != {"none"}:
        return None
    eps = {m.eps for b in blocks for m in (b.ln_1, b.ln_2)} | {model.ln_final.eps}
    if len(eps) != 1:
        return None
    wanted = {
        "token_embedding": model.token_embedding.weight,
        "positional_embedding": model.positional_embedding,
        "ln_final.weight": model.ln_final.weight,
        "ln_final.bias": model.ln_final.bias,
        "text_projection": model.text_projection,
    }
    for i, b in enumerate(blocks):
        wanted |= {
            f"{i}.ln_1.weight": b.ln_1.weight,
            f"{i}.ln_1.bias": b.ln_1.bias,
            f"{i}.in_proj.weight": b.attn.in_proj_weight,  # [3W, W]: x @ weight.T
            f"{i}.in_proj.bias": b.attn.in_proj_bias,
            f"{i}.out_proj.weight": b.attn.out_proj.weight,
            f"{i}.out_proj.bias": b.attn.out_proj.bias,
            f"{i}.ln_2.weight": b.ln_2.weight,
            f"{i}.ln_2.bias": b.ln_2.bias,
            f"{i}.c_fc.weight": b.mlp.c_fc.weight,
            f"{i}.c_fc.bias": b.mlp.c_fc.bias,
            f"{i}.c_proj.weight": b.mlp.c_proj.weight,
            f"{i}.c_proj.bias": b.mlp.c_proj.bias,
        }
    data_path = onnx_path.with_name(onnx_path.name + ".data")
    graph = onnx.load(str(onnx_path), load_external_data=False)
    stored = {}
    with (
        open(data_path, "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data,
        memoryview(data) as view,  # slices hashed in place: no copy of the 100 MB embedding
    ):
        for t in graph.graph.initializer:
            ext = {e.key: e.value for e in t.external_data}
            if t.data_type != onnx.TensorProto.FLOAT or ext.get("location") != data_path.name:
                continue
            offset, length = int(ext.get("offset", 0)), int(ext["length"])
            if offset % 4:
                continue
            stored[(tuple(t.dims), hashlib.sha256(view[offset : offset + length]).digest())] = offset
    tensors = {}
    for name, param in wanted.items():
        array = param.detach().float().cpu().numpy()
        for transposed, form in ((False, array), (True, array.T)):
            key = (form.shape, hashlib.sha256(np.ascontiguousarray(form)).digest())
            if key in stored:
                tensors[name] = [stored[key], list(form.shape), transposed]
                break
        else:
            return None
    layout = {
        "file": data_path.name,
        "layers": len(blocks),
        "heads": int(blocks[0].attn.num_heads),
        "act": acts.pop(),
        "eps": float(eps.pop()),
        "tensors": tensors,
    }
    with torch.no_grad():
        ref = model.encode_text(example).float().numpy()  # [B, D]
    ours = NumpyTextTower(onnx_path.parent, layout)(example.numpy())
    if not np.allclose(ours, ref, rtol=1e-4, atol=1e-5):
        return None
    return layout


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


def _missing(model_id: str) -> TextEncoderMissing:
    return TextEncoderMissing(
        f"no fast text encoder for model {model_id!r} yet; it is exported when the model is loaded "
        "(index with it, or run one query with the model loaded)"
    )


def _meta(model_id: str) -> dict:
    meta = _read_meta(cache_dir(model_id), model_id)
    if meta is None:
        raise _missing(model_id)
    return meta


def _stamp(directory: Path) -> tuple[int, int, int] | None:
    """Identity of an export: ``text.json`` is written last and replaced by every new export."""
    try:
        st = (directory / TEXT_META).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to ~1.5e-7 (Abramowitz & Stegun 7.1.26); numpy has none, and GELU needs it."""
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.copysign(1.0 - poly * np.exp(-a * a), x)


class NumpyTextTower:
    """The model's ``encode_text`` in numpy, on the weights of the ONNX export, memory-mapped.

    For a query process, which runs the tower once on a few tokens: it needs no ONNX Runtime (its
    import and session load cost ~0.1 s of CPU, a fifth of a query's budget) and reads only the
    weights it uses (the token embedding's rows of the query's tokens). Pre-norm blocks, causal
    attention, (Quick)GELU, the final LayerNorm at the end-of-text token and the projection, as
    :class:`clipsearch.model.CLIP`; tests hold it to the torch model. Tokens come cut after the
    batch's last end-of-text token (:meth:`TextEncoder.tokenize`).
    """

    def __init__(self, directory: Path, layout: dict):
        raw = np.memmap(Path(directory) / layout["file"], dtype=np.uint8, mode="r")
        self.heads = int(layout["heads"])
        self.eps = float(layout["eps"])
        self.quick_gelu = layout["act"] == "QuickGELU"
        self.w = {}
        for name, (offset, shape, transposed) in layout["tensors"].items():
            count = int(np.prod(shape))
            array = raw[offset : offset + 4 * count].view(np.float32).reshape(shape)
            self.w[name] = array.T if transposed else array  # as the model holds it
        self.layers = int(layout["layers"])

    def _ln(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """Unnormalised features ``float32 [N, D]`` of token ids ``int64 [N, n]``."""
        N, n = tokens.shape
        eot = tokens.argmax(-1)  # [N]: the end-of-text token has the largest id
        x = self.w["token_embedding"][tokens] + self.w["positional_embedding"][:n]  # [N, n, W]
        x = x.astype(np.float32)
        W = x.shape[-1]
        h, d = self.heads, W // self.heads
        mask = np.triu(np.full((n, n), -np.inf, np.float32), 1)  # [n, n]: causal
        for i in range(self.layers):
            qkv = self._linear(self._ln(x, f"{i}.ln_1"), f"{i}.in_proj")  # [N, n, 3W]
            q, k, v = qkv.reshape(N, n, 3, h, d).transpose(2, 0, 3, 1, 4)  # each [N, h, n, d]
            scores = (q @ k.transpose(0, 1, 3, 2)) / np.float32(np.sqrt(d)) + mask  # [N, h, n, n]
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attn = (scores / scores.sum(-1, keepdims=True)) @ v  # [N, h, n, d]
            x = x + self._linear(attn.transpose(0, 2, 1, 3).reshape(N, n, W), f"{i}.out_proj")
            y = self._linear(self._ln(x, f"{i}.ln_2"), f"{i}.c_fc")  # [N, n, M]
            if self.quick_gelu:
                y = y / (1.0 + np.exp(-1.702 * y))
            else:
                y = 0.5 * y * (1.0 + _erf(y / np.float32(np.sqrt(2.0))))
            x = x + self._linear(y.astype(np.float32), f"{i}.c_proj")
        x = self._ln(x, "ln_final")[np.arange(N), eot]  # [N, W]
        return (x @ self.w["text_projection"]).astype(np.float32)  # [N, D]


class TextEncoder:
    """A model's exported text tower and tokenizer: texts -> unnormalised features ``float32 [N, D]``.

    ``warm=False`` (a query process, which runs the graph once) loads the session for a quick start
    with one thread: on a small CPU both the load and a run of a short text are fastest that way, and
    the other core opens the FAISS index meanwhile. ``warm=True`` (the query daemon) optimises the
    graph fully and uses every core. :attr:`stamp` tells a holder when the export was replaced.
    """

    def __init__(self, model_id: str, *, warm: bool = False):
        from clipsearch.tokenizer import TableTokenizer

        self.model_id = model_id
        self.directory = cache_dir(model_id)
        self.stamp = _stamp(self.directory)
        self.meta = _meta(model_id)
        self.warm = warm
        try:
            self.tokenizer = TableTokenizer(self.directory / TEXT_TOKENIZER, self.meta["context_length"])
        except ValueError as e:
            raise TextEncoderMissing(
                f"the export of {model_id!r} is damaged ({e}); delete {self.directory}"
            ) from e
        ids = (self.tokenizer.sot_token_id, self.tokenizer.eot_token_id)
        if ids != (self.meta["sot_token_id"], self.meta["eot_token_id"]):
            raise TextEncoderMissing(
                f"the saved tokenizer of {model_id!r} does not match its export; delete {self.directory}"
            )
        self._session = None

    @functools.cached_property
    def tower(self):
        """The numpy tower for a quick start (a query process), or None (then ONNX Runtime runs)."""
        if self.warm or not self.meta.get("numpy"):
            return None
        return NumpyTextTower(self.directory, self.meta["numpy"])

    @property
    def session(self):
        """The ONNX Runtime session, loaded on first use (a cached text never needs it)."""
        if self._session is None:
            from clipsearch.backends import ort_session

            path = self.directory / TEXT_ONNX
            if self.warm:
                self._session = ort_session(path, spin=False)  # a daemon shares the machine
            else:
                self._session = ort_session(path, threads=1, quick_start=True)
        return self._session

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids ``int64 [N, n]``: start, tokens, end, zeros; ``n`` is the longest row (<= context).

        Rows equal :class:`clipsearch.tokenizer.Tokenizer`'s cut after the batch's last end-of-text:
        the graph's sequence length is free, so a 3-word query runs 5 positions, not 77.
        """
        rows = self.tokenizer.rows(list(texts))
        out = np.zeros((len(rows), max((len(r) for r in rows), default=2)), np.int64)  # [N, n]
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenize(texts)  # [N, n]
        if self.tower is not None:
            return self.tower(tokens)
        return self.session.run(None, {"tokens": tokens})[0].astype(np.float32, copy=False)  # [N, D]


_ENCODERS: dict[tuple[str, Path], TextEncoder] = {}


def encoder(model_id: str) -> TextEncoder:
    """This process's :class:`TextEncoder` of ``model_id`` (kept while its export is unchanged)."""
    directory = cache_dir(model_id)  # per directory too: a changed $CLIPSEARCH_HOME is another export
    held = _ENCODERS.get((model_id, directory))
    if held is None or held.stamp != _stamp(directory):
        held = _ENCODERS[(model_id, directory)] = TextEncoder(model_id)
    return held


def tokenize(model_id: str, texts: Sequence[str]) -> np.ndarray:
    """:meth:`TextEncoder.tokenize` of ``model_id``'s encoder."""
    return encoder(model_id).tokenize(texts)


def text_features(
    model_id: str,
    texts: Sequence[str],
    *,
    normalize: bool = True,
    cache: bool = True,
    encode: TextEncoder | None = None,
) -> np.ndarray:
    """Text features ``float32 [N, D]`` of ``texts`` for ``model_id``, without importing torch.

    L2-normalised unless ``normalize=False`` (then equal to ``model.encode_text``). Needs a prior
    :func:`ensure_text_encoder` for the model (else :class:`TextEncoderMissing`). With ``cache``, texts
    seen before are read from the on-disk cache and new ones are added to it. ``encode``: the
    :class:`TextEncoder` to use (default: this process's, from :func:`encoder`).
    """
    texts = [str(t) for t in ([texts] if isinstance(texts, str) else texts)]
    meta = encode.meta if encode is not None else _meta(model_id)
    if not texts:
        return np.zeros((0, meta["dim"]), np.float32)
    store = TextFeatureCache(cache_dir(model_id) / TEXT_CACHE) if cache else None
    known: dict[str, np.ndarray] = {}
    if store is not None:
        known = {t: np.frombuffer(v, dtype=np.float32) for t, v in store.get(texts).items()}
    todo = list(dict.fromkeys(t for t in texts if t not in known))
    if todo:
        fresh = dict(zip(todo, (encode or encoder(model_id))(todo), strict=True))
        known.update(fresh)
        if store is not None:
            store.put({t: np.ascontiguousarray(v, np.float32).tobytes() for t, v in fresh.items()})
    out = np.stack([known[t] for t in texts]).astype(np.float32)  # [N, D]
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def encode_query(model_id: str, query, *, encode: TextEncoder | None = None) -> np.ndarray:
    """The normalised vector ``float32 [D]`` of a text-only :class:`clipsearch.search.Query`.

    The same weighted sum of normalised part vectors as :func:`clipsearch.search.encode_query`.
    """
    from clipsearch.search import QueryError

    query.check()
    if any(p.kind != "text" for p in query.parts):
        raise QueryError("the fast query path takes text only; image parts need the model loaded")
    return query.combine(text_features(model_id, [p.value for p in query.parts], encode=encode))


def search(
    library,
    model_id: str,
    query,
    top: int = 20,
    under: Path | str | None = None,
    threshold: float | None = None,
    index_kind: str = "auto",
    *,
    encode: TextEncoder | None = None,
    index=None,
    filters=None,
):
    """:func:`clipsearch.search.search` for text-only queries, given a model id instead of a bundle.

    Returns ``list[clipsearch.search.Hit]``, best first. Raises :class:`TextEncoderMissing` when the
    model has not been exported yet (the caller then loads it, calls :func:`ensure_text_encoder`, and
    may fall back to the regular path). ``encode`` and ``index``: loaded parts to reuse (the daemon's).
    """
    from clipsearch import search as searching

    if encode is None and model_id in library.model_ids():
        encoder(model_id)  # a missing export fails before the FAISS index is opened for nothing
    return searching.search(
        library,
        None,
        query,
        top,
        under,
        threshold,
        index_kind,
        model_id=model_id,
        encode=functools.partial(encode_query, model_id, encode=encode),
        index=index,
        filters=filters,
    )
