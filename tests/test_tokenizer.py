"""The tokenizer against OpenCLIP's pure-Python SimpleTokenizer (itself OpenAI's), on >1,000 strings."""

import random

import pytest
import torch
from open_clip import tokenizer as oc_tokenizer

from clipsearch.tokenizer import Tokenizer, clean_text, train_bpe

CLASSNAMES = [
    "tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray",
    "cock", "hen", "ostrich", "brambling", "goldfinch", "house finch", "junco", "indigo bunting",
    "American robin", "bulbul", "jay", "magpie", "chickadee", "American dipper", "kite (bird of prey)",
    "bald eagle", "vulture", "great grey owl", "fire salamander", "smooth newt", "loggerhead sea turtle",
    "African rock python", "Nile crocodile", "king penguin", "Yorkshire Terrier", "Shih Tzu",
    "Cardigan Welsh Corgi", "jack-o'-lantern", "T-shirt", "potter's wheel", "carousel", "yo-yo",
    "CD player", "Granny Smith apple", "espresso", "red wine", "toilet paper", "crossword", "traffic light",
]  # fmt: skip

TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a pixelated photo of the {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "itap of a {}.",
]  # fmt: skip

ODD = [
    "", " ", "\t\n\r", "   leading and trailing   ", "multiple     spaces\t\ttabs\n\nnewlines",
    "nbsp\u00a0em\u2003ideographic\u3000space", "zero\u200bwidth\u200cjoiners\u200d", "\x00nul\x1cfs\x85nel",
    "It's, I'LL, WE'RE, they've, I'm, you'd, don't", "'s's 's' ''s", "O'Reilly's dog's bone's",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &quot;x&quot; &amp;amp; &#x1F600; &nbsp;",
    "Tom &amp;amp; Jerry", "&unknownentity; & ; &#;",
    "cafÃ© mojibake Ã¼ber", "café naïve résumé über Ærøskøbing", "e\u0301 combining acute, A\u030a",
    "東京タワーの写真", "一只猫坐在桌子上", "한국어 문장입니다", "صورة قطة على الطاولة", "фото кошки на столе",
    "תמונה של חתול", "ภาพแมวบนโต๊ะ", "बिल्ली की तस्वीर", "Ελληνικά γράμματα", "ǅemal ǈ ǋ ß ẞ İstanbul ı",
    "emoji 😀🐶🐱 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ ✨", "😀" * 40, "🐶 dog 🐶 DOG 🐶",
    "digits 0123456789 3.14159 1,000,000 2024-05-06 12:30", "mixed abc123def 4k 1080p x264", "٣٤٥ ⅷ ² ½ ①",
    "punctuation!!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^ ((( ))) [[[ ]]] {{{ }}}", "a.b.c,d;e:f",
    "email@example.com https://example.org/path?q=1&x=2#frag", "C:\\Users\\photos\\IMG_0001.JPG",
    "<start_of_text>", "<end_of_text>", "x<<start_of_text>", "a<end_of_text>b <start_of_text>c",
    "<START_OF_TEXT> upper", "<|startoftext|> openai style <|endoftext|>",
    "word " * 100, "supercalifragilisticexpialidocious" * 20, " ".join(str(i) for i in range(200)),
    "UPPER CASE SHOUTING", "MiXeD CaSe", "\u0461\u0345f iota subscript", "a\u088fb \ua7ceX new letters", "\u212a kelvin \u2126 ohm \ufb01 ligature",
]  # fmt: skip


def _random_strings(n: int, seed: int = 0) -> list[str]:
    """Random mixes of ASCII, Latin-1, Cyrillic, CJK, emoji, combining marks and spaces."""
    rng = random.Random(seed)
    ranges = [
        (0x20, 0x7E),
        (0xA0, 0xFF),
        (0x400, 0x4FF),
        (0x4E00, 0x4FFF),
        (0x1F300, 0x1F64F),
        (0x300, 0x36F),
    ]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 30)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)) if rng.random() > 0.15 else " ")
        out.append("".join(chars))
    return out


def corpus() -> list[str]:
    prompts = [t.format(c) for c in CLASSNAMES for t in TEMPLATES]
    return prompts + ODD + [s.upper() for s in ODD] + _random_strings(300)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def reference():
    return oc_tokenizer.SimpleTokenizer()


def test_corpus_is_large_and_varied():
    texts = corpus()
    assert len(texts) >= 1000
    assert len(set(texts)) >= 1000


