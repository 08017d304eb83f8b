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


class _Close(ImageEncoder):
    """A fast and faithful backend: the fp32 features with a little noise, counting what it embeds."""

    name = "close"

    def __init__(self, bundle):
        self.bundle = bundle
        self.rows = 0

    def __call__(self, batch):
        self.rows += len(batch)
        noise = np.random.default_rng(1).normal(
            scale=1e-4, size=(len(batch), self.bundle.config["embed_dim"])
        )
        return (_fp32(self.bundle, torch.as_tensor(batch)) + noise).astype(np.float32)


def _counting_fp32(monkeypatch, bundle):
    """Make SettlingEncoder's torch-fp32 reference count the photos it embeds."""
    seen = []
    make = backends._make_torch_fp32

    def counting(*args, **kwargs):
        encoder = make(*args, **kwargs)
        run = encoder.__call__

        class Counted(ImageEncoder):
            name = encoder.name

            def __call__(self, batch):
                seen.append(len(batch))
                return run(batch)

        return Counted()

    monkeypatch.setattr(backends, "_make_torch_fp32", counting)
    return seen


def test_first_batch_checks_the_quick_backend_on_a_sample_and_keeps_its_features(monkeypatch):
    bundle = _bundle("test/settle-encoder")
    batch = _batch(bundle, n=20)
    close = _Close(bundle)
    monkeypatch.setitem(backends.BACKENDS, "torch-int8", lambda *a, **kw: close)
    seen = _counting_fp32(monkeypatch, bundle)
    encoder = SettlingEncoder(bundle)
    assert encoder.name == "torch-fp32"
    first = encoder(batch)
    # the quick backend embedded the whole batch once; fp32 only the 8 photos it was checked on
    assert close.rows == 20 and seen == [8]
    assert encoder.name == "close" and set(encoder.measurements) == {"torch-fp32", "torch-int8"}
    assert encoder.measurements["torch-int8"].cosine >= MIN_COSINE
    assert backends.cosine_rows(first, _fp32(bundle, batch)).min() >= MIN_COSINE
    encoder(batch[:3])
    assert close.rows == 23 and seen == [8]  # settled: fp32 is not asked again
    assert backends.needs_measuring(bundle)  # nothing written: the verdict is settle's job


def test_the_real_int8_backend_settles_faithfully_on_a_first_batch():
    bundle = _bundle("test/settle-real-int8")
    batch = _batch(bundle, n=12)
    encoder = SettlingEncoder(bundle)
    first = encoder(batch)
    m = encoder.measurements["torch-int8"]
    assert m.error is None and m.cosine >= MIN_COSINE and m.images_per_s > 0
    # whichever was faster goes on; every photo of the first batch is faithful either way
    assert encoder.name == max(encoder.measurements.values(), key=lambda m: m.images_per_s).name
    assert backends.cosine_rows(first, _fp32(bundle, batch)).min() >= MIN_COSINE
    later = _batch(bundle, seed=9)
    assert backends.cosine_rows(encoder(later), _fp32(bundle, later)).min() >= MIN_COSINE


