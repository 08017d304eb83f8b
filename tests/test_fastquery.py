"""The torch-free query path gives the torch text tower's features and the same search results."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from clipsearch import fastquery
from clipsearch.checkpoints import ModelBundle
from clipsearch.configs import get_config
from clipsearch.encoders import ExportedTextEncoder, ModelEncoder, QueryEncoder
from clipsearch.errors import LibraryError
from clipsearch.model import build_model
from clipsearch.search import Query, QueryError, search
from clipsearch.store import Library
from clipsearch.tokenizer import Tokenizer, train_bpe
from clipsearch.transform import PreprocessConfig

TEXTS = [
    "a dog",
    "",
    "A photo of a cat sitting on a red sofa, next to a window at sunset",
    "café déjà vu &amp; naïve — “quotes”",
    "the literal <end_of_text> and <<start_of_text>> tokens",
    " ".join(["word"] * 120),  # longer than the context: cut, end-of-text kept last
    "12345 ok",
    "  Tabs\tand\nnew lines\r\n, UPPER case!? (yes) 'it's' \"double\" #hash @at ~tilde^ {}[]|\\ ",
    "fish &amp; chips &lt;b&gt; &amp;amp;",  # HTML entities: the full clean-up, not the ASCII shortcut
    "x\x00y\x1bz",  # control characters ftfy removes
    "ﬁsh ｆｕｌｌ width",  # ligature and full-width letters ftfy folds
]


def _bundle(model_id: str, tokenizer=None, seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    cfg = get_config("tiny-vit")
    if tokenizer is not None:  # as the trainer builds it: the text tower sized to its own tokenizer
        cfg["text_cfg"].update(vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length)
    model = build_model(cfg).eval()
    return ModelBundle(model, PreprocessConfig(image_size=64), tokenizer or Tokenizer(), model_id, cfg)


@pytest.fixture
def tiny():
    bundle = _bundle("test/tiny-text")
    fastquery.ensure_text_encoder(bundle)
    return bundle


def _torch_features(bundle, texts, eot_cut=True) -> np.ndarray:
    model = bundle.model
    model._eot_cut = eot_cut
    try:
        with torch.no_grad():
            return model.encode_text(bundle.tokenizer(texts)).numpy()
    finally:
        model._eot_cut = True


@pytest.mark.parametrize("eot_cut", [True, False])
def test_torch_free_text_features_equal_the_torch_text_tower(tiny, eot_cut):
    for texts in (TEXTS, TEXTS[:1], TEXTS[2:3], TEXTS[5:], ["x"] * 3):  # batches of different cut lengths
        ours = fastquery.text_features("test/tiny-text", texts, normalize=False, cache=False)
        ref = _torch_features(tiny, texts, eot_cut)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_the_numpy_tower_gives_the_torch_features(quick_gelu):
    torch.manual_seed(3)
    cfg = {**get_config("tiny-vit"), "quick_gelu": quick_gelu}
    bundle = ModelBundle(
        build_model(cfg).eval(), PreprocessConfig(image_size=64), Tokenizer(), "test/act", cfg
    )
    fastquery.ensure_text_encoder(bundle)
    encoder = fastquery.TextEncoder("test/act")
    assert encoder.meta["numpy"]["act"] == ("QuickGELU" if quick_gelu else "GELU")
    for texts in (TEXTS, TEXTS[:1], TEXTS[5:6], ["x"] * 3):
        ref = _torch_features(bundle, texts)
        ours = encoder(texts)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
        cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.9999


def test_a_text_tower_the_numpy_one_cannot_compute_is_not_exported():
    bundle = _bundle("test/tanh-gelu")
    for block in bundle.model.transformer.resblocks:
        block.mlp.gelu = torch.nn.GELU(approximate="tanh")
    with pytest.raises(fastquery.TextEncoderUnsupported, match="activation"):
        fastquery.ensure_text_encoder(bundle)
    with pytest.raises(fastquery.TextEncoderMissing):
        fastquery.TextEncoder("test/tanh-gelu")  # its queries load the model instead


def test_normalised_features_and_the_cache_give_the_same_answer(tiny, monkeypatch):
    first = fastquery.text_features("test/tiny-text", TEXTS)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    ref = _torch_features(tiny, TEXTS)
    np.testing.assert_allclose(first, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)

    def no_model(*args):
        raise AssertionError("cached texts must not run the model")

    monkeypatch.setattr(fastquery.TextEncoder, "__call__", no_model)
    again = fastquery.text_features("test/tiny-text", list(reversed(TEXTS)))
    np.testing.assert_array_equal(again, first[::-1])
    with pytest.raises(AssertionError, match="must not run"):
        fastquery.text_features("test/tiny-text", ["never seen before"])


def test_tokens_equal_the_tokenizer_cut_after_the_last_end_of_text(tiny):
    ids = fastquery.tokenize("test/tiny-text", TEXTS)
    full = Tokenizer()(TEXTS).numpy()
    assert ids.shape == (len(TEXTS), 77)  # the 120-word text fills the context
    np.testing.assert_array_equal(ids, full)
    short = fastquery.tokenize("test/tiny-text", ["a dog", "a"])
    assert short.shape == (2, 4)  # start, a, dog, end
    np.testing.assert_array_equal(short, Tokenizer()(["a dog", "a"]).numpy()[:, :4])


def test_a_trained_tokenizer_is_exported_with_the_model():
    corpus = [f"photo number {i} of a red bicycle near the sea" for i in range(200)]
    tok = train_bpe(corpus, vocab_size=600, context_length=16)
    bundle = _bundle("test/trained-bpe", tokenizer=tok)
    fastquery.ensure_text_encoder(bundle)
    texts = ["a red bicycle", "sea", "a very very long text that is longer than sixteen tokens for sure, yes"]
    np.testing.assert_array_equal(fastquery.tokenize("test/trained-bpe", texts), tok(texts).numpy())
    ours = fastquery.text_features("test/trained-bpe", texts, normalize=False)
    np.testing.assert_allclose(ours, _torch_features(bundle, texts), rtol=1e-4, atol=1e-5)


def test_an_unexported_model_is_a_typed_error():
    with pytest.raises(fastquery.TextEncoderMissing, match="no fast text encoder for model 'never/exported'"):
        fastquery.text_features("never/exported", ["a dog"])


def test_export_is_done_once_and_redone_when_incomplete(tiny):
    path = fastquery.ensure_text_encoder(tiny)
    stamp = path.stat().st_mtime_ns
    assert fastquery.ensure_text_encoder(tiny) == path and path.stat().st_mtime_ns == stamp
    assert path.name == fastquery.TEXT_WEIGHTS and path.stat().st_size > 49408 * 64 * 4  # embedding and all
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    (path.parent / fastquery.TEXT_META).unlink()  # an export interrupted before its meta file
    with pytest.raises(fastquery.TextEncoderMissing):
        fastquery._meta("test/tiny-text")
    fastquery.ensure_text_encoder(tiny)
    np.testing.assert_allclose(
        fastquery.text_features("test/tiny-text", ["a dog"], normalize=False, cache=False),
        _torch_features(tiny, ["a dog"]),
        rtol=1e-4,
        atol=1e-5,
    )


def _library(tmp_path, bundle, n=40) -> Library:
    lib = Library.open(tmp_path / "lib.db", create=True)
    lib.register_model(bundle.model_id, "test", dim=32)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    (tmp_path / "photos").mkdir()
    with lib.transaction():
        for i, v in enumerate(vectors):
            path = tmp_path / "photos" / f"{i}.jpg"
            image_id = lib.add_image(path, size=1, mtime_ns=1, content_hash=f"h{i}")
            lib.put_embedding(image_id, bundle.model_id, v)
    return lib


def test_search_gives_the_torch_path_results(tiny, tmp_path):
    lib = _library(tmp_path, tiny)
    for query in (Query.build("a dog"), Query.build("beach", add=["sunset"], minus=["people"])):
        fast = search(lib, ExportedTextEncoder(tiny.model_id), query, top=5)
        slow = search(lib, ModelEncoder(tiny), query, top=5)
        assert [h.image_id for h in fast] == [h.image_id for h in slow] and len(fast) == 5
        np.testing.assert_allclose([h.score for h in fast], [h.score for h in slow], rtol=1e-4, atol=1e-5)
        assert [h.path for h in fast] == [h.path for h in slow]
    fast = ExportedTextEncoder(tiny.model_id)
    with pytest.raises(QueryError, match="need the model"):
        search(lib, fast, Query.build(image="x.jpg"))
    with pytest.raises(QueryError, match="empty query text"):
        search(lib, fast, Query.build("  "))
    with pytest.raises(QueryError, match="cancel out"):
        search(lib, fast, Query.build("dog", minus=["dog"]))
    with pytest.raises(LibraryError, match=r"no embeddings of model other \(it has: test\)"):
        search(lib, QueryEncoder("other"), Query.build("dog"))
    lib.close()


def test_a_query_process_never_imports_torch(tiny, tmp_path):
    _library(tmp_path, tiny).close()
    script = textwrap.dedent(
        f"""
        import sys
        from clipsearch.search import Query, Searcher
        answer = Searcher({str(tmp_path / "lib.db")!r}).run(Query.build("a dog on a beach"), top=3)
        assert len(answer.hits) == 3 and answer.encoder == "torch-free", answer
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("TORCH", loaded)
        print("FTFY", "ftfy" in sys.modules)  # a plain ASCII query skips it (0.1 s to import)
        print("TOKENIZERS", "tokenizers" in sys.modules)  # the BPE table needs no Rust BPE (0.15 s)
        """
    )
    env = {**os.environ, "CLIPSEARCH_HOME": os.environ["CLIPSEARCH_HOME"]}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TORCH []" in out.stdout
    assert "FTFY False" in out.stdout
    assert "TOKENIZERS False" in out.stdout


def test_the_query_command_imports_only_what_a_text_query_needs(tiny, tmp_path):
    lib = _library(tmp_path, tiny)
    lib.close()
    command = [sys.executable, "-X", "importtime", "-m", "clipsearch", "--db", str(lib.path), "query"]
    out = subprocess.run(
        [*command, "a dog on a beach", "--top", "3", "--paths"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout.splitlines()) == 3
    imported = {
        line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")
    }
    assert {"numpy", "faiss"} <= imported  # the work itself: the text tower runs in numpy
    unneeded = {
        "torch",
        "onnxruntime",
        "tokenizers",
        "regex",
        "ftfy",
        "rich",
        "PIL",
        "matplotlib",
        "onnx",
        "clipsearch.backends",  # only for indexing; the query needs just paths.cache_dir
    }
    assert not (unneeded & imported), unneeded & imported


def test_an_export_of_version_1_or_with_a_damaged_tokenizer_is_exported_again(tiny):
    directory = fastquery.cache_dir(tiny.model_id)
    meta = json.loads((directory / fastquery.TEXT_META).read_text())
    (directory / fastquery.TEXT_META).write_text(json.dumps({**meta, "version": 1}))
    (directory / "tokenizer.json").write_text("{}")  # what version 1 had
    (directory / "text-fp32.onnx.data").write_bytes(b"0" * 64)  # what version 2 had: disk to free
    with pytest.raises(fastquery.TextEncoderMissing):
        fastquery.text_features(tiny.model_id, ["a dog"])
    fastquery.ensure_text_encoder(tiny)
    assert not (directory / "tokenizer.json").exists() and not (directory / "text-fp32.onnx.data").exists()
    assert fastquery.tokenize(tiny.model_id, ["a dog"]).tolist() == [[49406, 320, 1929, 49407]]
    (directory / fastquery.TEXT_TOKENIZER).write_bytes(b"garbage" * 100)
    fastquery._ENCODERS.clear()
    with pytest.raises(fastquery.TextEncoderMissing, match="damaged"):
        fastquery.text_features(tiny.model_id, ["a cat"])


def test_a_new_export_replaces_the_encoder_this_process_holds(tiny):
    first = fastquery.encoder(tiny.model_id)
    assert fastquery.encoder(tiny.model_id) is first  # kept while the export is unchanged
    other = _bundle(tiny.model_id, seed=1)  # same id, other weights: e.g. a model file replaced
    (fastquery.cache_dir(tiny.model_id) / fastquery.TEXT_META).unlink()
    fastquery.ensure_text_encoder(other)
    # as if another process (an `index` run) had exported: this one still holds the old encoder
    fastquery._ENCODERS[(tiny.model_id, fastquery.cache_dir(tiny.model_id))] = first
    assert fastquery.encoder(tiny.model_id) is not first
    np.testing.assert_allclose(
        fastquery.text_features(tiny.model_id, ["a dog"], normalize=False),  # the cache was dropped too
        _torch_features(other, ["a dog"]),
        rtol=1e-4,
        atol=1e-5,
    )
