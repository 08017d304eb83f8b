"""The registry of released CLIP weights that ``clipsearch.load("ARCH/TAG")`` can fetch, and fetching them.

Each entry says where the weights live, how to check them, and what the weights alone cannot tell us:
the activation they were trained with and the image normalisation they expect.

- ``arch``: a named architecture (``clipsearch.configs``); ``quick_gelu`` overrides its activation.
- ``url``, ``revision`` and ``filename`` (the name in the models directory).
- ``sha256``: the file's full hex digest. A download is accepted only when its bytes have it, so an
  entry pins one exact file: ``revision`` says which published version that is.
  OpenAI: the digest is the URL's directory (content-addressed). OpenCLIP's GitHub release
  (tag ``v0.2-weights``): the file names end in the first 8 hex digits of the digest; the full digests
  are those a public model manifest pins for the same URLs (a Disco Diffusion downloader's
  ``models_config``), each agreeing with its file name. Hugging Face: the URL names the commit, and the
  file's Git LFS object id is its sha256, as pinned by several public projects for the same revision.
- An entry with ``sha256`` None is registered but not pinned (no public digest was found for it):
  :func:`fetch_pretrained` refuses it with a message instead of downloading an unverified file.
- ``mean``/``std``/``interpolation``/``resize_mode``: the preprocessing the weights were trained with.
- ``format``: ``"openai"`` (a TorchScript archive or state dict) or ``"openclip"`` (a state dict or
  safetensors).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

from clipsearch import paths
from clipsearch.errors import ModelLoadError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # ViT-L-14/laion2b_s32b_b82k was trained with these
INCEPTION_STD = (0.5, 0.5, 0.5)

_OPENAI_BASE = "https://openaipublic.azureedge.net/clip/models"
_OPENCLIP_RELEASE = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights"
_HF = "https://huggingface.co"


def _openai(arch: str, sha256: str, file: str) -> dict:
    # OpenAI trained every released model with QuickGELU; the digest is the URL's directory name.
    return {
        "arch": arch,
        "quick_gelu": True,
        "url": f"{_OPENAI_BASE}/{sha256}/{file}",
        "revision": sha256,  # the URL's path is the content's digest: the file cannot change
        "filename": f"openai-{file}",
        "sha256": sha256,
        "format": "openai",
    }


def _release(arch: str, file: str, sha256: str, quick_gelu: bool) -> dict:
    # OpenCLIP's v0.2 release files end in the first 8 hex digits of their sha256.
    assert sha256.startswith(file.rsplit("-", 1)[1].split(".")[0]), file
    return {
        "arch": arch,
        "quick_gelu": quick_gelu,
        "url": f"{_OPENCLIP_RELEASE}/{file}",
        "revision": "v0.2-weights",
        "filename": file,
        "sha256": sha256,
        "format": "openclip",
    }


def _hub(
    arch: str,
    repo: str,
    revision: str | None = None,
    file: str = "open_clip_pytorch_model.bin",
    sha256: str | None = None,
    quick_gelu: bool = False,
    **preprocess,
) -> dict:
    # LAION's hub releases were trained with nn.GELU unless noted. Without a pinned revision and
    # sha256 the entry stays registered (libraries name it) but is refused by fetch_pretrained.
    return {
        "arch": arch,
        "quick_gelu": quick_gelu,
        "url": f"{_HF}/{repo}/resolve/{revision or 'main'}/{file}",
        **({"revision": revision} if revision else {}),
        "filename": f"{repo.replace('/', '--')}{Path(file).suffix}",
        "sha256": sha256,
        "format": "openclip",
        **preprocess,
    }


PRETRAINED: dict[str, dict] = {
    # OpenAI's releases (Radford et al. 2021)
    "RN50/openai": _openai(
        "RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"
    ),
    "RN101/openai": _openai(
        "RN101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"
    ),
    "RN50x4/openai": _openai(
        "RN50x4", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"
    ),
    "RN50x16/openai": _openai(
        "RN50x16", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"
    ),
    "RN50x64/openai": _openai(
        "RN50x64", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"
    ),
    "ViT-B-32/openai": _openai(
        "ViT-B-32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"
    ),
    "ViT-B-16/openai": _openai(
        "ViT-B-16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"
    ),
    "ViT-L-14/openai": _openai(
        "ViT-L-14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"
    ),
    "ViT-L-14-336/openai": _openai(
        "ViT-L-14-336",
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
        "ViT-L-14-336px.pt",
    ),
    # OpenCLIP's GitHub releases (QuickGELU where the file name says so)
    "RN50/yfcc15m": _release(
        "RN50",
        "rn50-quickgelu-yfcc15m-455df137.pt",
        "455df13750cec2d6bb5e578fa84fb59a63d40e9fdbae58e7e7155672e46dc578",
        quick_gelu=True,
    ),
    "RN50/cc12m": _release(
        "RN50",
        "rn50-quickgelu-cc12m-f000538c.pt",
        "f000538c6c3c33c07e4fad5619f1b3d4cd591864dd3143778896112d1bf4fa7d",
        quick_gelu=True,
    ),
    "RN101/yfcc15m": _release(
        "RN101",
        "rn101-quickgelu-yfcc15m-3e04b30e.pt",
        "3e04b30eb7070e69b78db2c33f12a48cfa1f697691ed198d61fb2abbb48db5a3",
        quick_gelu=True,
    ),
    "ViT-B-32/laion400m_e31": _release(
        "ViT-B-32",
        "vit_b_32-quickgelu-laion400m_e31-d867053b.pt",
        "d867053b2301634007ed9af230bfb1a217ec634f6c0329f04092133ae5c4b89e",
        quick_gelu=True,
    ),
    "ViT-B-32/laion400m_e32": _release(
        "ViT-B-32",
        "vit_b_32-quickgelu-laion400m_e32-46683a32.pt",
        "46683a32721d5c68911153698992361285d20ca690bb4f317c11e45c03d798fa",
        quick_gelu=True,
    ),
    "ViT-B-32/laion2b_e16": _release(
        "ViT-B-32",
        "vit_b_32-laion2b_e16-af8dbd0c.pth",
        "af8dbd0c4bf1654db018a2a70fd839c3a6e79d2fdac33303f06d0d8aae16a65c",
        quick_gelu=False,
    ),
    "ViT-B-16/laion400m_e31": _release(
        "ViT-B-16",
        "vit_b_16-laion400m_e31-00efa78f.pt",
        "00efa78fe761eb607926704cfee46a4305ce2bf63af6ab50f1eeba2ef71da988",
        quick_gelu=False,
    ),
    "ViT-B-16/laion400m_e32": _release(
        "ViT-B-16",
        "vit_b_16-laion400m_e32-55e67d44.pt",
        "55e67d44b44d9e39aaf299a5c616aaf10a655879d6bd5854027b4a254aa2e7d5",
        quick_gelu=False,
    ),
    "ViT-L-14/laion400m_e31": _release(
        "ViT-L-14",
        "vit_l_14-laion400m_e31-69988bb6.pt",
        "69988bb6afa2b63291087c61464b3138660b2861fea5ec4682e107d194d9aaa3",
        quick_gelu=False,
    ),
    "ViT-L-14/laion400m_e32": _release(
        "ViT-L-14",
        "vit_l_14-laion400m_e32-3d133497.pt",
        "3d133497672c345f50dec98ebc674bb74c14b4f3aa0f3088f7cefe7e05a10a60",
        quick_gelu=False,
    ),
    # LAION's Hugging Face hub releases. The four without a revision and sha256 are refused until
    # someone pins them (no public digest of their files was found).
    "ViT-B-32/laion2b_s34b_b79k": _hub(
        "ViT-B-32",
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        revision="1a25a446712ba5ee05982a381eed697ef9b435cf",
        file="open_clip_model.safetensors",  # 605,143,316 bytes
        sha256="ac4f8c4b88af6d963118cbf40ad93176d092abbedfcb752601ae1866352656e6",
    ),
    "ViT-B-32/datacomp_xl_s13b_b90k": _hub("ViT-B-32", "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
    "ViT-B-16/laion2b_s34b_b88k": _hub("ViT-B-16", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
    "ViT-B-16/datacomp_xl_s13b_b90k": _hub("ViT-B-16", "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"),
    "ViT-L-14/laion2b_s32b_b82k": _hub(
        "ViT-L-14",
        "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
        revision="1627032197142fbe2a7cfec626f4ced3ae60d07a",
        file="open_clip_pytorch_model.safetensors",  # 1,710,517,748 bytes
        sha256="7d129ed747e0ed53e82dfcc140382b51be66b56e6a9bdc3258afd2846e3bb019",
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
    ),
    "ViT-L-14/datacomp_xl_s13b_b90k": _hub("ViT-L-14", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
}


# --------------------------------------------------------------------------------------------------
# Looking up and fetching registered weights


def list_pretrained() -> list[str]:
    """Every registered pretrained name, ``ARCH/TAG``."""
    return list(PRETRAINED)


def cached_pretrained() -> list[str]:
    """The registered names whose weights are already in the models directory."""
    directory = paths.models_dir()
    return [name for name, entry in PRETRAINED.items() if (directory / entry["filename"]).is_file()]


def cached_state(name: str) -> str | None:
    """What the models directory holds for a registered name, judged without reading the file: None
    (nothing), ``"verified"`` (its recorded sha256 is the pinned one), ``"damaged"`` (its recorded
    sha256 is another: loading it is refused) or ``"unchecked"`` (not hashed since it last changed:
    the first load checks it)."""
    from clipsearch.hashing import recorded_sha256

    path = pretrained_path(name)
    if not path.is_file():
        return None
    digest = recorded_sha256(path)
    if digest is None:
        return "unchecked"
    return "verified" if digest == PRETRAINED[name].get("sha256") else "damaged"


def pretrained_path(name: str) -> Path:
    """Where the weights of a registered name live (or will, once downloaded)."""
    return paths.models_dir() / PRETRAINED[name]["filename"]


def is_pinned(entry: dict) -> bool:
    """Whether a registry entry names an immutable file: a revision and the file's full sha256."""
    sha = entry.get("sha256")
    return (
        isinstance(sha, str)
        and len(sha) == 64
        and all(c in "0123456789abcdef" for c in sha)
        and bool(entry.get("revision"))
    )