def test_vocabulary_layout(tok):
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    assert tok.context_length == 77


def test_tensors_equal_open_clip_tokenize(tok):
    texts = corpus()
    ours, ref = tok(texts), oc_tokenizer.tokenize(texts)
    assert ours.dtype == torch.long and ours.shape == (len(texts), 77)
    mismatched = [texts[i] for i in range(len(texts)) if not torch.equal(ours[i], ref[i])]
    assert mismatched == []


def test_encode_equals_simple_tokenizer(tok, reference):
    texts = corpus()
    batch = tok.encode_batch(texts)
    for text, ids in zip(texts, batch, strict=True):
        assert ids == reference.encode(text), text
        assert tok.encode(text) == ids, text  # one text takes the single-text path, not the batch call


def test_other_context_lengths_truncate_like_open_clip(tok):
    texts = ["word " * 100, "a photo of a dog", "", "😀" * 40]
    for length in (2, 5, 16, 77, 100):
        ours = tok(texts, context_length=length)
        assert torch.equal(ours, oc_tokenizer.tokenize(texts, context_length=length))
        assert ours[0, -1] == 49407  # 100 words: cut, end-of-text stays last


def test_single_string_and_padding(tok):
    row = tok("a photo of a dog")
    assert row.shape == (1, 77)
    assert row[0, :7].tolist() == [49406, 320, 1125, 539, 320, 1929, 49407]  # hand-checked with OpenAI's
    assert row[0, 7:].eq(0).all()
    assert tok("").tolist()[0][:3] == [49406, 49407, 0]


def test_bad_context_length(tok):
    with pytest.raises(ValueError):
        tok("x", context_length=1)
    with pytest.raises(ValueError):
        Tokenizer(context_length=1)


def test_decode_equals_reference_and_round_trips(tok, reference):
    for text in corpus():
        ids = tok.encode(text)
        if 49406 in ids or 49407 in ids:
            continue  # text spelling "<end_of_text>": decode stops there by design
        decoded = tok.decode(ids)
        assert decoded == reference.decode(ids).strip(), text
        assert tok.encode(decoded) == ids, text
        if len(ids) <= 75:
            assert tok.decode(tok(text)[0]) == decoded  # a padded row stops at end-of-text


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError):
        tok.decode([49408])


def test_clean_text_matches_reference():
    for text in ODD:
        assert clean_text(text) == oc_tokenizer._clean_lower(text)


def test_backend_is_built_once_per_process():
    assert Tokenizer()._tk is Tokenizer(context_length=32)._tk


def test_clip_config_round_trip(tmp_path):
    tok = Tokenizer(context_length=32)
    cfg = tok.save(tmp_path)
    assert cfg == tok.to_config() == {"type": "clip-bpe", "context_length": 32}
    assert list(tmp_path.iterdir()) == []  # OpenAI's vocabulary ships with the package
    again = Tokenizer.from_config(cfg)
    assert again.context_length == 32
    assert torch.equal(again(["a dog"]), tok(["a dog"]))


CAPTIONS = [
    f"a {adj} photo of a {noun} {where}"
    for adj in ("blurry", "bright", "dark", "close-up", "black and white")
    for noun in ("dog", "cat", "mountain", "beach", "bicycle", "photograph", "sunset", "birthday cake")
    for where in ("at the beach", "in the snow", "on a table", "in the city at night")
]


@pytest.fixture(scope="module")
def trained():
    return train_bpe(CAPTIONS * 3, vocab_size=600)


def test_trained_bpe_specials_are_the_last_ids(trained):
    assert trained.vocab_size <= 600
    assert (trained.sot_token_id, trained.eot_token_id) == (trained.vocab_size - 2, trained.vocab_size - 1)
    rows = trained(["a dog", "a photo of a birthday cake on a table"])
    ends = rows.argmax(dim=-1)  # the model pools at the argmax id: it must be end-of-text
    assert rows[torch.arange(2), ends].eq(trained.eot_token_id).all()


def test_trained_bpe_learns_frequent_words(trained):
    assert len(trained.encode("photograph")) == 1
    assert len(trained.encode("birthday")) == 1
    assert len(trained.encode("xylophone")) > 1  # never seen: falls back to smaller pieces


