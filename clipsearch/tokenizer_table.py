"""CLIP's BPE from a table, for a process that encodes a few texts (a query) without ``tokenizers``.

The second implementation of :class:`clipsearch.tokenizer.Tokenizer`'s BPE, kept because building
the Rust one costs a query process more than 0.1 s (benchmarks/text_encoders.md). Same interface
(``rows``, ``encode``, ``encode_batch``, ``sot_token_id``, ``eot_token_id``), same clean-up and word
split (shared with ``tokenizer.py``), and tests hold its ids equal to ``Tokenizer``'s and OpenAI's.
The table itself is SQLite, read and written by :class:`clipsearch.store.BpeTable`.
"""

from __future__ import annotations

import json
from pathlib import Path

from clipsearch.tokenizer import EOT_TEXT, SOT_TEXT, _byte_to_unicode, _rows, words

_TABLE_FORMAT = "clipsearch-bpe-table"
_TABLE_VERSION = 1


def write_table(backend, path: Path) -> None:
    """The BPE of a ``tokenizers`` backend as SQLite: vocab (token -> id), merges ((a, b) -> rank)."""
    state = json.loads(backend.to_str())
    model = state["model"]
    # TableTokenizer reproduces this kind of BPE only (the kind this module builds); anything else
    # would give other ids, so it is refused rather than approximated.
    plain = {
        "dropout": None,
        "continuing_subword_prefix": None,
        "byte_fallback": False,
        "ignore_merges": False,
    }
    if model.get("type") != "BPE" or any(model.get(k, v) != v for k, v in plain.items()):
        raise ValueError("only a plain byte-level BPE (the kind clipsearch builds) can be written as a table")
    specials = {t["content"]: t["id"] for t in state.get("added_tokens", [])}
    if set(specials) != {SOT_TEXT, EOT_TEXT}:
        raise ValueError(
            f"the tokenizer has added tokens {sorted(specials)}, expected {SOT_TEXT} and {EOT_TEXT}"
        )
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    meta = {
        "format": _TABLE_FORMAT,
        "version": _TABLE_VERSION,
        "end_of_word_suffix": model.get("end_of_word_suffix") or "",
        "sot_token_id": specials[SOT_TEXT],
        "eot_token_id": specials[EOT_TEXT],
        "vocab_size": backend.get_vocab_size(with_added_tokens=True),
    }
    from clipsearch.atomic import atomic_path
    from clipsearch.store import BpeTable

    with atomic_path(path) as tmp:
        BpeTable.write(tmp, meta, model["vocab"].items(), merges)


class TableTokenizer:
    """:class:`Tokenizer`'s ids from a table written by :meth:`Tokenizer.save_table`, without ``tokenizers``.

    Building the Rust BPE from its 49k merges costs a query process more than this whole tokenizer
    (benchmarks/text_encoders.md); here a word's merges are looked up in the table as the word
    needs them, so opening is nearly free. The algorithm is the Rust one's: repeatedly merge the adjacent pair of lowest
    rank (the leftmost on ties) until none is in the table. Tests check the ids equal
    :class:`Tokenizer`'s (and OpenAI's) on >1,000 strings. For encoding many texts use :class:`Tokenizer`.
    """

    def __init__(self, path, context_length: int = 77):
        path = Path(path)
        if int(context_length) < 2:
            raise ValueError(
                f"context_length must be at least 2 (start and end tokens), got {context_length}"
            )
        self.context_length = int(context_length)
        from clipsearch.store import BpeTable

        self._table = BpeTable(path)
        meta = self._table.meta
        if meta.get("format") != _TABLE_FORMAT or meta.get("version") != _TABLE_VERSION:
            raise ValueError(f"{path} is not a tokenizer table of version {_TABLE_VERSION}")
        self.sot_token_id = int(meta["sot_token_id"])
        self.eot_token_id = int(meta["eot_token_id"])
        self.vocab_size = int(meta["vocab_size"])
        self._suffix = meta["end_of_word_suffix"]
        self._specials = {SOT_TEXT: self.sot_token_id, EOT_TEXT: self.eot_token_id}
        self._ranks: dict[tuple[str, str], int | None] = {}
        self._cache: dict[str, list[int]] = {}
        self._bytes = _byte_to_unicode()

    def __repr__(self) -> str:
        return f"TableTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"

    def close(self) -> None:
        self._table.close()

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` after clean-up, without start/end tokens."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` for each text."""
        return [[i for w in words(t) for i in self._word_ids(w)] for t in texts]

    def rows(self, texts: list[str], context_length: int | None = None) -> list[list[int]]:
        """Per text: start, its ids, end (unpadded); cut to the context, end-of-text kept last."""
        return _rows(self, texts, context_length)

    def _rank(self, a: str, b: str) -> int | None:
        key = (a, b)
        if key not in self._ranks:
            self._ranks[key] = self._table.rank(a, b)
        return self._ranks[key]

    def _word_ids(self, word: str) -> list[int]:
        if word in self._specials:  # the Rust tokenizer matches its added tokens before the BPE
            return [self._specials[word]]
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = [self._bytes[b] for b in word.encode("utf-8")]  # byte-level: every byte a symbol
        if not symbols:
            return []
        symbols[-1] += self._suffix
        while len(symbols) > 1:
            best, at = None, -1
            for i in range(len(symbols) - 1):
                r = self._rank(symbols[i], symbols[i + 1])
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
        ids = []
        for sym in symbols:
            token_id = self._table.token_id(sym)
            if token_id is None:  # every byte symbol and merge result is in the vocabulary we write
                raise ValueError(f"tokenizer table has no token {sym!r}: export it again")
            ids.append(token_id)
        self._cache[word] = ids
        return ids
