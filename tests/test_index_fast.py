"""The indexer's fast path (inference backends + JPEG draft decoding) on real JPEG files.

Every fast path is compared with an fp32 reference computed here independently (full decode, the
model's own ``encode_image``); the fallbacks are driven by backends made to fail.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clipsearch import backends
from clipsearch.backends import MIN_COSINE, BackendError, ImageEncoder
from clipsearch.checkpoints import ModelBundle
from clipsearch.configs import get_config
from clipsearch.errors import ModelLoadError
from clipsearch.imageio import open_image
from clipsearch.indexer import default_workers, index_paths
from clipsearch.model import build_model
from clipsearch.store import Library
from clipsearch.transform import PreprocessConfig
from clipsearch.walk import walk

SIZE = 64  # tiny-vit's input side


def _bundle(model_id: str = "test/tiny-vit-fast", seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    cfg = get_config("tiny-vit")
    model = build_model(cfg).eval()
    pp = PreprocessConfig(image_size=cfg["vision_cfg"]["image_size"])
    return ModelBundle(model=model, preprocess_cfg=pp, tokenizer=None, model_id=model_id, config=cfg)


def _photo(path: Path, seed: int, size=(720, 540), orientation: int | None = None) -> Path:
    """A photo-like JPEG large enough that the decoder can draft it down (1/8 keeps >= 64 px)."""
    w, h = size
    small = Image.fromarray(backends.synthetic_photo(np.random.default_rng(seed), w // 4, h // 4))
    pixels = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.int16)
    pixels += np.random.default_rng(seed).integers(-4, 5, pixels.shape, dtype=np.int16)  # grain
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90, **kwargs)
    return path


@pytest.fixture(scope="module")
def tiny():
    return _bundle()


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    paths = [_photo(root / f"IMG_{i}.jpg", i) for i in range(5)]
    paths.append(_photo(root / "portrait.jpg", 9, orientation=6))  # stored 720x540, upright 540x720
    return root, paths


@pytest.fixture
def lib(tmp_path):
    library = Library.open(tmp_path / "lib.db", create=True)
    yield library
    library.close()


def _fp32_full_decode(bundle, paths) -> np.ndarray:
    """The reference: full decode, the eval transform, the model's own fp32 encode_image."""
    with torch.no_grad():
        x = torch.stack([bundle.preprocess(open_image(p)) for p in paths])  # [N, 3, 64, 64]
        return torch.nn.functional.normalize(bundle.model.encode_image(x), dim=-1).numpy()


def _stored(lib, model_id, paths) -> np.ndarray:
    _, stored, vecs = lib.embeddings(model_id)
    row = {Path(p): i for i, p in enumerate(stored)}
    return vecs[[row[p] for p in paths]]


# --- fidelity of the fast path ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["onnx-int8", "torch-int8"])
def test_forced_fast_backend_with_draft_decode_is_faithful_to_fp32_full_decode(lib, tiny, jpegs, name):
    root, paths = jpegs
    report = index_paths(lib, tiny, [root], batch_size=4, backend=name)
    assert report.new == len(paths) and report.backend == name and report.backend_note == ""
    cos = backends.cosine_rows(_stored(lib, tiny.model_id, paths), _fp32_full_decode(tiny, paths))
    assert cos.min() >= MIN_COSINE, cos
    # and not trivially: the fp32 reference of *different* photos is far away
    other = backends.cosine_rows(_stored(lib, tiny.model_id, paths), _fp32_full_decode(tiny, paths[::-1]))
    assert other.min() < 0.99


