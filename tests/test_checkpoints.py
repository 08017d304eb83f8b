"""Loading every model source, checked against open_clip on identical (random) weights.

open_clip builds tiny random models and writes them in each format its users meet: OpenAI's
TorchScript archive, plain and wrapped state dicts, DDP prefixes, safetensors and hub directories.
Our loader must give the same features from each, refuse anything that would run code, and name
the problem when a file does not fit.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import threading
import warnings
import zipfile

import numpy as np
import pytest
import torch

import clipsearch
from clipsearch import checkpoints
from clipsearch.errors import ModelLoadError
from clipsearch.pretrained import PRETRAINED
from clipsearch.torchscript import read_torchscript_state_dict

open_clip = pytest.importorskip("open_clip")

# Tiny architectures in the OpenCLIP schema. Widths are multiples of 64 so that the head counts
# OpenAI's layout implies (width / 64) can be inferred from the weights.
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}
VIT_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": TEXT_CFG,
}
RN_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32},
    "text_cfg": dict(TEXT_CFG, layers=1),
}
TEXTS = ["a photo of a cat", "two dogs on a beach at sunset", ""]


def oc_model(cfg: dict, quick_gelu: bool, seed: int = 0):
    """A random open_clip CLIP, with non-trivial values in every tensor (so nothing matches by luck)."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=cfg["vision_cfg"],
        text_cfg=cfg["text_cfg"],
        quick_gelu=quick_gelu,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # LayerNorm gains/biases off their 1/0 init too
    return model.eval()


def image_size(cfg: dict) -> int:
    return cfg["vision_cfg"]["image_size"]


def assert_same_features(ours, ref, size: int, context_length: int = 77):
    torch.manual_seed(1)
    images = torch.randn(2, 3, size, size)
    tokens = open_clip.tokenize(TEXTS, context_length=context_length)
    with torch.no_grad():
        ours_img, ref_img = ours.encode_image(images), ref.encode_image(images)
        ours_txt, ref_txt = ours.encode_text(tokens), ref.encode_text(tokens)
    for a, b in ((ours_img, ref_img), (ours_txt, ref_txt)):
        assert a.shape == b.shape
        cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
        assert cos.min().item() >= 0.99999, cos
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def features_differ(ours, ref, size: int) -> bool:
    torch.manual_seed(1)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return not torch.allclose(ours.encode_image(images), ref.encode_image(images), atol=1e-4)


def traced(model, cfg: dict):
    size = image_size(cfg)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        return torch.jit.trace(model, (torch.randn(1, 3, size, size), open_clip.tokenize(["x"])))