def test_trained_bpe_encodes_any_text_and_round_trips(trained):
    for text in ["A Photo Of A DOG!", "東京 😀 café", "\x00\x01 bytes", *ODD[:20]]:
        ids = trained.encode(text)
        assert all(0 <= i < trained.sot_token_id for i in ids)
        assert trained.encode(trained.decode(ids)) == ids, text
        assert "".join(trained.decode(ids).split()) == "".join(clean_text(text).split()), text


def test_trained_bpe_save_and_from_config_round_trip(trained, tmp_path):
    cfg = trained.save(tmp_path)
    assert cfg["type"] == "tokenizers-json" and (tmp_path / cfg["file"]).is_file()
    assert cfg["sot_token_id"] == trained.sot_token_id and cfg["eot_token_id"] == trained.eot_token_id
    again = Tokenizer.from_config(cfg, tmp_path)
    assert again.vocab_size == trained.vocab_size
    assert torch.equal(again(CAPTIONS[:20] + ODD), trained(CAPTIONS[:20] + ODD))
    assert again.to_config() == cfg
    # the file also works on its own in `tokenizers` (its regex splits ordinary text the same way)
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_file(str(tmp_path / cfg["file"]))
    for text in CAPTIONS[:20]:
        assert raw.encode(clean_text(text), add_special_tokens=False).ids == trained.encode(text)


def test_train_bpe_reaches_the_requested_size_on_a_rich_corpus():
    tok = train_bpe(corpus(), vocab_size=800)
    assert tok.vocab_size == 800 and tok.eot_token_id == 799
    assert tok.encode("a photo of a") == [
        320,
        *tok.encode("photo"),
        *tok.encode("of"),
        320,
    ]  # 'a</w>' = 256 + 64


def test_train_bpe_rejects_tiny_vocabularies():
    with pytest.raises(ValueError, match="at least"):
        train_bpe(["a dog"], vocab_size=100)