def test_auto_on_the_cpu_picks_a_faithful_backend_and_reuses_its_verdict(lib, tiny, jpegs, monkeypatch):
    root, paths = jpegs
    events = []
    # first use: nothing measured before the photos; the run settles on them (tests/test_settle.py)
    first = index_paths(lib, tiny, [root], backend="auto", progress=events.append)
    assert {"event": "backend", "status": "settling"} in events
    assert first.backend in ("torch-fp32", "torch-int8") and first.backend_note == ""
    cos = backends.cosine_rows(_stored(lib, tiny.model_id, paths), _fp32_full_decode(tiny, paths))
    assert cos.min() >= MIN_COSINE, cos
    # the one-time measurement (the CLI runs it after the index), then a second library uses its verdict
    chosen, _ = backends.choose_backend(tiny)
    events.clear()
    with Library.open(lib.path.parent / "second.db", create=True) as second:
        report = index_paths(second, tiny, [root], backend="auto", progress=events.append)
        again = backends.cosine_rows(_stored(second, tiny.model_id, paths), _fp32_full_decode(tiny, paths))
    assert report.backend == chosen and report.backend in backends.BACKENDS and report.backend_note == ""
    assert {"event": "backend", "name": report.backend} in events
    assert {"event": "backend", "status": "settling"} not in events
    assert again.min() >= MIN_COSINE, again


def test_nothing_to_embed_never_measures_backends(lib, tiny, jpegs, monkeypatch):
    root, _ = jpegs
    index_paths(lib, tiny, [root], backend="torch-fp32")

    def boom(*args, **kwargs):
        raise AssertionError("no file needs the model: no backend should be built")

    monkeypatch.setattr(backends, "make_image_encoder", boom)
    report = index_paths(lib, tiny, [root], backend="auto")
    assert report.unchanged == 6 and report.backend == ""


# --- draft decoding and the recorded sizes -------------------------------------------------------