def scripted(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(model)


def openai_style_state_dict(model, cfg: dict) -> dict:
    """What OpenAI's TorchScript models hold: the weights plus three bookkeeping tensors."""
    sd = dict(model.state_dict())
    sd["input_resolution"] = torch.tensor(image_size(cfg))
    sd["context_length"] = torch.tensor(cfg["text_cfg"]["context_length"])
    sd["vocab_size"] = torch.tensor(cfg["text_cfg"]["vocab_size"])
    return sd


# --------------------------------------------------------------------------------------------------
# Reading TorchScript archives without torch.jit


class _WithPlainTensor(torch.nn.Module):
    """A module with a parameter, a buffer and a plain tensor attribute (not part of a state dict)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("counts", torch.arange(4))
        self.scale = torch.nn.Parameter(torch.randn(5, 2).t())  # non-contiguous storage
        self.mask = torch.ones(2, 2)

    def forward(self, x):
        return self.lin(x) * self.scale.sum() + self.mask.sum() + self.counts.sum()


@pytest.mark.parametrize("make", ["trace", "script"])
def test_torchscript_reader_gives_the_exact_state_dict(tmp_path, make):
    model = oc_model(VIT_CFG, quick_gelu=True)
    archive = traced(model, VIT_CFG) if make == "trace" else scripted(model)
    archive.save(str(tmp_path / "m.pt"))
    sd = read_torchscript_state_dict(tmp_path / "m.pt")
    ref = model.state_dict()
    # open_clip registers its causal mask as a (non-persistent) buffer, which TorchScript keeps.
    assert set(sd) - {"attn_mask"} == set(ref)
    for key, value in ref.items():
        assert sd[key].dtype == value.dtype and torch.equal(sd[key], value), key


def test_torchscript_reader_keeps_parameters_and_buffers_only(tmp_path):
    module = _WithPlainTensor()
    scripted(module).save(str(tmp_path / "s.pt"))
    sd = read_torchscript_state_dict(tmp_path / "s.pt")
    assert set(sd) == {"lin.weight", "lin.bias", "counts", "scale"}
    for key, value in module.state_dict().items():
        assert torch.equal(sd[key], value)
    assert sd["counts"].dtype == torch.int64


def test_openai_bookkeeping_tensors_are_dropped(tmp_path):
    model = oc_model(VIT_CFG, quick_gelu=True)
    torch.save(openai_style_state_dict(model, VIT_CFG), tmp_path / "sd.pt")
    sd = checkpoints.read_state_dict(tmp_path / "sd.pt")
    assert set(sd) == set(model.state_dict())


def _handmade_archive(path, size, stride, numel=4, record=None, compression=zipfile.ZIP_STORED):
    """A minimal TorchScript-style archive written opcode by opcode: module ``M`` with tensor ``w``
    viewing a ``numel``-float storage with the given size and stride (no code/, so nothing says which
    attributes are parameters). ``record`` replaces the storage's bytes (4 floats)."""
    import struct

    def ints(values):
        return b"(" + b"".join(b"M" + struct.pack("<H", v) for v in values) + b"t"

    data = (
        b"\x80\x02c__torch__\nM\n)\x81}(X\x01\x00\x00\x00w"
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
        b"J" + struct.pack("<i", numel) + b"tQ"
        b"K\x00" + ints(size) + ints(stride) + b"\x89ccollections\nOrderedDict\n)RtRub."
    )
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/data.pkl", data)
        z.writestr("a/data/0", struct.pack("<4f", 1, 2, 3, 4) if record is None else record, compression)
        z.writestr("a/constants.pkl", pickle.dumps((), protocol=2))


def test_handmade_archive_and_out_of_bounds_views(tmp_path):
    _handmade_archive(tmp_path / "ok.pt", (2, 2), (1, 2))
    sd = read_torchscript_state_dict(tmp_path / "ok.pt")
    assert torch.equal(sd["w"], torch.tensor([[1.0, 3.0], [2.0, 4.0]]))
    # A tensor claiming more memory than its storage holds must not read past it.
    for size, stride in (((1000,), (1,)), ((2, 2), (1000, 1))):
        _handmade_archive(tmp_path / "bad.pt", size, stride)
        with pytest.raises(ModelLoadError, match="out of bounds"):
            read_torchscript_state_dict(tmp_path / "bad.pt")


def _declare_record_size(path, member: str, size: int) -> None:
    """Rewrite the uncompressed size the zip's central directory declares for ``member``."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")  # the first central directory entry
    while True:  # walk the central directory to the member's entry
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        if data[at + 46 : at + 46 + name_len].decode() == member:
            struct.pack_into("<I", data, at + 24, size)
            break
        at += 46 + name_len + extra_len + comment_len
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_oversize_torchscript_record_is_refused_before_allocating(tmp_path, monkeypatch, compression):
    """An archive that declares a record far larger than its bytes is refused without allocating it."""
    from clipsearch import torchscript

    allocated = []
    monkeypatch.setattr(
        torchscript, "bytearray", lambda n: allocated.append(n) or bytearray(n), raising=False
    )
    path = tmp_path / "huge.pt"
    numel = 0x3FFF_FFF0  # 4 GiB of float32, declared consistently in the pickle and the zip directory
    _handmade_archive(path, (2, 2), (1, 2), numel=numel, compression=compression)
    _declare_record_size(path, "a/data/0", numel * 4)
    with pytest.raises(ModelLoadError, match=r"declares \d+ bytes, more than its \d+ stored bytes"):
        read_torchscript_state_dict(path)
    assert allocated == []


def test_record_size_must_match_its_tensor(tmp_path):
    """A storage whose record holds more (or fewer) bytes than numel x itemsize is refused."""
    import struct

    _handmade_archive(tmp_path / "a.pt", (2, 2), (1, 2), record=struct.pack("<8f", *range(8)))
    with pytest.raises(ModelLoadError, match="holds 32 bytes but its tensor needs 4 x 4 bytes"):
        read_torchscript_state_dict(tmp_path / "a.pt")
    _handmade_archive(tmp_path / "b.pt", (2, 2), (1, 2), numel=-1)
    with pytest.raises(ModelLoadError, match="declares -1 elements"):
        read_torchscript_state_dict(tmp_path / "b.pt")


def _malicious_reduce(marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(marker))}",))

    return Evil()


def test_malicious_payload_is_live(tmp_path):
    """The payload used below really runs when unpickled naively (so the refusals mean something)."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_malicious_reduce(marker), protocol=2)
    subprocess.run(
        [sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
        input=payload,
        check=True,
    )
    assert marker.exists()


def test_malicious_torchscript_archive_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(_malicious_reduce(marker), protocol=2))
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil/version", "3\n")
    with pytest.raises(ModelLoadError, match="refused") as err:
        checkpoints.load_bundle(path)
    assert "system" in str(err.value)
    assert not marker.exists()


def test_malicious_torch_save_file_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _malicious_reduce(marker)}, path)
    with pytest.raises(ModelLoadError, match="refused"):
        checkpoints.load_bundle(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_malicious_legacy_pickle_is_refused_without_running(tmp_path, protocol):
    """Refused in one line: torch's "Detected pickle protocol 4 ... please file an issue" warning
    (a pickle made with Python's default protocol) is not printed above it."""
    import warnings

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(_malicious_reduce(marker), protocol=protocol))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ModelLoadError, match="refused"):
        warnings.simplefilter("always")
        checkpoints.load_bundle(path)
    assert not marker.exists()
    assert [str(w.message) for w in caught] == []


