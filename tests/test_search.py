"""Search: query vectors against the model computed by hand, rankings against brute force over the
stored embeddings, literal subtree filters, thresholds and the errors a user can cause."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from e2e_helpers import make_tiny_model, write_photo
from PIL import Image

from clipsearch.checkpoints import load_bundle
from clipsearch.encoders import ModelEncoder, encode
from clipsearch.errors import LibraryError
from clipsearch.filters import PhotoFilter
from clipsearch.indexer import index_paths
from clipsearch.search import Query, QueryError, QueryPart, search
from clipsearch.store import Library


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    bundle = load_bundle(make_tiny_model(root / "tiny"))
    photos = root / "photos"
    for n in range(6):
        write_photo(photos / f"p{n}.jpg", 10 + n)
    # Folder names a LIKE pattern would confuse: '%' and '_' must match literally.
    write_photo(photos / "50%_off" / "sale.png", 20)
    write_photo(photos / "50x_off" / "other.png", 21)
    write_photo(photos / "5000off" / "third.png", 22)
    lib = Library.open(photos / "lib.db", create=True)
    # torch-fp32: the queries below encode with the model itself, and module fixtures share one home,
    # where another module's index may have left a verdict for this tiny model (e.g. torch-int8)
    index_paths(lib, bundle, [photos], workers=1, backend="torch-fp32")
    yield lib, bundle, photos
    lib.close()


def encode_query(bundle, query):
    return encode(query, ModelEncoder(bundle), None)


def _text_vec(bundle, text: str) -> torch.Tensor:
    with torch.no_grad():
        f = bundle.model.encode_text(bundle.tokenizer([text]))[0]
    return f / f.norm()


def test_text_query_vector_is_the_normalised_text_embedding(setup):
    _, bundle, _ = setup
    got = encode_query(bundle, Query([QueryPart("text", "a dog on a beach")]))
    np.testing.assert_allclose(got, _text_vec(bundle, "a dog on a beach").numpy(), atol=1e-6)
    assert got.dtype == np.float32


def test_combined_query_is_the_normalised_weighted_sum(setup):
    _, bundle, photos = setup
    q = Query.build(
        "beach", add=["sunset"], minus=["people"], minus_image=[photos / "p1.jpg"], minus_weight=0.5
    )
    assert q.describe() == "'beach' + 'sunset' - 0.5*'people' - 0.5*image:" + str(photos / "p1.jpg")
    img = bundle.preprocess(Image.open(photos / "p1.jpg").convert("RGB"))
    with torch.no_grad():
        iv = bundle.model.encode_image(img[None])[0]
    iv = iv / iv.norm()
    total = (
        _text_vec(bundle, "beach")
        + _text_vec(bundle, "sunset")
        - 0.5 * _text_vec(bundle, "people")
        - 0.5 * iv
    )
    np.testing.assert_allclose(encode_query(bundle, q), (total / total.norm()).numpy(), atol=1e-5)


def test_ranking_equals_brute_force_over_stored_embeddings(setup):
    lib, bundle, _ = setup
    q = Query.build("a red square", minus=["blue"])
    hits = search(lib, ModelEncoder(bundle), q, top=5)
    ids, paths, vectors = lib.embeddings(bundle.model_id)
    scores = vectors @ encode_query(bundle, q)
    order = np.argsort(-scores)[:5]
    assert [h.image_id for h in hits] == ids[order].tolist()
    np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
    assert [h.path for h in hits] == [paths[i] for i in order]
    assert all(h.path.is_absolute() and h.path.exists() for h in hits)


def test_query_by_an_indexed_image_finds_itself_first(setup):
    lib, bundle, photos = setup
    hits = search(lib, ModelEncoder(bundle), Query.build(image=photos / "p3.jpg"), top=3)
    assert hits[0].path == photos / "p3.jpg"
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[1].score < hits[0].score


def test_subtree_filter_is_literal(setup):
    lib, bundle, photos = setup
    hits = search(
        lib, ModelEncoder(bundle), Query.build("sale"), top=20, filters=PhotoFilter(under=photos / "50%_off")
    )
    assert [h.path for h in hits] == [photos / "50%_off" / "sale.png"]
    assert (
        len(search(lib, ModelEncoder(bundle), Query.build("sale"), top=20, filters=PhotoFilter(under=photos)))
        == 9
    )
    assert (
        search(
            lib, ModelEncoder(bundle), Query.build("sale"), filters=PhotoFilter(under=photos / "nothing-here")
        )
        == []
    )


def test_threshold_and_top(setup):
    lib, bundle, photos = setup
    every = search(lib, ModelEncoder(bundle), Query.build(image=photos / "p0.jpg"), top=100)
    assert len(every) == 9
    cut = (every[2].score + every[3].score) / 2
    kept = search(lib, ModelEncoder(bundle), Query.build(image=photos / "p0.jpg"), top=100, threshold=cut)
    assert [h.image_id for h in kept] == [h.image_id for h in every[:3]]
    assert len(search(lib, ModelEncoder(bundle), Query.build("x"), top=2)) == 2
    assert search(lib, ModelEncoder(bundle), Query.build("x"), threshold=1.01) == []


def test_query_errors(setup, tmp_path):
    lib, bundle, photos = setup
    with pytest.raises(QueryError, match="empty query"):
        search(lib, ModelEncoder(bundle), Query([]))
    with pytest.raises(QueryError, match="cancel out"):
        search(lib, ModelEncoder(bundle), Query.build("beach", minus=["beach"]))
    with pytest.raises(QueryError, match="missing.jpg: no such file"):
        search(lib, ModelEncoder(bundle), Query.build(image=tmp_path / "missing.jpg"))
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(QueryError, match="cannot read the query image"):
        search(lib, ModelEncoder(bundle), Query.build(image=tmp_path / "text.jpg"))
    with pytest.raises(QueryError, match="at least 1"):
        search(lib, ModelEncoder(bundle), Query.build("x"), top=0)
    with pytest.raises(QueryError, match="empty query text"):
        search(lib, ModelEncoder(bundle), Query.build("   "))
    other = load_bundle(make_tiny_model(tmp_path / "other", seed=1))
    with pytest.raises(LibraryError, match="no embeddings of model"):
        search(lib, ModelEncoder(other), Query.build("x"))


def test_a_warm_searcher_builds_an_image_export_once(monkeypatch, tmp_path):
    """The web keeps its searcher warm: the ONNX session of uploaded pictures is built once."""
    from types import SimpleNamespace

    from clipsearch import encoders
    from clipsearch.search import Searcher

    built = []
    monkeypatch.setattr(encoders, "make_image_export", lambda bundle, name: built.append(name) or object())
    bundle = SimpleNamespace(model_id="m1")
    warm = Searcher(tmp_path / "lib.db", warm=True)
    assert warm._image_export(bundle, "onnx-fp32") is warm._image_export(bundle, "onnx-fp32")
    assert built == ["onnx-fp32"]
    warm._image_export(bundle, "onnx-int8")  # another backend is another session
    cold = Searcher(tmp_path / "lib.db")  # a command's: nothing kept
    cold._image_export(bundle, "onnx-fp32")
    cold._image_export(bundle, "onnx-fp32")
    assert built == ["onnx-fp32", "onnx-int8", "onnx-fp32", "onnx-fp32"]


def test_a_warm_searcher_loads_a_model_without_holding_up_other_searches(setup):
    """The web's searcher is warm and shared: a query that needs the model (an uploaded picture,
    --model) loads it for seconds, and searches by indexed photos or texts must not wait for that."""
    import threading

    from clipsearch.search import Searcher

    lib, bundle, photos = setup
    source = lib.model_source(lib.default_model_id())
    loading, release = threading.Event(), threading.Event()
    loads = []

    def slow_load(src, library):
        loads.append(src)
        loading.set()
        assert release.wait(60), "the test never let the load finish"
        return bundle

    searcher = Searcher(photos / "lib.db", warm=True, ask_daemon=False, load_model=slow_load)
    needs_model = {}
    upload = threading.Thread(
        target=lambda: needs_model.update(
            answer=searcher.run(Query.build(image=photos / "p2.jpg"), top=3, model=source)
        )
    )
    upload.start()
    try:
        assert loading.wait(60)
        (other_id,) = lib.image_ids_under(photos / "p4.jpg")
        done = threading.Event()
        meanwhile = {}

        def search_by_photo():
            meanwhile["answer"] = searcher.run(Query([QueryPart.indexed(other_id)]), top=3)
            done.set()

        threading.Thread(target=search_by_photo, daemon=True).start()
        assert done.wait(30), "a search by an indexed photo waited for the model to load"
        assert meanwhile["answer"].hits[0].image_id == other_id
    finally:
        release.set()
        upload.join(60)
    assert needs_model["answer"].hits[0].path == photos / "p2.jpg"
    assert loads == [source]  # loaded once, outside the lock, then used
    searcher.run(Query.build(image=photos / "p3.jpg"), top=1, model=source)
    assert loads == [source]  # kept warm
    searcher.close()
