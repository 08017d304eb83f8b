"""Loading every model source, checked against open_clip on identical (random) weights.

open_clip builds tiny random models and writes them in each format its users meet: OpenAI's
TorchScript archive, plain and wrapped state dicts, DDP prefixes, safetensors and hub directories.
Our loader must give the same features from each, refuse anything that would run code, and name
the problem when a file does not fit.
"""

from __future__ import annotations

import os
import pickle
import shlex
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

from clipsearch import checkpoints
from clipsearch.errors import ModelLoadError

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
    sd = checkpoints.read_torchscript_state_dict(tmp_path / "m.pt")
    ref = model.state_dict()
    # open_clip registers its causal mask as a (non-persistent) buffer, which TorchScript keeps.
    assert set(sd) - {"attn_mask"} == set(ref)
    for key, value in ref.items():
        assert sd[key].dtype == value.dtype and torch.equal(sd[key], value), key


def test_torchscript_reader_keeps_parameters_and_buffers_only(tmp_path):
    module = _WithPlainTensor()
    scripted(module).save(str(tmp_path / "s.pt"))
    sd = checkpoints.read_torchscript_state_dict(tmp_path / "s.pt")
    assert set(sd) == {"lin.weight", "lin.bias", "counts", "scale"}
    for key, value in module.state_dict().items():
        assert torch.equal(sd[key], value)
    assert sd["counts"].dtype == torch.int64


def test_openai_bookkeeping_tensors_are_dropped(tmp_path):
    model = oc_model(VIT_CFG, quick_gelu=True)
    torch.save(openai_style_state_dict(model, VIT_CFG), tmp_path / "sd.pt")
    sd = checkpoints.read_state_dict(tmp_path / "sd.pt")
    assert set(sd) == set(model.state_dict())


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


def test_malicious_legacy_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(_malicious_reduce(marker), protocol=2))
    with pytest.raises(ModelLoadError):
        checkpoints.load_bundle(path)
    assert not marker.exists()


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