def test_torchscript_with_code_tensors_only_never_calls_torch_jit(tmp_path, monkeypatch):
    model = oc_model(VIT_CFG, quick_gelu=True)
    traced(model, VIT_CFG).save(str(tmp_path / "m.pt"))

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.jit.load must never be called")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    assert "visual.conv1.weight" in checkpoints.read_state_dict(tmp_path / "m.pt")


# --------------------------------------------------------------------------------------------------
# Reading state dicts in their various wrappings


@pytest.fixture(scope="module")
def vit_gelu():
    return oc_model(VIT_CFG, quick_gelu=False, seed=3)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module", "state_dict+module", "safetensors"])
def test_state_dict_wrappings_read_identically(tmp_path, vit_gelu, wrap):
    ref = vit_gelu.state_dict()
    sd = dict(ref)
    if "module" in wrap:
        sd = {f"module.{k}": v for k, v in sd.items()}
    if wrap.startswith("state_dict"):
        sd = {"epoch": 3, "name": "run", "state_dict": sd}
    if wrap == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    got = checkpoints.read_state_dict(path)
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip", b"\x80\x02}q\x00(X\x01"],
    ids=["empty", "text", "broken-zip", "truncated-pickle"],
)
def test_corrupt_files_are_model_load_errors(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=str(path)):
        checkpoints.load_bundle(path)