def registered_match(digest: str) -> str | None:
    """The registered name whose pinned sha256 this file has, if any."""
    for name, entry in PRETRAINED.items():
        if entry["sha256"] == digest:
            return name
    return None


def fetch_pretrained(name: str, progress: Callable[[int, int | None], None] | None = None) -> Path:
    """The local path of a registered checkpoint, downloading and verifying it on first use."""
    from clipsearch.download import download
    from clipsearch.hashing import file_sha256

    if name not in PRETRAINED:
        raise ModelLoadError(not_found_message(name))
    entry = PRETRAINED[name]
    if not is_pinned(entry):
        earlier = pretrained_path(name)
        hint = (
            f"; the copy an earlier clipsearch downloaded unverified is {earlier}: pass that path to "
            "use it as your own file"
            if earlier.is_file()
            else ""
        )
        raise ModelLoadError(
            f"{name} is registered without a pinned revision and full sha256, so clipsearch will not "
            "download it: its file could change under the same URL. Download it yourself and pass the "
            f"file (or its OpenCLIP hub folder) as the model{hint}"
        )
    dest = pretrained_path(name)
    if not dest.is_file():
        return download(entry["url"], dest, sha256=entry["sha256"], progress=progress)
    got = file_sha256(dest)
    if got != entry["sha256"]:
        raise ModelLoadError(
            f"{dest} does not match the pinned checksum of {name} (expected sha256 "
            f"{entry['sha256']}, got {got}); delete it and load {name} again to re-download it"
        )
    return dest


def not_found_message(text: str) -> str:
    """Why ``text`` names no model: a missing file, or an unknown name with the closest ones."""
    looks_like_path = any(sep in text for sep in ("\\", os.sep)) and text.count("/") != 1
    looks_like_path = looks_like_path or Path(text).suffix in (".pt", ".pth", ".bin", ".safetensors")
    if looks_like_path:
        return f"model file not found: {text}"
    close = difflib.get_close_matches(text, list(PRETRAINED), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"unknown model {text!r}: not a registered name and no such file or directory.{hint} "
        "See `clipsearch models` for the registered names."
    )
