"""CLIP's byte-level BPE tokenizer, on the Rust ``tokenizers`` library.

The vocabulary and merges are OpenAI's (``data/bpe_simple_vocab_16e6.txt.gz``); the text clean-up
(ftfy, HTML unescape, whitespace collapse, lower case), the pre-tokenisation regex and the ``</w>``
end-of-word marker follow OpenAI's ``SimpleTokenizer``, so the ids equal OpenAI's and OpenCLIP's.
The clean-up (ftfy has no Rust equivalent) and the split into words (OpenAI's regex, in the
``regex`` module: Rust's regex engine disagrees on a few hundred code points) run in Python; the
byte mapping and the merges run in Rust.

A model file names its tokenizer with :meth:`Tokenizer.to_config`: ``{"type": "clip-bpe"}`` for
OpenAI's vocabulary, or ``{"type": "tokenizers-json", "file": "tokenizer.json", ...}`` for a BPE
learned with :func:`train_bpe` and saved beside the weights.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
from collections.abc import Iterable
from pathlib import Path

SOT_TEXT = "<start_of_text>"
EOT_TEXT = "<end_of_text>"
TOKENIZER_FILE = "tokenizer.json"

# OpenAI's pre-tokenisation (the special tokens are put in front where it is compiled): English
# contractions, runs of letters, single digits, runs of anything else that is not whitespace.
# Whitespace itself is dropped.
_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_N_MERGES = 49152 - 256 - 2  # OpenAI keeps the first 48,894 merges: 256 bytes x 2 + merges + 2 = 49,408


# Printable ASCII and the whitespace str.split() removes, without "&" (so no HTML entity is possible).
_PLAIN = frozenset(map(chr, range(0x20, 0x7F))) - {"&"} | {"\t", "\n", "\r"}


def clean_text(text: str) -> str:
    """OpenAI's clean-up: fix mojibake, unescape HTML twice, collapse whitespace, lower case.

    On printable ASCII without ``&`` (most typed queries) ftfy's fixes (mojibake, curly quotes,
    ligatures, widths, control characters) and HTML unescaping change nothing, so they are skipped:
    importing ftfy alone is a large part of a query's budget. Tests check both ways agree.
    """
    if not _PLAIN.issuperset(text):
        text = _fix_text(text)
    return " ".join(text.split()).lower()


def _fix_text(text: str) -> str:
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text)))


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters (OpenAI's order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)  # bytes that are whitespace/control get code points >= 256
            extra += 1
    return table


def _base_vocab() -> list[str]:
    """The 512 single-byte symbols, in OpenAI's order: each byte, then each byte ending a word."""
    chars = list(_byte_to_unicode().values())
    return chars + [c + "</w>" for c in chars]


def _split_pre_tokenizer():
    """OpenAI's regex in ``tokenizers``: keep the matches, drop what lies between (whitespace)."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True)


def _build_backend(merges: list[tuple[str, str]], split: bool):
    """A ``tokenizers.Tokenizer`` with OpenAI's layout: 512 byte symbols, one id per merge, 2 specials.

    The special tokens take the two last ids, so end-of-text is the largest id in every sequence
    (the model pools the text at the argmax id). ``split=False`` leaves the splitting to Python
    (:func:`words`), which is how :class:`Tokenizer` encodes; ``split=True`` puts OpenAI's regex
    in the pipeline, for training and for a ``tokenizer.json`` that also works on its own.
    """
    from tokenizers import Tokenizer, models

    vocab = _base_vocab()
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            vocab.append(a + b)
            seen.add(a + b)
    ids = {tok: i for i, tok in enumerate(vocab)}
    bpe = models.BPE(vocab=ids, merges=merges, end_of_word_suffix="</w>", fuse_unk=False)
    tk = Tokenizer(bpe)
    _set_splitting(tk, split)
    tk.add_special_tokens([SOT_TEXT, EOT_TEXT])
    return tk


def _set_splitting(tk, split: bool) -> None:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.pre_tokenizer = pre_tokenizers.Sequence([_split_pre_tokenizer(), byte_level]) if split else byte_level


@functools.cache
def _word_pattern():
    """OpenAI's regex, in the ``regex`` module with OpenAI's flags, the special tokens first.

    The splitting runs in Python because Rust's Oniguruma disagrees with ``regex`` on a few hundred
    code points (U+0345, which ``regex`` drops under IGNORECASE; letters new in recent Unicode
    versions), and identical ids for every string is the contract.
    """
    import regex

    return regex.compile(f"{SOT_TEXT}|{EOT_TEXT}|{_SPLIT_PATTERN}", regex.IGNORECASE)


@functools.cache
def _ascii_word_pattern():
    """:func:`_word_pattern` for ASCII text, in the standard ``re`` (importing ``regex`` is slower).

    On ASCII, ``\\p{L}`` is ``[a-z]`` (ignoring case) and ``\\p{N}`` is ``[0-9]``; cleaned text holds no
    whitespace but single spaces, so the two modules' ``\\s`` agree too. Tests compare the splits.
    """
    import re

    pattern = rf"{SOT_TEXT}|{EOT_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"
    return re.compile(pattern, re.IGNORECASE | re.ASCII)


def words(text: str) -> list[str]:
    """Cleaned ``text`` cut into the words BPE merges within (special-token spellings kept whole)."""
    cleaned = clean_text(text)
    if cleaned.isascii():
        return _ascii_word_pattern().findall(cleaned)
    return _word_pattern().findall(cleaned)


@functools.cache
def _clip_backend():
    """OpenAI's tokenizer, built once per process (benchmarks/text_encoders.md: why a query uses the table instead)."""
    from importlib.resources import files

    raw = files("clipsearch").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]  # line 0 is a header
    return _build_backend(merges, split=False)