def test_truncated_safetensors_and_torchscript_are_model_load_errors(tmp_path, vit_gelu):
    from safetensors.torch import save_file

    save_file(dict(vit_gelu.state_dict()), str(tmp_path / "w.safetensors"))
    traced(vit_gelu, VIT_CFG).save(str(tmp_path / "ts.pt"))
    for name in ("w.safetensors", "ts.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelLoadError):
            checkpoints.load_bundle(tmp_path / name)


@pytest.mark.parametrize("kind", ["torch-save", "torchscript"])
def test_a_checkpoint_damaged_inside_a_tensor_is_refused(tmp_path, vit_gelu, kind):
    """A bit flipped on disk or in a copy inside a zip checkpoint's tensor data: torch's reader does not
    check the archive's CRCs, so the model loaded with the damaged weights and indexed with them,
    without a word. The archive's own checksums say it is damaged."""
    path = tmp_path / "w.pt"
    if kind == "torch-save":
        torch.save(dict(vit_gelu.state_dict()), path)
    else:
        traced(vit_gelu, VIT_CFG).save(str(path))
    with zipfile.ZipFile(path) as z:
        biggest = max(z.infolist(), key=lambda i: i.file_size)
        assert biggest.compress_type == zipfile.ZIP_STORED
    data = bytearray(path.read_bytes())
    start = biggest.header_offset + 30 + len(biggest.filename.encode()) + len(biggest.extra)
    middle = start + biggest.file_size // 2
    data[middle : middle + 8] = bytes(8) if any(data[middle : middle + 8]) else b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="damaged") as err:
        checkpoints.load_bundle(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "content, what",
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "a JPEG image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "a PNG image"),
        (b"SQLite format 3\x00" + bytes(100), "an SQLite database"),
        (b"these are my notes\n", "text"),
        (b"", "an empty file"),
    ],
)
def test_a_file_that_is_not_a_model_says_so_in_one_line(tmp_path, content, what):
    path = tmp_path / "holiday.pt"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as err:
        checkpoints.load_bundle(path)
    message = str(err.value)
    assert f"{path} is not a model file" in message and what in message
    assert "\n" not in message and "weights_only" not in message


def test_a_zip_of_photos_is_not_a_model(tmp_path):
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:
        z.writestr("a.jpg", b"\xff\xd8\xff")
    with pytest.raises(ModelLoadError, match="not a model file .a zip archive without a PyTorch checkpoint"):
        checkpoints.load_bundle(tmp_path / "photos.zip")


def test_a_pickle_of_objects_is_refused_in_one_line(tmp_path):
    import fractions

    torch.save({"w": torch.ones(1), "extra": fractions.Fraction(1, 3)}, tmp_path / "obj.pt")
    with pytest.raises(ModelLoadError) as err:
        checkpoints.load_bundle(tmp_path / "obj.pt")
    assert "refused to load" in str(err.value) and "\n" not in str(err.value)
    assert "fractions.Fraction" in str(err.value)
    assert "weights_only" not in str(err.value)


def test_pickled_checkpoints_are_refused_under_a_torch_with_a_known_unsafe_loader(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(
        ModelLoadError, match=r"torch 2\.5\.1\+cpu has known code-execution bugs.*torch>=2\.10"
    ):
        checkpoints.read_state_dict(tmp_path / "w.pt")
    assert loads == []  # refused before anything was unpickled


def test_file_without_tensors_is_rejected(tmp_path):
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "x.pt")
    with pytest.raises(ModelLoadError, match="no tensors"):
        checkpoints.load_bundle(tmp_path / "x.pt")


def test_missing_file_and_unknown_names(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        checkpoints.load_bundle(tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match="ViT-B-32/openai"):
        checkpoints.load_bundle("ViT-B-32/opnai")
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'"):
        checkpoints.load_bundle("no-such-model")
    with pytest.raises(ModelLoadError, match="neither"):
        checkpoints.load_bundle(tmp_path)
    with pytest.raises(ModelLoadError, match="precision"):
        checkpoints.load_bundle(tmp_path, precision="int3")


# --------------------------------------------------------------------------------------------------
# Each source kind gives open_clip's features


def test_openai_torchscript_archive_loads_with_inferred_architecture(tmp_path):
    ref = oc_model(VIT_CFG, quick_gelu=True)
    traced(ref, VIT_CFG).save(str(tmp_path / "ViT-tiny.pt"))
    bundle = checkpoints.load_bundle(tmp_path / "ViT-tiny.pt")
    assert not bundle.model.training
    assert bundle.config["quick_gelu"] is True
    assert bundle.config["vision_cfg"]["image_size"] == 32
    assert bundle.preprocess_cfg.image_size == 32
    assert bundle.model_id.startswith("file:ViT-tiny.pt:")
    assert_same_features(bundle.model, ref, 32)
    # Weights were assigned onto a meta-built model: all real, trainable, none sharing memory.
    params = list(bundle.model.parameters())
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad and not p.is_meta for p in params)
    assert not any(b.is_meta for b in bundle.model.buffers())
    assert len({p.data_ptr() for p in params}) == len(params)


