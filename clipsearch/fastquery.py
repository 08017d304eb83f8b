"""The torch-free text encoder: the model's text tower in numpy, its BPE as a table, a feature cache.

``import torch`` alone costs a small CPU several times a whole query (benchmarks/query_latency.md). So
the text tower's weights are exported once per model (:func:`ensure_text_encoder`, at index time or
after the first query that had the model loaded anyway), and a query then needs only ``numpy``:

1. tokenise with the model's own BPE (saved beside the export as a table that
   :class:`clipsearch.tokenizer_table.TableTokenizer` opens in a millisecond; the same ids as
   :class:`clipsearch.tokenizer.Tokenizer`) into an int64 array cut after the batch's last
   end-of-text token, so a 3-word query runs 5 positions, not 77;
2. run :class:`NumpyTextTower` on the export's memory-mapped weights (only the token embedding rows
   of the query's tokens are read) and L2-normalise. The export is checked against the model's
   ``encode_text`` before it is kept; a model whose text tower it cannot compute is not exported
   (its text queries load the model).

Repeated queries skip steps 1-2: features are cached per (model, exact text) in a small SQLite file
beside the export. :mod:`clipsearch.encoders` wraps this as the query encoder; the query process and
the daemon use the same one. Nothing here imports torch except the export.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipsearch.atomic import atomic_path
from clipsearch.errors import ClipsearchError
from clipsearch.paths import cache_dir
from clipsearch.store import TextFeatureCache

TEXT_WEIGHTS = "text-fp32.weights"  # the tower's tensors, float32, each at a 64-byte aligned offset
TEXT_META = "text.json"  # written last: its presence means the export is complete
TEXT_TOKENIZER = "tokenizer.sqlite"  # clipsearch.tokenizer_table.TableTokenizer
TEXT_CACHE = "text-cache.sqlite"
_FORMAT = "clipsearch-text-numpy"
_VERSION = 3  # 3: the weights written directly for the numpy tower (2 had an ONNX graph to find them in)
_OLD_FILES = ("tokenizer.json", "text-fp32.onnx", "text-fp32.onnx.data")  # what versions 1-2 wrote
_ALIGN = 64


class TextEncoderMissing(ClipsearchError):
    """No torch-free text encoder has been exported for this model yet (load the model once to export it)."""


class TextEncoderUnsupported(ClipsearchError):
    """The model's text tower is not one :class:`NumpyTextTower` computes (its queries load the model)."""


# --------------------------------------------------------------------------------------------------
# Export (needs torch: runs where the model is loaded anyway)


def ensure_text_encoder(bundle) -> Path:
    """Export ``bundle``'s text tower and tokenizer for torch-free queries, unless already done.

    Writes ``text-fp32.weights``, ``tokenizer.sqlite`` and ``text.json`` under
    :func:`clipsearch.paths.cache_dir` of ``bundle.model_id``, each atomically, the JSON last, after
    checking the numpy tower on the written weights equals the model. Returns the weights' path.
    Raises :class:`TextEncoderUnsupported` for a text tower the numpy one does not compute.
    """
    directory = cache_dir(bundle.model_id)
    weights = directory / TEXT_WEIGHTS
    if _read_meta(directory, bundle.model_id) is not None and weights.is_file():
        return weights
    import copy

    import torch

    model = bundle.model
    if model.dtype != torch.float32 or model.device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()
    tensors, layout = _tower_tensors(model)
    tok = bundle.tokenizer
    (directory / TEXT_META).unlink(missing_ok=True)  # incomplete until the new one is written
    (directory / TEXT_CACHE).unlink(missing_ok=True)  # features of an older export must not be served
    for old in _OLD_FILES:
        (directory / old).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    offsets = {}
    with atomic_path(weights) as tmp, open(tmp, "wb") as f:
        for name, array in tensors.items():
            f.write(b"\0" * (-f.tell() % _ALIGN))
            offsets[name] = [f.tell(), list(array.shape), False]
            f.write(np.ascontiguousarray(array, np.float32).tobytes())
    layout = {**layout, "file": TEXT_WEIGHTS, "tensors": offsets}
    # ids the tokenizer itself makes, so they exist in a model trained with a small vocabulary
    words = (tok.encode("a photo of a dog") + [tok.eot_token_id] * 2)[:2]
    example = torch.tensor([[tok.sot_token_id, *words, tok.eot_token_id]] * 2)  # [B, n]
    with torch.no_grad():
        ref = model.encode_text(example).float().numpy()  # [B, D]
    if not np.allclose(NumpyTextTower(directory, layout)(example.numpy()), ref, rtol=1e-4, atol=1e-5):
        weights.unlink()
        raise TextEncoderUnsupported(f"the numpy text tower does not reproduce {bundle.model_id}'s")
    tok.save_table(directory / TEXT_TOKENIZER)  # the BPE as built in memory: OpenAI's or a trained one
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "model_id": bundle.model_id,
        "context_length": int(tok.context_length),
        "sot_token_id": int(tok.sot_token_id),
        "eot_token_id": int(tok.eot_token_id),
        "dim": int(model.text_projection.shape[1]),
        "numpy": layout,
    }
    with atomic_path(directory / TEXT_META) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    _ENCODERS.clear()  # a re-export in this process replaces the files under a loaded encoder
    return weights