class Tokenizer:
    """Text -> token ids for CLIP's text tower.

    ``Tokenizer()(["a dog", "a cat"])`` gives a ``LongTensor [2, 77]``: start-of-text, the tokens,
    end-of-text, zeros. Text longer than the context is cut, keeping end-of-text last.
    """

    def __init__(self, context_length: int = 77, *, _backend=None, _json: str | None = None):
        if int(context_length) < 2:
            raise ValueError(
                f"context_length must be at least 2 (start and end tokens), got {context_length}"
            )
        self.context_length = int(context_length)
        # a trained BPE keeps its tokenizer.json text (with the regex) to save it unchanged
        self._json = _json
        if _backend is None:
            _backend = _clip_backend()
        else:  # a backend from a file (fastquery caches ours): Python does the splitting, always
            _set_splitting(_backend, split=False)
        self._tk = _backend
        self.sot_token_id = self._tk.token_to_id(SOT_TEXT)
        self.eot_token_id = self._tk.token_to_id(EOT_TEXT)
        if self.sot_token_id is None or self.eot_token_id is None:
            raise ValueError(f"the tokenizer has no {SOT_TEXT} / {EOT_TEXT} tokens")
        self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"

    @functools.cached_property
    def _kind(self) -> str:
        """``clip-bpe`` for OpenAI's vocabulary, else ``tokenizers-json`` (then ``_json`` is set)."""
        if self._json is not None:
            return "tokenizers-json"
        clip = _clip_backend()
        if self._tk is clip or self._tk.get_vocab(with_added_tokens=True) == clip.get_vocab(
            with_added_tokens=True
        ):
            return "clip-bpe"
        # a trained backend handed in without its file: write it out with the regex, to work standalone
        from tokenizers import Tokenizer as _Backend

        copy = _Backend.from_str(self._tk.to_str())
        _set_splitting(copy, split=True)
        self._json = copy.to_str(pretty=True)
        return "tokenizers-json"

    # -- text to ids -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` after clean-up, without start/end tokens."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` for many texts at once (the merging runs in parallel, in Rust).

        One text is encoded on the calling thread: ``tokenizers``' batch call hands even a single
        text to its thread pool, and on a busy machine the caller then waits for a pool thread to
        be scheduled (a training data loader tokenizes one caption per sample; see
        benchmarks/train_throughput.md).
        """
        pieces = [words(t) for t in texts]
        if len(pieces) == 1:
            return [self._tk.encode(pieces[0], is_pretokenized=True, add_special_tokens=False).ids]
        return [e.ids for e in self._tk.encode_batch(pieces, is_pretokenized=True, add_special_tokens=False)]

    def rows(self, texts: list[str], context_length: int | None = None) -> list[list[int]]:
        """Per text: start, its ids, end (unpadded); cut to the context, end-of-text kept last."""
        return _rows(self, texts, context_length)

    def __call__(self, texts: str | list[str], context_length: int | None = None):
        """``LongTensor [N, L]``: start, tokens, end, zero padding; over-long text keeps end last."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        out = torch.zeros(len(texts), length, dtype=torch.long)  # [N, L]
        for row, ids in enumerate(self.rows(list(texts), length)):
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def save_table(self, path) -> None:
        """Write the vocabulary and merges to ``path`` for
        :class:`clipsearch.tokenizer_table.TableTokenizer` (same ids, without ``tokenizers``; see
        benchmarks/text_encoders.md). Replaces ``path`` atomically."""
        from clipsearch.tokenizer_table import write_table

        write_table(self._tk, Path(path))

    # -- ids to text -------------------------------------------------------------------------
    @functools.cached_property
    def _decode_tables(self):
        vocab = self._tk.get_vocab(with_added_tokens=True)
        id_to_token = [""] * (max(vocab.values()) + 1)
        for tok, i in vocab.items():
            id_to_token[i] = tok
        to_byte = {c: b for b, c in _byte_to_unicode().items()}
        return id_to_token, to_byte

    def decode(self, ids) -> str:
        """The text of ``ids`` (a list or a tensor row): words joined by spaces, lower case.

        Start-of-text is skipped and decoding stops at the first end-of-text, so a padded row of
        :meth:`__call__` decodes to its text. Bytes that do not form UTF-8 become U+FFFD.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        id_to_token, to_byte = self._decode_tables
        data = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_token_id:
                break
            if i == self.sot_token_id:
                continue
            if not 0 <= i < len(id_to_token):
                raise ValueError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
            token = id_to_token[i]
            word_end = token.endswith("</w>")
            if word_end:
                token = token[: -len("</w>")]
            data += bytes(to_byte[c] for c in token)
            if word_end:
                data += b" "
        return data.decode("utf-8", errors="replace").strip()

    # -- model files -------------------------------------------------------------------------
    def to_config(self) -> dict:
        """What a model file records to rebuild this tokenizer (see :meth:`from_config`)."""
        if self._kind == "clip-bpe":
            return {"type": "clip-bpe", "context_length": self.context_length}
        return {
            "type": "tokenizers-json",
            "file": TOKENIZER_FILE,
            "context_length": self.context_length,
            "sot_token_id": self.sot_token_id,
            "eot_token_id": self.eot_token_id,
        }

    def save(self, directory) -> dict:
        """Write what :meth:`from_config` needs into ``directory``; returns the config to record.

        OpenAI's vocabulary ships with clipsearch, so only a trained BPE writes ``tokenizer.json``.
        """
        if self._kind == "tokenizers-json":
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / TOKENIZER_FILE).write_text(self._json, encoding="utf-8")
        return self.to_config()

    @classmethod
    def from_config(cls, cfg: dict, directory=None) -> Tokenizer:
        """Rebuild from :meth:`to_config`'s dict; ``directory`` holds a trained BPE's file.

        Raises ``ValueError`` for an unknown type, a file name that leaves ``directory``, or ids
        that do not match the file; ``OSError`` when the file cannot be read.
        """
        if not isinstance(cfg, dict):
            raise ValueError(f"tokenizer config must be a mapping, got {type(cfg).__name__}")
        kind = cfg.get("type")
        length = int(cfg.get("context_length", 77))
        if kind == "clip-bpe":
            return cls(context_length=length)
        if kind != "tokenizers-json":
            raise ValueError(f"unknown tokenizer type {kind!r} (expected 'clip-bpe' or 'tokenizers-json')")
        if directory is None:
            raise ValueError("a 'tokenizers-json' tokenizer needs the model directory that holds its file")
        name = cfg.get("file", TOKENIZER_FILE)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(
                f"tokenizer file must be a plain file name inside the model directory, got {name!r}"
            )
        path = Path(directory) / name
        from tokenizers import Tokenizer as _Backend

        text = path.read_text(encoding="utf-8")  # OSError when missing or unreadable
        try:
            backend = _Backend.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
            raise ValueError(f"{path} is not a tokenizers JSON file: {e}") from e
        _set_splitting(backend, split=False)  # Python splits, as for OpenAI's vocabulary
        tok = cls(context_length=length, _backend=backend, _json=text)
        for key in ("sot_token_id", "eot_token_id"):
            if key in cfg and int(cfg[key]) != getattr(tok, key):
                raise ValueError(f"{path}: {key} is {getattr(tok, key)}, the model file says {cfg[key]}")
        return tok


def _rows(tok, texts: list[str], context_length: int | None) -> list[list[int]]:
    length = int(context_length or tok.context_length)
    if length < 2:
        raise ValueError(f"context_length must be at least 2, got {length}")
    return [[tok.sot_token_id, *ids[: length - 2], tok.eot_token_id] for ids in tok.encode_batch(texts)]


def train_bpe(texts: Iterable[str], vocab_size: int, context_length: int = 77) -> Tokenizer:
    """Learn a lower-cased byte-level BPE of at most ``vocab_size`` ids from ``texts``.

    Same clean-up, pre-tokenisation and ``</w>`` marking as CLIP's, all 512 byte symbols kept (so
    any text can be encoded), and the special tokens on the two last ids.
    """
    from tokenizers import trainers

    vocab_size = int(vocab_size)
    if vocab_size < 512 + 2 + 1:
        raise ValueError(
            f"vocab_size must be at least 515 (512 byte symbols, 2 specials, 1 merge), got {vocab_size}"
        )
    n_merges = vocab_size - 512 - 2
    scratch = _build_backend([], split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + 512,  # the trainer counts its own alphabet; we keep only n_merges merges
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        end_of_word_suffix="</w>",
        initial_alphabet=list(_byte_to_unicode().values()),
    )
    scratch.train_from_iterator((clean_text(t) for t in texts), trainer=trainer)
    learned = json.loads(scratch.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned][:n_merges]
    saved = _build_backend(merges, split=True).to_str(pretty=True)
    return Tokenizer(context_length, _backend=_build_backend(merges, split=False), _json=saved)