def test_openai_plain_state_dict_resnet(tmp_path):
    ref = oc_model(RN_CFG, quick_gelu=True, seed=5)
    torch.save(openai_style_state_dict(ref, RN_CFG), tmp_path / "rn.pt")
    model, preprocess, tokenize = clipsearch.load(str(tmp_path / "rn.pt"))
    assert not model.training
    assert tokenize(TEXTS).shape == (3, 77) and tokenize(TEXTS).dtype == torch.long
    assert torch.equal(tokenize(TEXTS), open_clip.tokenize(TEXTS))
    assert_same_features(model, ref, 64)


@pytest.mark.parametrize("wrap", ["state_dict+module", "safetensors"])
def test_openclip_weights_file_with_activation_override(tmp_path, vit_gelu, wrap):
    sd = dict(vit_gelu.state_dict())
    if wrap == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"epoch": 2, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    # Weights alone cannot say which activation they were trained with: the default is OpenAI's
    # QuickGELU, visibly wrong for these GELU weights, and quick_gelu=False fixes it.
    assert features_differ(checkpoints.load_bundle(path).model, vit_gelu, 32)
    bundle = checkpoints.load_bundle(path, quick_gelu=False)
    assert_same_features(bundle.model, vit_gelu, 32)


def test_arch_override_names_the_architecture(tmp_path, vit_gelu):
    (tmp_path / "arch.json").write_text(json.dumps(dict(VIT_CFG, quick_gelu=False)))
    torch.save(vit_gelu.state_dict(), tmp_path / "w.bin")
    bundle = checkpoints.load_bundle(tmp_path / "w.bin", arch=str(tmp_path / "arch.json"))
    assert_same_features(bundle.model, vit_gelu, 32)
    with pytest.raises(ModelLoadError, match="shape mismatch for visual.conv1.weight"):
        checkpoints.load_bundle(tmp_path / "w.bin", arch="tiny-vit")
    with pytest.raises(ModelLoadError, match="weights file only"):
        checkpoints.load_bundle("ViT-B-32/openai", arch="ViT-B-32")
    with pytest.raises(ModelLoadError, match="weights file only"):
        checkpoints.load_bundle(tmp_path, quick_gelu=False)


def _hub_dir(tmp_path, model, cfg, preprocess_cfg, safetensors: bool):
    directory = tmp_path / "hub-model"
    directory.mkdir()
    config = {"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    if safetensors:
        from safetensors.torch import save_file

        save_file(dict(model.state_dict()), str(directory / "open_clip_model.safetensors"))
    else:
        torch.save(model.state_dict(), directory / "open_clip_pytorch_model.bin")
    return directory


@pytest.mark.parametrize("safetensors", [False, True], ids=["bin", "safetensors"])
def test_hub_directory_honours_its_config(tmp_path, safetensors):
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 256, "layers": 1, "width": 64, "patch_size": 32},
        "text_cfg": dict(TEXT_CFG, context_length=32, layers=1),
    }  # no quick_gelu: OpenCLIP's default, GELU
    ref = oc_model(cfg, quick_gelu=False, seed=7)
    pp = {
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3],
        "interpolation": "bilinear",
        "resize_mode": "squash",
    }
    bundle = checkpoints.load_bundle(_hub_dir(tmp_path, ref, cfg, pp, safetensors))
    assert bundle.config["quick_gelu"] is False
    assert bundle.preprocess_cfg.image_size == 256
    assert tuple(bundle.preprocess_cfg.mean) == (0.5, 0.4, 0.3)
    assert tuple(bundle.preprocess_cfg.std) == (0.2, 0.25, 0.3)
    assert bundle.preprocess_cfg.interpolation == "bilinear"
    assert bundle.preprocess_cfg.resize_mode == "squash"
    assert bundle.tokenizer(TEXTS).shape == (3, 32)
    assert bundle.model_id.startswith("file:hub-model:")
    assert_same_features(bundle.model, ref, 256, context_length=32)

    # The transform built from it equals open_clip's for the same settings.
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))
    oc_pp = open_clip.transform.PreprocessCfg(size=256, **pp)
    oc_transform = open_clip.transform.image_transform_v2(oc_pp, is_train=False)
    torch.testing.assert_close(bundle.preprocess(image), oc_transform(image), atol=1e-5, rtol=0)


