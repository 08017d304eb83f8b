"""The first index run for a model: nothing measured before the photos, the rest settled afterwards.

``SettlingEncoder`` starts on torch fp32 and keeps the fastest quick backend that is faithful on the
first batch of the user's own photos; ``clipsearch.settle`` does the exports and the full measurement
after the run, in a detached background process from the CLI (or in the foreground when
``CLIPSEARCH_BACKGROUND=0``). References: the model's own fp32 ``encode_image`` on full decodes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from e2e_helpers import make_tiny_model, run_cli
from test_index_fast import _bundle, _fp32_full_decode, _photo, _stored

from clipsearch import backends, fastquery, settle
from clipsearch.backends import MIN_COSINE, ImageEncoder, SettlingEncoder
from clipsearch.checkpoints import load_bundle
from clipsearch.indexer import index_paths
from clipsearch.paths import cache_dir
from clipsearch.store import Library


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("settle-photos")
    return root, [_photo(root / f"IMG_{i}.jpg", 30 + i) for i in range(5)]


def _batch(bundle, n=6, seed=3):
    return backends.calibration_batch(bundle, n=n, seed=seed)


def _fp32(bundle, batch) -> np.ndarray:
    with torch.no_grad():
        return bundle.model.encode_image(batch).numpy()


class _Noise(ImageEncoder):
    """A fast backend that is wrong: features unrelated to the picture."""

    name = "noise"

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, batch):
        return np.random.default_rng(0).normal(size=(len(batch), self.dim)).astype(np.float32)


def test_first_batch_is_fp32_then_a_faithful_quick_backend_takes_over(monkeypatch):
    bundle = _bundle("test/settle-encoder")
    batch = _batch(bundle)
    encoder = SettlingEncoder(bundle)
    assert encoder.name == "torch-fp32"
    first = encoder(batch)
    np.testing.assert_allclose(first, _fp32(bundle, batch), rtol=1e-5, atol=1e-5)  # the reference itself
    assert set(encoder.measurements) == {"torch-fp32", "torch-int8"}
    m = encoder.measurements["torch-int8"]
    assert m.error is None and m.cosine >= MIN_COSINE and m.images_per_s > 0
    # the run goes on with the faster of the two; whichever it is, it stays faithful
    faster = max(encoder.measurements.values(), key=lambda m: m.images_per_s).name
    assert encoder.name == faster
    later = _batch(bundle, seed=9)
    assert backends.cosine_rows(encoder(later), _fp32(bundle, later)).min() >= MIN_COSINE
    assert backends.needs_measuring(bundle)  # nothing written: the verdict is settle's job


def test_an_unfaithful_or_broken_quick_backend_is_never_taken(monkeypatch):
    bundle = _bundle("test/settle-unfaithful")

    def broken(*args):
        raise RuntimeError("cannot build here (made to fail by the test)")

    monkeypatch.setitem(backends.BACKENDS, "torch-int8", lambda *a: _Noise(bundle.config["embed_dim"]))
    monkeypatch.setitem(backends.BACKENDS, "torch-bf16", broken)
    encoder = SettlingEncoder(bundle, candidates=["torch-int8", "torch-bf16"])
    batch = _batch(bundle)
    encoder(batch)
    assert encoder.name == "torch-fp32"
    assert encoder.measurements["torch-int8"].cosine < MIN_COSINE  # fast, but wrong: refused
    assert "made to fail" in encoder.measurements["torch-bf16"].error
    np.testing.assert_allclose(encoder(batch), _fp32(bundle, batch), rtol=1e-5, atol=1e-5)


def test_the_first_index_measures_nothing_up_front(monkeypatch, tmp_path, photos):
    root, paths = photos
    bundle = _bundle("test/settle-first-index")

    def no_measuring(*args, **kwargs):
        raise AssertionError("the first index run must not measure before the photos")

    monkeypatch.setattr(backends, "choose_backend", no_measuring)
    monkeypatch.setattr(backends, "image_onnx_path", no_measuring)
    events = []
    with Library.open(tmp_path / "lib.db", create=True) as lib:
        report = index_paths(lib, bundle, [root], backend="auto", batch_size=2, progress=events.append)
        stored = _stored(lib, bundle.model_id, paths)
    assert {"event": "backend", "status": "settling"} in events
    assert report.new == len(paths) and report.backend in ("torch-fp32", "torch-int8")
    assert backends.cosine_rows(stored, _fp32_full_decode(bundle, paths)).min() >= MIN_COSINE
    assert not list(cache_dir(bundle.model_id).glob("*.onnx"))  # no export in the user's way


def test_settle_writes_the_verdict_and_the_text_export_then_index_uses_them(tmp_path, photos):
    root, paths = photos
    bundle = load_bundle(str(make_tiny_model(tmp_path / "model")))
    assert settle.needed(bundle)
    chosen = settle.settle(bundle)
    assert chosen in backends.BACKENDS and not settle.needed(bundle)
    verdict = json.loads((cache_dir(bundle.model_id) / backends.VERDICT_FILE).read_text())
    assert verdict["chosen"] == chosen and set(verdict["backends"]) >= {"torch-fp32", "onnx-int8"}
    assert fastquery.TEXT_WEIGHTS in os.listdir(cache_dir(bundle.model_id))
    events = []
    with Library.open(tmp_path / "lib.db", create=True) as lib:
        report = index_paths(lib, bundle, [root], backend="auto", progress=events.append)
    assert report.backend == chosen and {"event": "backend", "status": "settling"} not in events


def test_one_settle_at_a_time(tmp_path):
    bundle = _bundle("test/settle-lock")
    held = settle._try_lock(bundle.model_id)
    try:
        assert settle.settle(bundle) is None  # another process has it: nothing done twice
        assert settle.start_in_background("unused", bundle.model_id) is None
        assert not settle.wait(bundle.model_id, timeout=0.3)
    finally:
        os.close(held)
    assert settle.wait(bundle.model_id, timeout=5)


def test_cli_first_index_settles_in_a_background_process(tmp_path, monkeypatch):
    """As a user meets it: `index` returns, a detached child exports and measures, queries then
    run without torch; a second index uses the verdict."""
    model = make_tiny_model(tmp_path / "model")
    photos = tmp_path / "photos"
    for i in range(4):
        _photo(photos / f"IMG_{i}.jpg", 50 + i)
    home = tmp_path / "home"
    env = {"CLIPSEARCH_HOME": str(home), "CLIPSEARCH_BACKGROUND": "1"}
    db = tmp_path / "lib.db"
    first = run_cli("--db", str(db), "index", str(photos), "--model", str(model), "--json", env=env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["backend"] in ("torch-fp32", "torch-int8")
    monkeypatch.setenv("CLIPSEARCH_HOME", str(home))
    bundle = load_bundle(str(model))
    deadline = time.monotonic() + 240
    while settle.needed(bundle) and time.monotonic() < deadline:  # the child may not have the lock yet
        settle.wait(bundle.model_id, timeout=5)
        time.sleep(0.2)
    assert settle.wait(bundle.model_id, timeout=240)
    log = (cache_dir(bundle.model_id) / settle.LOG_FILE).read_text()
    assert not settle.needed(bundle), log
    assert "settled" in log and (cache_dir(bundle.model_id) / fastquery.TEXT_WEIGHTS).is_file()
    verdict = json.loads((cache_dir(bundle.model_id) / backends.VERDICT_FILE).read_text())
    second = run_cli(
        "--db", str(tmp_path / "second.db"), "index", str(photos), "--model", str(model), "--json", env=env
    )
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["backend"] == verdict["chosen"]
    assert Path(cache_dir(bundle.model_id) / settle.LOCK_FILE).is_file()