def test_jpegs_are_draft_decoded_and_rows_keep_the_full_upright_size(lib, tiny, jpegs, monkeypatch):
    from PIL import JpegImagePlugin

    root, paths = jpegs
    real_draft = JpegImagePlugin.JpegImageFile.draft
    drafted = []

    def spy(self, mode, size, *args, **kwargs):
        stored = self.size
        result = real_draft(self, mode, size, *args, **kwargs)
        drafted.append((stored, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    index_paths(lib, tiny, [root], backend="torch-fp32")
    # every JPEG went through draft, at 1/8 scale: 720x540 -> 90x68, still >= 64 on the short side
    assert sorted(drafted) == [((720, 540), (90, 68))] * len(paths)
    rows = {r.path.name: (r.width, r.height) for r in lib.images()}
    assert rows.pop("portrait.jpg") == (540, 720)  # EXIF orientation 6: turned upright, full size
    assert set(rows.values()) == {(720, 540)}
    # what the model saw is the draft: the stored embedding is the draft's fp32 embedding exactly
    with torch.no_grad():
        x = torch.stack([tiny.preprocess(open_image(p, draft_size=SIZE)) for p in paths])
        want = torch.nn.functional.normalize(tiny.model.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(_stored(lib, tiny.model_id, paths), want, atol=1e-5)


# --- the CLI's names ------------------------------------------------------------------------------


def test_cli_backend_choices_are_the_library_backends():
    from clipsearch import cli

    option = next(p for p in cli.cli.commands["index"].params if p.name == "backend")
    assert option.type.choices == ("auto", *backends.BACKENDS)  # --help offers what backends builds


def test_bogus_backend_is_a_clear_cli_error(tmp_path, jpegs):
    from clipsearch import cli

    root, _ = jpegs
    result = CliRunner().invoke(
        cli.cli, ["--db", str(tmp_path / "lib.db"), "index", str(root), "--backend", "bogus"]
    )
    assert result.exit_code != 0
    assert "bogus" in result.output and "onnx-int8" in result.output  # says what is allowed
    assert not (tmp_path / "lib.db").exists()  # refused before anything was created


def test_forced_backend_that_cannot_run_is_one_cli_line(tmp_path, jpegs, monkeypatch):
    from e2e_helpers import make_tiny_model

    from clipsearch import cli

    root, _ = jpegs
    model = make_tiny_model(tmp_path / "model")
    monkeypatch.setitem(backends.BACKENDS, "onnx-int8", _fails_to_build)
    args = [
        "--db",
        str(tmp_path / "lib.db"),
        "index",
        str(root),
        "--model",
        str(model),
        "--backend",
        "onnx-int8",
    ]
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 1, result.output
    assert "onnx-int8 backend cannot run on this machine" in result.output
    assert "Traceback" not in result.output
    ok = CliRunner().invoke(cli.cli, [*args[:-1], "torch-int8", "--json"])  # another one runs
    assert ok.exit_code == 0, ok.output


def test_bogus_backend_is_a_typed_library_error(lib, tiny, jpegs):
    root, _ = jpegs
    with pytest.raises(BackendError, match="unknown inference backend 'bogus'"):
        index_paths(lib, tiny, [root], backend="bogus")
    assert lib.stats().images == 0


# --- fallbacks ------------------------------------------------------------------------------------


def _fails_to_build(*args, **kwargs):
    raise RuntimeError("this backend cannot be built here (made to fail by the test)")


def test_auto_skips_backends_that_fail_to_build(lib, tiny, jpegs, monkeypatch):
    root, paths = jpegs
    for name in ("onnx-fp32", "onnx-int8", "torch-int8"):
        monkeypatch.setitem(backends.BACKENDS, name, _fails_to_build)
    report = index_paths(lib, tiny, [root], backend="auto")
    assert report.new == len(paths) and report.backend == "torch-fp32"
    np.testing.assert_allclose(_stored(lib, tiny.model_id, paths), _fp32_full_decode(tiny, paths), atol=0.02)
    _, measured = backends.choose_backend(tiny)  # the cached verdict records why
    assert "made to fail" in measured["onnx-int8"].error and not measured["onnx-int8"].faithful


def test_auto_that_cannot_run_at_all_falls_back_to_the_model(lib, tiny, jpegs, monkeypatch):
    root, paths = jpegs

    def no_runtime(*args, **kwargs):
        raise ImportError("No module named 'onnxruntime' (made to fail by the test)")

    monkeypatch.setattr(backends, "make_image_encoder", no_runtime)
    report = index_paths(lib, tiny, [root], backend="auto")
    assert report.new == len(paths) and report.backend == "model"
    assert "onnxruntime" in report.backend_note
    want = _fp32_full_decode(tiny, paths)
    assert backends.cosine_rows(_stored(lib, tiny.model_id, paths), want).min() >= MIN_COSINE


class _BreaksAfter(ImageEncoder):
    """A backend whose runtime fails on its second batch, as ONNX Runtime does (errors from Exception)."""

    name = "breaks"

    def __init__(self):
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail

        self.calls, self.error = 0, Fail

    def __call__(self, batch):
        self.calls += 1
        if self.calls > 1:
            raise self.error("[ONNXRuntimeError] : 1 : FAIL : made to fail by the test")
        return _bundle().model.encode_image(torch.as_tensor(batch)).detach().numpy()


def test_auto_backend_failing_mid_run_finishes_with_the_model(lib, tiny, jpegs, monkeypatch):
    root, paths = jpegs
    monkeypatch.setattr(backends, "make_image_encoder", lambda *a, **k: _BreaksAfter())
    report = index_paths(lib, tiny, [root], batch_size=2, backend="auto")
    assert report.new == len(paths) and report.failed == []
    assert report.backend == "model" and "breaks failed" in report.backend_note
    want = _fp32_full_decode(tiny, paths)
    assert backends.cosine_rows(_stored(lib, tiny.model_id, paths), want).min() >= MIN_COSINE


def test_forced_backend_that_cannot_run_is_a_typed_error(lib, tiny, jpegs, monkeypatch):
    root, _ = jpegs
    monkeypatch.setitem(backends.BACKENDS, "onnx-int8", _fails_to_build)
    with pytest.raises(BackendError, match="onnx-int8 backend cannot run on this machine"):
        index_paths(lib, tiny, [root], backend="onnx-int8")
    monkeypatch.setattr(backends, "make_image_encoder", lambda *a, **k: _BreaksAfter())
    with pytest.raises(BackendError, match="backend failed .*batches done so far are saved"):
        index_paths(lib, tiny, [root], batch_size=2, backend="torch-fp32")
    assert lib.stats().images == 2  # the first batch was committed


class _OverflowsOnce(ImageEncoder):
    """A half-precision backend that overflows on one photo of its second batch (inf, then NaN)."""

    name = "overflows"

    def __init__(self):
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        out = _bundle().model.encode_image(torch.as_tensor(batch)).detach().numpy()
        if self.calls == 2:
            out[0] = np.inf
        return out


def test_features_that_are_not_finite_are_never_stored(lib, tiny, jpegs, monkeypatch):
    """A NaN vector would poison every search of the library: a backend that gives one hands the batch
    to the model as loaded; a model whose own features are NaN (damaged weights) stops the run, the
    batches before it kept."""
    root, paths = jpegs
    monkeypatch.setattr(backends, "make_image_encoder", lambda *a, **k: _OverflowsOnce())
    report = index_paths(lib, tiny, [root], batch_size=2, backend="auto")
    assert report.new == len(paths) and report.backend == "model"
    assert "overflows gave NaN or infinite features" in report.backend_note
    stored = _stored(lib, tiny.model_id, paths)
    assert np.isfinite(stored).all()
    assert backends.cosine_rows(stored, _fp32_full_decode(tiny, paths)).min() >= MIN_COSINE
    with Library.open(lib.path.parent / "forced.db", create=True) as forced:
        with pytest.raises(BackendError, match="gave NaN or infinite features; the batches done so far"):
            index_paths(forced, tiny, [root], batch_size=2, backend="torch-fp32")
        assert forced.embedding_count(tiny.model_id) == 2  # the first batch, committed before it
    monkeypatch.undo()
    damaged = _bundle("test/damaged-weights")
    with torch.no_grad():
        damaged.model.visual.proj[0, 0] = float("nan")
    with Library.open(lib.path.parent / "damaged.db", create=True) as other:
        with pytest.raises(ModelLoadError, match="gives NaN or infinite features: its weights are damaged"):
            index_paths(other, damaged, [root], batch_size=2, backend="auto")
        assert other.embedding_count(damaged.model_id) == 0


# --- GPU and bare models: the choice, tested without a GPU ----------------------------------------


def test_plan_backends_for_each_device_and_precision():
    plan = backends.plan_backends
    assert plan("cpu", "float32", cpu_fast_bf16=False, cuda_bf16=False) == [
        "torch-fp32",
        "onnx-fp32",
        "onnx-int8",
        "torch-int8",
    ]
    assert plan("cpu", "float32", cpu_fast_bf16=True, cuda_bf16=False)[:2] == ["torch-fp32", "torch-bf16"]
    assert plan("cuda", "float32", cpu_fast_bf16=True, cuda_bf16=True) == [
        "torch-fp32",
        "torch-fp16",
        "torch-bf16",
    ]
    assert plan("cuda", "float32", cpu_fast_bf16=False, cuda_bf16=False) == [
        "torch-fp32",
        "torch-fp16",
    ]  # V100
    assert plan("mps", "float32", cpu_fast_bf16=False, cuda_bf16=True) == ["torch-fp32", "torch-fp16"]
    # loaded in reduced precision on a GPU on purpose: run as it is
    assert plan("cuda", "float16", cpu_fast_bf16=False, cuda_bf16=True) is None
    assert plan("cuda", "bfloat16", cpu_fast_bf16=False, cuda_bf16=True) is None


def test_decode_threads_follow_the_device():
    assert default_workers("cpu", 2) == 2 and default_workers("cpu", 32) == 4
    assert default_workers("cuda", 16) == 16 and default_workers("cuda", 64) == 16
    assert default_workers("cuda", 1) == 1


def test_gpu_fp32_model_measures_half_copies_and_keeps_a_faithful_one(lib, jpegs, monkeypatch):
    """The CUDA branch of auto, run on the CPU: fp16 and bf16 copies measured against fp32."""
    root, paths = jpegs
    bundle = _bundle("test/tiny-vit-gpu-plan")
    as_on_a_gpu = backends.plan_backends("cuda", "float32", cpu_fast_bf16=False, cuda_bf16=True)
    monkeypatch.setattr(backends, "auto_plan", lambda b: as_on_a_gpu)
    report = index_paths(lib, bundle, [root], backend="auto")
    _, measured = backends.choose_backend(bundle)  # from the verdict just written
    assert set(measured) == {"torch-fp32", "torch-fp16", "torch-bf16"}
    for m in measured.values():
        assert m.error is None and m.cosine >= MIN_COSINE, m
    assert report.backend in measured
    cos = backends.cosine_rows(_stored(lib, bundle.model_id, paths), _fp32_full_decode(bundle, paths))
    assert cos.min() >= MIN_COSINE


def test_fp16_copy_matches_fp32_features(tiny):
    batch = backends.calibration_batch(tiny, n=4, seed=5)
    encoder = backends.make_image_encoder(tiny, "torch-fp16")
    assert encoder.name == "torch-fp16"
    with torch.no_grad():
        want = tiny.model.encode_image(batch).numpy()
    assert backends.cosine_rows(encoder(batch), want).min() >= MIN_COSINE
    assert next(tiny.model.parameters()).dtype == torch.float32  # the loaded model is untouched


def test_half_precision_gpu_model_and_bare_models_run_as_given(lib, tiny, jpegs, monkeypatch):
    root, paths = jpegs

    def boom(*args, **kwargs):
        raise AssertionError("the model must run as given")

    monkeypatch.setattr(backends, "make_image_encoder", boom)
    as_half_on_a_gpu = backends.plan_backends("cuda", "float16", cpu_fast_bf16=False, cuda_bf16=True)
    monkeypatch.setattr(backends, "auto_plan", lambda b: as_half_on_a_gpu)
    report = index_paths(lib, tiny, [root], backend="auto")
    assert report.backend == "model" and report.backend_note == ""
    cos = backends.cosine_rows(_stored(lib, tiny.model_id, paths), _fp32_full_decode(tiny, paths))
    assert cos.min() >= MIN_COSINE

    class Bare:  # a model and a transform, no pixel settings: a test fake or a custom pipeline
        model_id = "bare"
        model = tiny.model
        preprocess = tiny.preprocess

    with Library.open(lib.path.parent / "bare.db", create=True) as other:
        assert index_paths(other, Bare(), [root], backend="auto").backend == "model"


def test_verdicts_are_kept_apart_per_device():
    cpu = backends._environment(None, torch.device("cpu"))
    other = backends._environment(None, torch.device("meta"))
    assert cpu["device"] == "cpu" and other["device"] == "meta" and cpu != other


def test_cached_choice_that_no_longer_builds_gives_the_next_faithful_backend(tiny, monkeypatch):
    name, measured = backends.choose_backend(tiny)
    monkeypatch.setitem(backends.BACKENDS, name, _fails_to_build)
    encoder = backends.make_image_encoder(tiny, "auto")
    faithful = [m for m in measured.values() if m.faithful and m.name != name]
    assert encoder.name != name and encoder.name in {m.name for m in faithful} | {"torch-fp32"}


# --- the walk ---------------------------------------------------------------------------------------


def test_walk_reports_sockets_and_devices_named_like_photos(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    _photo(folder / "real.jpg", 1, size=(64, 48))
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(folder / "sock.jpg"))
        (folder / "dev.jpg").symlink_to("/dev/null")  # a character device, reached through a link
        found = walk([folder])
    finally:
        sock.close()
    assert [f.path.name for f in found.files] == ["real.jpg"]
    reasons = {p.name: (reason, detail) for p, reason, detail in found.failed}
    assert reasons == {
        "dev.jpg": ("not a regular file", "a character device, not a photo file"),
        "sock.jpg": ("not a regular file", "a socket, not a photo file"),
    }