def test_hub_directory_errors(tmp_path, vit_gelu):
    directory = _hub_dir(tmp_path, vit_gelu, VIT_CFG, {}, safetensors=False)
    (directory / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="neither"):
        checkpoints.load_bundle(directory)
    (directory / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="JSON"):
        checkpoints.load_bundle(directory)
    cfg = dict(VIT_CFG, text_cfg=dict(TEXT_CFG, hf_tokenizer_name="bert-base"))
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.save(vit_gelu.state_dict(), directory / "open_clip_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="hf_tokenizer_name"):
        checkpoints.load_bundle(directory)
    config = {"model_cfg": VIT_CFG, "preprocess_cfg": {"mean": [0.5, 0.5]}}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="preprocessing.*mean"):
        checkpoints.load_bundle(directory)


def test_weights_that_fit_no_architecture(tmp_path, vit_gelu):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="match no CLIP architecture"):
        checkpoints.load_bundle(tmp_path / "other.pt")

    sd = dict(vit_gelu.state_dict())
    del sd["visual.ln_post.bias"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match="missing .*visual.ln_post.bias"):
        checkpoints.load_bundle(tmp_path / "missing.pt")

    sd = dict(vit_gelu.state_dict())
    sd["visual.ln_post.weight"] = torch.ones(65)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(ModelLoadError, match=r"shape mismatch for visual.ln_post.weight.*\(65,\).*\(64,\)"):
        checkpoints.load_bundle(tmp_path / "shape.pt")

    sd = dict(vit_gelu.state_dict(), extra_head=torch.zeros(2))
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(ModelLoadError, match="unexpected .*extra_head"):
        checkpoints.load_bundle(tmp_path / "extra.pt")


def test_model_id_is_stable_and_follows_the_content(tmp_path, vit_gelu):
    torch.save(vit_gelu.state_dict(), tmp_path / "w.pt")
    first = checkpoints.load_bundle(tmp_path / "w.pt").model_id
    assert checkpoints.load_bundle(tmp_path / "w.pt").model_id == first
    torch.save(oc_model(VIT_CFG, quick_gelu=False, seed=11).state_dict(), tmp_path / "w.pt")
    second = checkpoints.load_bundle(tmp_path / "w.pt").model_id
    assert second != first and second.startswith("file:w.pt:")


# --------------------------------------------------------------------------------------------------
# The clipsearch model file


def test_save_and_load_round_trip_is_exact(tmp_path):
    ref = oc_model(VIT_CFG, quick_gelu=True, seed=13)
    traced(ref, VIT_CFG).save(str(tmp_path / "src.pt"))
    bundle = checkpoints.load_bundle(tmp_path / "src.pt")
    out = checkpoints.save_model(
        tmp_path / "saved", bundle.model, bundle.preprocess_cfg, bundle.tokenizer, extra={"epochs": 3}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "src.pt"]  # no temp dirs left
    record = json.loads((out / "clipsearch_model.json").read_text())
    assert record["format"] == "clipsearch-model" and record["version"] == 1
    assert record["model_cfg"] == bundle.config and record["extra"] == {"epochs": 3}
    assert record["preprocess_cfg"]["image_size"] == 32

    again = checkpoints.load_bundle(out)
    assert again.config == bundle.config and again.preprocess_cfg == bundle.preprocess_cfg
    a, b = bundle.model.state_dict(), again.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    images, tokens = torch.randn(2, 3, 32, 32), again.tokenizer(TEXTS)
    assert torch.equal(tokens, bundle.tokenizer(TEXTS))
    with torch.no_grad():
        assert torch.equal(again.model.encode_image(images), bundle.model.encode_image(images))
        assert torch.equal(again.model.encode_text(tokens), bundle.model.encode_text(tokens))
    assert again.model_id.startswith("file:saved:")
    assert checkpoints.load_bundle(out).model_id == again.model_id

    # Saving over it replaces it in place with the new weights.
    other = checkpoints.load_bundle(tmp_path / "src.pt")
    with torch.no_grad():
        other.model.logit_scale.fill_(1.5)
    checkpoints.save_model(out, other.model, other.preprocess_cfg, other.tokenizer)
    assert checkpoints.load_bundle(out).model.logit_scale.item() == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "src.pt"]