def _tower_tensors(model) -> tuple[dict[str, np.ndarray], dict]:
    """The text tower's weights by the names :class:`NumpyTextTower` reads, and its shape facts."""
    blocks = list(model.transformer.resblocks)
    acts = {type(b.mlp.gelu).__name__ for b in blocks}
    gelus = {getattr(b.mlp.gelu, "approximate", "none") for b in blocks}
    if len(acts) != 1 or acts - {"QuickGELU", "GELU"} or gelus != {"none"}:
        raise TextEncoderUnsupported(f"text activation {sorted(acts)} is not GELU or QuickGELU")
    eps = {m.eps for b in blocks for m in (b.ln_1, b.ln_2)} | {model.ln_final.eps}
    if len(eps) != 1:
        raise TextEncoderUnsupported("the text tower's LayerNorms differ in eps")
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
    tensors = {name: p.detach().float().cpu().numpy() for name, p in wanted.items()}
    facts = {
        "layers": len(blocks),
        "heads": int(blocks[0].attn.num_heads),
        "act": acts.pop(),
        "eps": float(eps.pop()),
    }
    return tensors, facts


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
    """erf to ~1.5e-7 (Abramowitz & Stegun 7.1.26); numpy has none, and GELU needs it.

    In place on two arrays of ``x``'s shape: on a batch of prompts (``[N, n, 4W]``) a fresh array
    per operation made erf cost a third of the tower, most of it in memory traffic.
    """
    a = np.abs(x)
    t = a * 0.3275911
    t += 1.0
    np.reciprocal(t, out=t)  # t = 1 / (1 + p|x|)
    poly = t * 1.061405429  # Horner: t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly += c
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a  # poly * exp(-x^2)
    np.subtract(1.0, poly, out=poly)
    return np.copysign(poly, x, out=poly)


class NumpyTextTower:
    """The model's ``encode_text`` in numpy, on the exported weights, memory-mapped.

    A query runs the tower once on a few tokens, so it reads only the weights it uses (the token
    embedding's rows of the query's tokens) and needs neither torch nor an inference runtime
    (benchmarks/text_encoders.md has the figures behind the choice). Pre-norm blocks, causal
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
        """``x [..., in] -> [..., out]`` as one 2-D product over every token of the batch.

        numpy runs a stacked product (``[N, n, in] @ [in, out]``) as one small matrix product per
        text, each rereading the whole weight matrix (and, with OpenBLAS threads, synchronising
        them): a batch of prompts then costs about what the prompts cost one at a time.
        """
        weight = self.w[name + ".weight"]  # [out, in]
        y = x.reshape(-1, x.shape[-1]) @ weight.T + self.w[name + ".bias"]  # [N * n, out]
        return y.reshape(*x.shape[:-1], weight.shape[0])  # [..., out]

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
                e = _erf(y / np.float32(np.sqrt(2.0)))
                e += 1.0
                e *= y
                e *= 0.5  # 0.5 * y * (1 + erf(y / sqrt 2)), without a temporary per operation
                y = e
            x = x + self._linear(y.astype(np.float32, copy=False), f"{i}.c_proj")
        x = self._ln(x, "ln_final")[np.arange(N), eot]  # [N, W]
        return (x @ self.w["text_projection"]).astype(np.float32)  # [N, D]


class TextEncoder:
    """A model's exported text tower and tokenizer: texts -> unnormalised features ``float32 [N, D]``.

    :attr:`stamp` tells a holder (the query daemon) when the export was replaced.
    """

    def __init__(self, model_id: str):
        from clipsearch.tokenizer_table import TableTokenizer

        self.model_id = model_id
        self.directory = cache_dir(model_id)
        self.stamp = _stamp(self.directory)
        self.meta = _meta(model_id)
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

    @functools.cached_property
    def tower(self) -> NumpyTextTower:
        """The tower on the memory-mapped weights, made on first use (a cached text never needs it)."""
        try:
            return NumpyTextTower(self.directory, self.meta["numpy"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TextEncoderMissing(
                f"the export of {self.model_id!r} is damaged ({e}); delete {self.directory}"
            ) from e

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids ``int64 [N, n]``: start, tokens, end, zeros; ``n`` is the longest row (<= context).

        Rows equal :class:`clipsearch.tokenizer.Tokenizer`'s cut after the batch's last end-of-text:
        the tower's sequence length is free, so a 3-word query runs 5 positions, not 77.
        """
        return _pad(self.tokenizer.rows(list(texts)))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Unnormalised features ``float32 [N, D]`` of ``texts``, in their order.

        The texts run through the tower in chunks of :data:`CHUNK`, shortest first: every row is
        padded to its chunk's longest, so sorting wastes little on padding (a prompt ensemble's
        lengths differ by half), and a chunk still gives each layer one product of hundreds of rows.
        """
        rows = self.tokenizer.rows(list(texts))
        out = np.empty((len(rows), self.meta["dim"]), np.float32)  # [N, D]
        order = np.argsort([len(r) for r in rows], kind="stable")
        for start in range(0, len(rows), CHUNK):
            chunk = order[start : start + CHUNK]
            out[chunk] = self.tower(_pad([rows[i] for i in chunk]))
        return out


CHUNK = (
    64  # texts per run of the tower: fewer make smaller products, more pad more (benchmarks/text_encoders.md)
)


def _pad(rows: list[list[int]]) -> np.ndarray:
    """``rows`` as ``int64 [N, n]``, zeros after each; ``n`` is the longest row (2 for none)."""
    out = np.zeros((len(rows), max((len(r) for r in rows), default=2)), np.int64)  # [N, n]
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


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