def test_from_config_errors(trained, tmp_path):
    cfg = trained.save(tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        Tokenizer.from_config({"type": "sentencepiece"})
    with pytest.raises(ValueError):
        Tokenizer.from_config("clip-bpe")
    with pytest.raises(ValueError, match="directory"):
        Tokenizer.from_config(cfg)
    with pytest.raises(ValueError, match="plain file name"):
        Tokenizer.from_config({**cfg, "file": "../tokenizer.json"}, tmp_path)
    with pytest.raises(OSError):
        Tokenizer.from_config({**cfg, "file": "missing.json"}, tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizers JSON"):
        Tokenizer.from_config({**cfg, "file": "bad.json"}, tmp_path)
    with pytest.raises(ValueError, match="eot_token_id"):
        Tokenizer.from_config({**cfg, "eot_token_id": 49407}, tmp_path)


def test_a_backend_read_back_from_a_file_splits_as_openai(trained, tmp_path):
    # fastquery caches the in-memory backend as JSON and hands it back; a trained tokenizer.json
    # carries Rust's regex, which splits U+0345 differently: the Python split must win either way
    from tokenizers import Tokenizer as RawTokenizer

    texts = ["\u0461\u0345f iota", "a\u088fb", *CAPTIONS[:5]]
    for source in (Tokenizer(), trained):
        path = tmp_path / "backend.json"
        source._tk.save(str(path))
        again = Tokenizer(source.context_length, _backend=RawTokenizer.from_file(str(path)))
        assert again.encode_batch(texts) == source.encode_batch(texts)
    trained.save(tmp_path)
    again = Tokenizer(77, _backend=RawTokenizer.from_file(str(tmp_path / "tokenizer.json")))
    assert again.encode_batch(texts) == trained.encode_batch(texts)


def test_a_backend_handed_in_saves_as_what_it_is(trained, tmp_path):
    from tokenizers import Tokenizer as RawTokenizer

    trained._tk.save(str(tmp_path / "trained_backend.json"))
    loose = Tokenizer(77, _backend=RawTokenizer.from_file(str(tmp_path / "trained_backend.json")))
    out = tmp_path / "model"
    cfg = loose.save(out)
    assert cfg["type"] == "tokenizers-json" and (out / "tokenizer.json").is_file()
    assert Tokenizer.from_config(cfg, out).encode_batch(CAPTIONS[:10]) == trained.encode_batch(CAPTIONS[:10])
    Tokenizer()._tk.save(str(tmp_path / "clip_backend.json"))
    clip = Tokenizer(77, _backend=RawTokenizer.from_file(str(tmp_path / "clip_backend.json")))
    assert clip.to_config() == {"type": "clip-bpe", "context_length": 77}


# -- the ASCII shortcut of the clean-up, and the SQLite table the query path reads -------------------


def test_ascii_shortcut_of_the_clean_up_equals_the_full_clean_up():
    from clipsearch.tokenizer import _fix_text

    rng = random.Random(1)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\r"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(2000)]
    texts += ["\"quoted\" it's ``tex'' -- --- ... <b>bold</b> \\x41 \\u00e9 =?utf-8?q?x?=", "A\r\nB\rC\n"]
    for text in texts:
        full = " ".join(_fix_text(text).split()).lower()
        assert clean_text(text) == full, text
    for text in texts[:300]:
        assert clean_text(text) == oc_tokenizer._clean_lower(text), text


def test_table_tokenizer_ids_equal_open_clip(tmp_path, tok):
    from clipsearch.tokenizer_table import TableTokenizer

    tok.save_table(tmp_path / "clip.sqlite")
    table = TableTokenizer(tmp_path / "clip.sqlite")
    assert (table.sot_token_id, table.eot_token_id, table.vocab_size) == (49406, 49407, 49408)
    texts = corpus()
    ref = oc_tokenizer.tokenize(texts)
    for text, row, want in zip(texts, table.rows(texts), ref, strict=True):
        assert row == want[: len(row)].tolist() and want[len(row) :].eq(0).all(), text
    assert table.encode_batch(texts) == tok.encode_batch(texts)
    assert table.encode("a photo of a dog") == [320, 1125, 539, 320, 1929]  # hand-checked with OpenAI's
    word = oc_tokenizer.SimpleTokenizer().encode("word")
    assert table.rows(["word " * 100], context_length=5) == [[49406, *word * 3, 49407]] and len(word) == 1
    assert table.rows([""]) == [[49406, 49407]]


def test_table_tokenizer_of_a_trained_bpe(trained, tmp_path):
    from clipsearch.tokenizer_table import TableTokenizer

    trained.save_table(tmp_path / "trained.sqlite")
    table = TableTokenizer(tmp_path / "trained.sqlite", context_length=16)
    texts = CAPTIONS + ODD + _random_strings(200, seed=3)
    assert table.encode_batch(texts) == trained.encode_batch(texts)
    assert table.rows(texts, 16) == trained.rows(texts, 16)
    for rows in (table.rows(texts, 16), trained.rows(texts, 16)):
        assert all(
            r[0] == trained.sot_token_id and r[-1] == trained.eot_token_id and len(r) <= 16 for r in rows
        )


def test_table_file_is_replaced_atomically_and_bad_files_are_refused(tmp_path, tok):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models

    from clipsearch.tokenizer_table import TableTokenizer

    path = tmp_path / "t.sqlite"
    tok.save_table(path)
    tok.save_table(path)  # over an existing file: no temporary is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.sqlite"]
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="not a tokenizer table"):
        TableTokenizer(tmp_path / "junk.sqlite")
    with pytest.raises(ValueError, match="not a tokenizer table"):
        TableTokenizer(tmp_path / "missing.sqlite")
    with pytest.raises(ValueError, match="context_length"):
        TableTokenizer(path, context_length=1)
    with pytest.raises(ValueError, match="context_length"):
        TableTokenizer(path).rows(["x"], context_length=1)
    # a BPE with dropout would give other ids: refused, not approximated
    raw = RawTokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")], dropout=0.5))
    raw.add_special_tokens(["<start_of_text>", "<end_of_text>"])
    with pytest.raises(ValueError, match="plain byte-level BPE"):
        Tokenizer(77, _backend=raw).save_table(tmp_path / "dropout.sqlite")
    assert not (tmp_path / "dropout.sqlite").exists()


def test_ascii_split_in_re_equals_openais_regex():
    from clipsearch.tokenizer import _ascii_word_pattern, _word_pattern

    rng = random.Random(2)
    alphabet = [chr(c) for c in range(128)]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += corpus() + ["IT'S <START_OF_TEXT> o'neil's 'LL 'd's x<end_of_text>y A1b2 __init__ k\u212a"]
    checked = 0
    for text in texts:
        cleaned = clean_text(text)
        if cleaned.isascii():
            assert _ascii_word_pattern().findall(cleaned) == _word_pattern().findall(cleaned), text
            checked += 1
    assert checked > 2500