def test_clipsearch_model_file_errors(tmp_path, vit_gelu):
    bundle_dir = tmp_path / "m"
    torch.save(vit_gelu.state_dict(), tmp_path / "w.pt")
    b = checkpoints.load_bundle(tmp_path / "w.pt", quick_gelu=False)
    checkpoints.save_model(bundle_dir, b.model, b.preprocess_cfg, b.tokenizer)
    record = json.loads((bundle_dir / "clipsearch_model.json").read_text())

    (bundle_dir / "clipsearch_model.json").write_text(json.dumps(dict(record, version=99)))
    with pytest.raises(ModelLoadError, match="newer clipsearch"):
        checkpoints.load_bundle(bundle_dir)
    (bundle_dir / "clipsearch_model.json").write_text(json.dumps(dict(record, format="other")))
    with pytest.raises(ModelLoadError, match="not a clipsearch model"):
        checkpoints.load_bundle(bundle_dir)
    (bundle_dir / "clipsearch_model.json").write_text(json.dumps(record))
    (bundle_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelLoadError, match="safetensors"):
        checkpoints.load_bundle(bundle_dir)
    (bundle_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        checkpoints.load_bundle(bundle_dir)


# --------------------------------------------------------------------------------------------------
# Precision and pretrained names


def test_reduced_precision_keeps_layernorm_fp32(tmp_path, vit_gelu):
    torch.save(vit_gelu.state_dict(), tmp_path / "w.pt")
    full = checkpoints.load_bundle(tmp_path / "w.pt", quick_gelu=False)
    half = checkpoints.load_bundle(tmp_path / "w.pt", quick_gelu=False, precision="bf16")
    assert half.model.visual.conv1.weight.dtype == torch.bfloat16
    assert half.model.text_projection.dtype == torch.bfloat16
    assert half.model.ln_final.weight.dtype == torch.float32
    images = torch.randn(2, 3, 32, 32)
    tokens = full.tokenizer(TEXTS)
    with torch.no_grad():
        for a, b in (
            (full.model.encode_image(images), half.model.encode_image(images.bfloat16())),
            (full.model.encode_text(tokens), half.model.encode_text(tokens)),
        ):
            assert b.dtype == torch.bfloat16
            assert torch.nn.functional.cosine_similarity(a, b.float(), dim=-1).min() > 0.99
    fp16 = checkpoints.load_bundle(tmp_path / "w.pt", precision="fp16")
    assert fp16.model.visual.proj.dtype == torch.float16


class _Files(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_registered_name_downloads_verifies_and_loads(tmp_path, monkeypatch):
    """End to end: a registered OpenAI-style TorchScript file served over HTTP, as for ViT-B-32/openai."""
    ref = oc_model(VIT_CFG, quick_gelu=True, seed=17)
    traced(ref, VIT_CFG).save(str(tmp_path / "tiny.pt"))
    body = (tmp_path / "tiny.pt").read_bytes()
    (tmp_path / "arch.json").write_text(json.dumps(VIT_CFG))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.files = {"/tiny.pt": body}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        entry = {
            "arch": str(tmp_path / "arch.json"),
            "quick_gelu": True,
            "url": f"http://127.0.0.1:{httpd.server_address[1]}/tiny.pt",
            "revision": "test",
            "filename": "tiny-test.pt",
            "sha256": hashlib.sha256(body).hexdigest(),
            "format": "openai",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
        }
        monkeypatch.setitem(PRETRAINED, "tiny/test", entry)
        calls = []
        bundle = checkpoints.load_bundle("tiny/test", progress=lambda d, t: calls.append((d, t)))
        assert calls[-1] == (len(body), len(body))
        assert bundle.model_id == "tiny/test"
        assert tuple(bundle.preprocess_cfg.mean) == (0.5, 0.5, 0.5)
        assert_same_features(bundle.model, ref, 32)
        assert "tiny/test" in checkpoints.cached_pretrained()
        # A copy put somewhere by hand is recognised by its checksum and gets the registered id.
        shutil.copy(checkpoints.pretrained_path("tiny/test"), tmp_path / "copy.pt")
        assert checkpoints.load_bundle(tmp_path / "copy.pt").model_id == "tiny/test"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fp16_torchscript_archive_as_openai_ships_them(tmp_path):
    """OpenAI's released archives hold fp16 weights; loading gives fp32 weights of the same values."""
    ref = oc_model(VIT_CFG, quick_gelu=True, seed=19)
    scripted(ref.half()).save(str(tmp_path / "half.pt"))
    bundle = checkpoints.load_bundle(tmp_path / "half.pt")
    assert bundle.model.visual.conv1.weight.dtype == torch.float32
    assert_same_features(bundle.model, ref.float(), 32)


def test_registry_architectures_match_open_clip(tmp_path):
    """Each registered name builds the architecture open_clip uses for the same weights."""
    from clipsearch.configs import get_config

    for name, entry in PRETRAINED.items():
        arch = entry["arch"]
        ours = get_config(arch)
        theirs = open_clip.get_model_config(arch)
        assert ours["embed_dim"] == theirs["embed_dim"], name
        for tower in ("vision_cfg", "text_cfg"):
            for key, value in theirs[tower].items():
                if key in ("image_size", "layers", "width", "patch_size", "context_length", "heads"):
                    assert ours[tower][key] == value, (name, tower, key)


@pytest.mark.slow
def test_full_size_vit_b_32_torchscript(tmp_path):
    """One full-size archive (ViT-B/32, as OpenAI ships it) through the reader and the inference."""
    ref = open_clip.create_model("ViT-B-32-quickgelu").eval()
    scripted(ref).save(str(tmp_path / "ViT-B-32.pt"))
    bundle = checkpoints.load_bundle(tmp_path / "ViT-B-32.pt")
    assert bundle.config["vision_cfg"]["patch_size"] == 32 and bundle.config["embed_dim"] == 512
    assert bundle.preprocess_cfg.image_size == 224
    assert_same_features(bundle.model, ref, 224)


def test_round_trip_with_a_trained_tokenizer(tmp_path):
    """A model with its own BPE (as `--train-tokenizer` makes) keeps it: tokenizer.json beside it."""
    from clipsearch.model import build_model
    from clipsearch.tokenizer import train_bpe

    captions = [
        f"a {c} {s} on the {p}"
        for c in ("red", "blue", "green")
        for s in ("circle", "square")
        for p in ("left", "right")
    ]
    tokenizer = train_bpe(captions * 5, vocab_size=600, context_length=16)
    cfg = dict(VIT_CFG, text_cfg=dict(TEXT_CFG, vocab_size=tokenizer.vocab_size, context_length=16))
    torch.manual_seed(23)
    model = build_model(cfg).eval()
    from clipsearch.transform import PreprocessConfig

    pp = PreprocessConfig(image_size=32, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    out = checkpoints.save_model(tmp_path / "m", model, pp, tokenizer)
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "clipsearch_model.json").read_text())["tokenizer"]["type"] == "tokenizers-json"

    bundle = checkpoints.load_bundle(out)
    tokens = bundle.tokenizer(captions)
    assert tokens.shape == (len(captions), 16) and torch.equal(tokens, tokenizer(captions))
    assert bundle.preprocess_cfg == pp
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bundle.model.encode_text(tokens), model.encode_text(tokens))
        assert torch.equal(bundle.model.encode_image(images), model.encode_image(images))


def test_unreadable_model_folder_is_a_model_load_error(tmp_path, monkeypatch):
    # As root a chmod 000 folder stays readable, so make the stat itself fail as it does for users.
    from pathlib import Path

    real_is_dir = Path.is_dir

    def denied(self):
        if self == tmp_path / "private":
            raise PermissionError(13, "Permission denied")
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", denied)
    with pytest.raises(ModelLoadError, match="cannot read model .*Permission denied"):
        checkpoints.load_bundle(tmp_path / "private")
