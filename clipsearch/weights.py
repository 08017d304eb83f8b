"""Reading a weights file into a flat ``{name: Tensor}``, whatever its format, never running its code.

The format is told by content, not by name: safetensors (a little-endian header length, then a JSON
object), a zip archive (OpenAI's TorchScript, read by :mod:`clipsearch.torchscript`, or a
``torch.save`` archive), or a legacy pickle (``torch.load(weights_only=True)``). A file that is none
of these, such as a photo or a text file given as ``--model``, is refused in one line that says so.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

from clipsearch.errors import ModelLoadError
from clipsearch.torchscript import first_line, is_torchscript, read_torchscript_state_dict

# Tensors OpenAI's TorchScript models carry that are not weights of the architecture.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_KINDS = "safetensors, a PyTorch checkpoint or an OpenAI TorchScript archive"

# Leading bytes of files people hand over by mistake, named in the refusal.
_OTHER_FORMATS = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\x1f\x8b", "a gzip file"),
)


def read_state_dict(path: str | Path) -> dict:
    """A flat ``{name: Tensor}`` from any supported weights file, never executing code from it.

    Unwraps ``{"state_dict": ...}`` and DDP's ``module.`` prefix, and drops OpenAI's non-weight
    tensors (``input_resolution``, ``context_length``, ``vocab_size``).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    kind = sniff(path)
    if kind == "safetensors":
        state_dict = read_safetensors(path)
    elif kind == "torchscript":
        state_dict = read_torchscript_state_dict(path)
    elif kind in ("torch-zip", "pickle"):
        state_dict = _read_pickled(path)
    else:
        raise ModelLoadError(f"{path} is not a model file ({kind}); clipsearch reads {_KINDS}")
    return _normalise_state_dict(state_dict, path)


def sniff(path: Path) -> str:
    """``safetensors``, ``torchscript``, ``torch-zip``, ``pickle``, or what else the file looks like.

    Reads a few bytes (and a zip's directory); never the weights.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):
        return "safetensors"
    if head.startswith(b"PK"):
        if is_torchscript(path):
            return "torchscript"
        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("/data.pkl") for n in z.namelist()):
                    return "torch-zip"
            return "a zip archive without a PyTorch checkpoint in it"
        except (zipfile.BadZipFile, OSError):
            return "a damaged zip archive"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"  # the PROTO opcode of pickle 2-5: torch's legacy format and plain pickles
    if not head:
        return "an empty file"
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            return what
    if head[4:12] in (b"ftypheic", b"ftypavif", b"ftypmif1"):
        return "a HEIC/AVIF image"
    if len(head) > 2 and head[0] == 0x08 and head[2] == 0x12:
        return "it looks like an ONNX model, which clipsearch exports but does not load"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    try:
        head.decode("utf-8")
        return "it looks like text"
    except UnicodeDecodeError:
        return "unrecognised content"


def _looks_like_safetensors(head: bytes) -> bool:
    # safetensors starts with a little-endian u64 header length followed by a JSON object.
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= 100_000_000 and head[8:9] == b"{"


def read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError and OSError variants
        raise ModelLoadError(f"{path} is not a readable safetensors file: {first_line(e)}") from e


# torch.load(weights_only=True) is safe only from this release on (see the notes in pyproject.toml).
SAFE_TORCH_LOAD = (2, 10)


def _read_pickled(path: Path) -> dict:
    import torch

    version = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    if version < SAFE_TORCH_LOAD:
        raise ModelLoadError(
            f"refused to load {path}: torch {torch.__version__} has known code-execution bugs in the "
            f"loader for pickled checkpoints; upgrade to torch>={'.'.join(map(str, SAFE_TORCH_LOAD))} "
            "or use a safetensors file"
        )
    if zipfile.is_zipfile(path):
        _check_crcs(path)
    try:
        with warnings.catch_warnings():
            # Python's default pickle protocol (4, 5) makes torch print a page asking for a bug report
            # above whatever follows; the load itself is checked and reported here.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice about weights_only; the user needs one line.
        raise ModelLoadError(
            f"refused to load {path}: it holds Python objects other than tensors and plain "
            f"containers{_refused_global(e)}, and clipsearch never unpickles code"
        ) from e
    except Exception as e:  # torch raises RuntimeError/EOFError/ValueError for corrupt archives
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint: {first_line(e)}") from e
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def _check_crcs(path: Path) -> None:
    """Refuse a ``torch.save`` archive whose bytes do not match its own CRC-32s.

    torch's reader does not check them: a bit flipped on disk or in a copy inside a tensor loads as
    a wrong weight, and every embedding made with it is silently wrong (TorchScript archives are read
    through ``zipfile``, which checks). Reading the archive once costs about 0.2 s per 350 MB.
    """
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ModelLoadError(f"{path} is a damaged PyTorch checkpoint: {first_line(e)}") from e
    if bad is not None:
        raise ModelLoadError(
            f"{path} is a damaged PyTorch checkpoint: {bad} in it does not match its checksum; "
            "download or copy it again"
        )


def _refused_global(e: BaseException) -> str:
    """`` (posix.system)`` when torch's message names the global it refused, else empty."""
    match = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"Unsupported global: ([\w.]+)", str(e))
    return f" ({match.group(1)})" if match else ""


def _normalise_state_dict(obj: dict, path: Path) -> dict:
    import torch

    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    state_dict = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state_dict:
        raise ModelLoadError(f"{path} contains no tensors; it is not a model checkpoint")
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    for key in _OPENAI_EXTRA_KEYS:
        state_dict.pop(key, None)
    return state_dict