def test_an_unfaithful_or_broken_quick_backend_is_never_taken(monkeypatch):
    bundle = _bundle("test/settle-unfaithful")

    def broken(*args, **kwargs):
        raise RuntimeError("cannot build here (made to fail by the test)")

    monkeypatch.setitem(backends.BACKENDS, "torch-int8", lambda *a, **kw: _Noise(bundle.config["embed_dim"]))
    monkeypatch.setitem(backends.BACKENDS, "torch-bf16", broken)
    seen = _counting_fp32(monkeypatch, bundle)
    encoder = SettlingEncoder(bundle, candidates=["torch-int8", "torch-bf16"])
    batch = _batch(bundle, n=11)
    first = encoder(batch)
    assert encoder.name == "torch-fp32"
    assert encoder.measurements["torch-int8"].cosine < MIN_COSINE  # fast, but wrong: refused
    assert "made to fail" in encoder.measurements["torch-bf16"].error
    # fp32 embedded the 3 photos outside the sample too, each photo once; all are the reference's
    assert seen == [8, 3]
    np.testing.assert_allclose(first, _fp32(bundle, batch), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(encoder(batch), _fp32(bundle, batch), rtol=1e-5, atol=1e-5)


def test_sample_rows_spreads_over_the_batch():
    assert backends.sample_rows(32, 8) == [0, 4, 9, 13, 18, 22, 27, 31]  # round(i * 31 / 7)
    assert backends.sample_rows(8, 8) == list(range(8))
    assert backends.sample_rows(3, 8) == [0, 1, 2]
    assert backends.sample_rows(1, 8) == [0]


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


def test_the_background_settle_frees_the_model_and_removes_a_killed_settles_leftovers(tmp_path):
    source = str(make_tiny_model(tmp_path / "model"))
    bundle = load_bundle(source)
    directory = cache_dir(bundle.model_id)
    directory.mkdir(parents=True, exist_ok=True)
    # what a settle killed while writing its export leaves: atomic_path's temporary, no lock on it
    stale = directory / ".image-fp32.onnx.k1ll3d_x.tmp"
    stale.write_bytes(b"\x08\x07" * 1000)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    reloads = []

    def reload():
        reloads.append(1)
        return load_bundle(source).model

    chosen = settle.settle(bundle, reload=reload)
    assert reloads == [1] and bundle.model is None  # reloaded once after the text export, then freed
    fresh = load_bundle(source)
    assert chosen in backends.BACKENDS and not settle.needed(fresh)
    assert not stale.exists()
    assert (directory / fastquery.TEXT_WEIGHTS).is_file()
    verdict = json.loads((directory / backends.VERDICT_FILE).read_text())
    assert all(m["error"] is None for m in verdict["backends"].values()), verdict
    # the features the verdict's backend gives are the model's own
    batch = _batch(fresh)
    encoder = backends.make_image_encoder(fresh, "auto")
    assert encoder.name == chosen
    assert backends.cosine_rows(encoder(batch), _fp32(fresh, batch)).min() >= MIN_COSINE


def test_a_settle_child_that_dies_leaves_the_model_to_settle_again(tmp_path, monkeypatch):
    source = str(make_tiny_model(tmp_path / "model"))
    bundle = load_bundle(source)
    monkeypatch.setenv("CLIPSEARCH_BACKGROUND", "1")
    # the child is started for a model folder that is gone by the time it loads it
    proc = settle.start_in_background(str(tmp_path / "moved-away"), bundle.model_id)
    assert proc is not None
    assert proc.wait(timeout=240) != 0
    assert settle.wait(bundle.model_id, timeout=5)  # its lock died with it
    log = (cache_dir(bundle.model_id) / settle.LOG_FILE).read_text()
    assert "moved-away" in log and settle.needed(bundle)  # no verdict: the next index settles again
    assert settle.after_index(bundle, source) == "background"
    assert settle.wait(bundle.model_id, timeout=240)
    assert not settle.needed(bundle), (cache_dir(bundle.model_id) / settle.LOG_FILE).read_text()


class _Placed:
    """``bundle`` as if its model sat on ``device`` (``placement`` is what the backends ask)."""

    def __init__(self, bundle, device: str):
        self.__dict__.update(vars(bundle))
        self.placement = (device, "float32")
        self.name = bundle.model_id


def test_each_device_keeps_its_own_verdict(monkeypatch):
    """A GPU machine that also indexes with --device cpu keeps both verdicts: neither is measured
    over the other (one file per device)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Test GPU")  # in the environment
    bundle = _bundle("test/verdict-per-device")
    batch = _batch(bundle)
    on_gpu = _Placed(bundle, "cuda:1")
    directory = cache_dir(bundle.model_id)
    gpu_plan = {
        "torch-fp16": lambda b, t, d, **kw: _Close(bundle),
        "torch-bf16": lambda b, t, d, **kw: _Noise(8),
    }
    assert backends.choose_backend(on_gpu, candidates=gpu_plan, batch=batch)[0] == "torch-fp16"
    assert backends.verdict_file("cuda:1") == "verdict-cuda-1.json"
    assert not (directory / backends.VERDICT_FILE).exists()
    backends.choose_backend(bundle, candidates={"close": lambda b, t, d, **kw: _Close(bundle)}, batch=batch)
    cpu = json.loads((directory / backends.VERDICT_FILE).read_text())
    gpu = json.loads((directory / "verdict-cuda-1.json").read_text())
    assert (cpu["environment"]["device"], cpu["chosen"]) == ("cpu", "close")
    assert (gpu["environment"]["device"], gpu["environment"]["gpu"], gpu["chosen"]) == (
        "cuda:1",
        "Test GPU",
        "torch-fp16",
    )

    def boom(*args, **kwargs):
        raise AssertionError("the GPU's cached verdict must be used, not measured again")

    assert backends.choose_backend(on_gpu, candidates={"torch-fp16": boom}, batch=batch)[0] == "torch-fp16"


def test_the_background_settle_measures_on_the_device_the_index_embedded_on(tmp_path, monkeypatch):
    """Seen on an H200: `index` embedded on the GPU, but its settle child measured the CPU backends, so
    the GPU never got a verdict and every later index settled again and started another child."""
    started = []

    class Child:
        pid = 4242

    def popen(argv, **kwargs):
        started.append(argv)
        return Child()

    monkeypatch.setenv("CLIPSEARCH_BACKGROUND", "1")
    monkeypatch.setattr(settle.subprocess, "Popen", popen)
    on_gpu = _Placed(_bundle("test/settle-on-gpu"), "cuda:0")
    assert settle.after_index(on_gpu, "MODEL") == "background"
    assert started[0][started[0].index("clipsearch.settle") + 1 :][:3] == ["MODEL", "--device", "cuda:0"]
    # The child exports the text tower from the model on the CPU, then measures on the device.
    loads, settled = [], []

    def load(source, device="cpu"):
        loads.append(device)
        return _bundle("test/settle-on-gpu")

    def fake_settle(bundle, *, locked, reload):
        settled.append(locked)
        reload()

    monkeypatch.setattr("clipsearch.checkpoints.load_bundle", load)
    monkeypatch.setattr(settle, "settle", fake_settle)
    monkeypatch.setattr(settle, "lowest_priority", lambda: None)  # not this test process's priority
    assert settle.main(["MODEL", "--device", "cuda:0", "--lock-fd", "9"]) == 0
    assert loads == ["cpu", "cuda:0"] and settled == [True]


def _autogroup_nice(text: str | None = None) -> str:
    """The session group's nice from ``/proc/self/autogroup`` ('/autogroup-213 nice 0'), or '-' where
    the kernel does not group by session: the file missing, or present and empty (autogroup compiled
    in but switched off, as on some CI kernels)."""
    if text is None:
        try:
            text = Path("/proc/self/autogroup").read_text()
        except OSError:
            return "-"
    fields = text.split()
    return fields[-1] if len(fields) == 3 and fields[1] == "nice" else "-"


@pytest.mark.parametrize("own_session", [True, False])
def test_the_background_settle_yields_to_the_users_session(own_session):
    """nice 19 alone weighs only inside a session's autogroup; the detached settle (its own session)
    lowers its group too, and run by hand in the user's session it leaves that group alone."""
    import json
    import subprocess
    import sys

    probe = (
        "import json, os; from clipsearch.settle import lowest_priority; lowest_priority()\n"
        "try: group = open('/proc/self/autogroup').read()\n"
        "except OSError: group = None\n"
        "print(json.dumps([os.nice(0), group]))"
    )
    before = _autogroup_nice()
    nice, group = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            start_new_session=own_session,
        ).stdout
    )
    assert nice == 19
    after = _autogroup_nice(group) if group is not None else "-"
    if after == "-":
        pytest.skip("this kernel does not group by session (no /proc/self/autogroup, or it is empty)")
    assert after == ("19" if own_session else before)
    if not own_session:  # this test's own session is untouched
        assert _autogroup_nice() == before


@pytest.mark.parametrize("text", ["", "\n", "garbage"])
def test_an_empty_or_odd_autogroup_file_reads_as_no_grouping(text):
    assert _autogroup_nice(text) == "-"
