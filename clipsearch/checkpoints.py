"""Loading and saving CLIP models: one call from any source to a model with its preprocessing.

``load_bundle(source)`` accepts, in this order of resolution:

1. a clipsearch model directory (``clipsearch_model.json`` + ``model.safetensors``): nothing inferred;
2. an OpenCLIP hub directory (``open_clip_config.json`` beside ``open_clip_model.safetensors`` or
   ``open_clip_pytorch_model.bin``): its model and preprocessing config honoured;
3. a weights file: OpenAI's TorchScript archive (read without executing it), a pickled state dict
   (``torch.load(weights_only=True)``, optionally wrapped in ``state_dict`` and/or DDP's ``module.``),
   or safetensors; the architecture is inferred from the weights unless ``arch=`` is given;
4. a registered pretrained name ``ARCH/TAG`` (``clipsearch.pretrained``), downloaded on first use.

Nothing here executes code from a file: TorchScript archives are read by a restricted unpickler that
can only rebuild tensors and the module tree's attribute dictionaries.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipsearch import paths
from clipsearch.errors import DownloadError, ModelLoadError
from clipsearch.pretrained import OPENAI_MEAN, OPENAI_STD, PRETRAINED

MODEL_JSON = "clipsearch_model.json"
MODEL_WEIGHTS = "model.safetensors"
HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
FORMAT_NAME = "clipsearch-model"
FORMAT_VERSION = 1

# Tensors OpenAI's TorchScript models carry that are not weights of the architecture.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_CHUNK = 1 << 20  # bytes read per step when downloading and hashing


# --------------------------------------------------------------------------------------------------
# The bundle


@dataclass
class ModelBundle:
    """A model with everything needed to feed it, and a stable identity for photo libraries.

    ``model_id`` is the registered name for pretrained weights (``ViT-B-32/openai``), else
    ``file:<basename>:<sha256 prefix of the weights>``, so the same file always gives the same id.
    ``config`` is the model's architecture in the OpenCLIP JSON schema.
    """

    model: Any
    preprocess_cfg: Any
    tokenizer: Any
    model_id: str
    config: dict

    @property
    def preprocess(self) -> Callable:
        """The eval transform: ``PIL.Image -> Tensor [3, H, W]``."""
        from clipsearch.transform import image_transform

        return image_transform(self.preprocess_cfg)


def load(source: str | Path, device: str = "cpu", **kwargs) -> tuple[Any, Callable, Callable]:
    """Load a CLIP model in eval mode: returns ``(model, preprocess, tokenize)``.

    ``tokenize(list_of_str)`` returns a LongTensor ``[N, context_length]``. See :func:`load_bundle`
    for the sources and keyword arguments.
    """
    bundle = load_bundle(source, device=device, **kwargs)
    return bundle.model, bundle.preprocess, bundle.tokenizer


def load_bundle(
    source: str | Path,
    device: str = "cpu",
    precision: str | None = "fp32",
    *,
    arch: str | None = None,
    quick_gelu: bool | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> ModelBundle:
    """Resolve ``source`` to a :class:`ModelBundle` with the model in eval mode on ``device``.

    ``precision``: ``fp32`` (default), ``bf16`` or ``fp16`` (weights cast; LayerNorm stays fp32).
    ``arch``: a named architecture or OpenCLIP JSON path, for a weights file instead of inferring it.
    ``quick_gelu``: override the activation for a weights file (OpenAI and inferred default: True).
    ``progress(bytes_done, total_or_None)`` is called while a pretrained checkpoint downloads.
    """
    if precision is None:
        precision = "fp32"
    if precision not in _PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; use one of {', '.join(_PRECISIONS)}")
    text = str(source)
    path = Path(text).expanduser()
    if (arch is not None or quick_gelu is not None) and not path.is_file():
        # Registered names and model directories carry their architecture; overriding it would
        # only produce wrong features silently.
        raise ModelLoadError(
            f"arch/quick_gelu apply to a bare weights file only; {text} says its own architecture"
        )
    try:
        if text in PRETRAINED and not path.exists():
            bundle = _load_pretrained(text, progress=progress)
        elif path.is_dir():
            if (path / MODEL_JSON).is_file():
                bundle = _load_clipsearch_dir(path)
            elif (path / HUB_CONFIG).is_file():
                bundle = _load_hub_dir(path)
            else:
                raise ModelLoadError(
                    f"{path} is a directory but holds neither {MODEL_JSON} (a clipsearch model) "
                    f"nor {HUB_CONFIG} (an OpenCLIP hub model)"
                )
        elif path.is_file():
            bundle = _load_weights_file(path, arch=arch, quick_gelu=quick_gelu)
        else:
            raise ModelLoadError(_not_found_message(text))
    except OSError as e:  # e.g. a model folder the user may not open: is_dir()/is_file() raise
        raise ModelLoadError(f"cannot read model {text}: {e.strerror or e}") from e
    import torch

    dtype = getattr(torch, _PRECISIONS[precision])
    try:
        bundle.model.to(device=device)
    except (RuntimeError, AssertionError) as e:  # torch's "not compiled with CUDA" is an assert
        raise ModelLoadError(f"cannot use device {device!r}: {_first_line(e)}") from e
    if dtype != torch.float32:
        _cast_except_layernorm(bundle.model, dtype)
    bundle.model.eval()
    return bundle


def _not_found_message(text: str) -> str:
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


def list_pretrained() -> list[str]:
    """Every registered pretrained name, ``ARCH/TAG``."""
    return list(PRETRAINED)


def cached_pretrained() -> list[str]:
    """The registered names whose weights are already in the models directory."""
    directory = paths.models_dir()
    return [name for name, entry in PRETRAINED.items() if (directory / entry["filename"]).is_file()]


# --------------------------------------------------------------------------------------------------
# Pretrained downloads


def pretrained_path(name: str) -> Path:
    """Where the weights of a registered name live (or will, once downloaded)."""
    return paths.models_dir() / PRETRAINED[name]["filename"]


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Fetch ``url`` to ``dest``: streamed to a temp file beside it, verified, then renamed into place.

    ``sha256`` is a full hex digest, or a prefix of one (at least 8 digits), or None (not verified).
    ``progress(bytes_done, total)`` is called after each chunk; ``total`` is None without a length.
    Raises :class:`DownloadError` when the server cannot be reached, the transfer is cut short or
    the checksum differs; nothing is left at ``dest`` or beside it in that case.
    """
    import http.client
    import urllib.error
    import urllib.request

    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DownloadError(
            f"cannot write to {dest.parent} ({e.strerror or e}); make it writable or point "
            f"${paths.ENV_HOME} at a directory that is"
        ) from e
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "clipsearch"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                done = 0
                if progress is not None:
                    progress(done, total)
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        if total is not None and done != total:
            raise DownloadError(
                f"download of {url} stopped after {done} of {total} bytes; try again, or fetch it "
                f"yourself and put it at {dest}"
            )
        got = digest.hexdigest()
        if sha256 is not None and not _digest_matches(got, sha256):
            raise DownloadError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}; the file was "
                "discarded. Try again; if it keeps failing the server is serving a different file."
            )
        os.replace(tmp, dest)
        _write_sidecar(dest, got)
        return dest
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else None
        reason = reason or getattr(e, "reason", None) or e
        raise DownloadError(
            f"could not download {url} ({reason}). If this machine is offline, download that URL "
            f"elsewhere and put the file at {dest}"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)


def _digest_matches(actual: str, expected: str) -> bool:
    expected = expected.lower()
    if len(expected) < 8:  # a registry entry this short would verify nothing
        raise ValueError(f"sha256 prefix too short: {expected!r}")
    return actual.startswith(expected)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_sidecar(path: Path, digest: str) -> None:
    st = path.stat()
    record = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    side = _sidecar(path)
    try:
        tmp = side.with_name(side.name + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, side)
    except OSError:
        pass  # a read-only models dir only costs a re-hash next time


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file in the models directory, cached in a ``.sha256`` sidecar by size+mtime."""
    path = Path(path)
    st = path.stat()
    try:
        record = json.loads(_sidecar(path).read_text())
        if record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns:
            return record["sha256"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = _hash_file(path)
    _write_sidecar(path, digest)
    return digest


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _user_file_sha256(path: Path) -> str:
    """A user's weights file hashed once per (path, size, mtime); the cache lives in the models dir,
    never beside the user's file."""
    path = path.resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = paths.models_dir() / ".file-hashes.json"
    try:
        cache = json.loads(cache_path.read_text())
        if isinstance(cache, dict) and isinstance(cache.get(key), str):
            return cache[key]
    except (OSError, ValueError):
        cache = {}
    digest = _hash_file(path)
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fresh = {k: v for k, v in (cache if isinstance(cache, dict) else {}).items() if k != key}
        fresh[key] = digest
        if len(fresh) > 256:  # forget the oldest entries; this is a cache, not a record
            fresh = dict(list(fresh.items())[-256:])
        tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(fresh))
        os.replace(tmp, cache_path)
    except OSError:
        pass
    return digest


def fetch_pretrained(name: str, progress: Callable[[int, int | None], None] | None = None) -> Path:
    """The local path of a registered checkpoint, downloading and verifying it on first use."""
    if name not in PRETRAINED:
        raise ModelLoadError(_not_found_message(name))
    entry = PRETRAINED[name]
    dest = pretrained_path(name)
    if not dest.is_file():
        return download(entry["url"], dest, sha256=entry["sha256"], progress=progress)
    if entry["sha256"] is not None:
        got = file_sha256(dest)
        if not _digest_matches(got, entry["sha256"]):
            raise ModelLoadError(
                f"{dest} does not match the published checksum of {name} (expected sha256 "
                f"{entry['sha256']}, got {got}); delete it and load {name} again to re-download it"
            )
    return dest


def _load_pretrained(name: str, progress=None) -> ModelBundle:
    entry = PRETRAINED[name]
    path = fetch_pretrained(name, progress=progress)
    state_dict = read_state_dict(path)
    cfg = _named_config(entry["arch"])
    cfg["quick_gelu"] = entry["quick_gelu"]
    model = _build_and_load(cfg, state_dict, str(path))
    preprocess_cfg = _preprocess_config(cfg, **_entry_preprocess(entry))
    return ModelBundle(model, preprocess_cfg, _clip_tokenizer(cfg), name, cfg)


# --------------------------------------------------------------------------------------------------
# Reading weights


def read_state_dict(path: str | Path) -> dict:
    """A flat ``{name: Tensor}`` from any supported weights file, never executing code from it.

    Unwraps ``{"state_dict": ...}`` and DDP's ``module.`` prefix, and drops OpenAI's non-weight
    tensors (``input_resolution``, ``context_length``, ``vocab_size``).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors" or _looks_like_safetensors(path, head):
        state_dict = _read_safetensors(path)
    elif head.startswith(b"PK") and _is_torchscript(path):
        state_dict = read_torchscript_state_dict(path)
    else:
        state_dict = _read_pickled(path)
    return _normalise_state_dict(state_dict, path)


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    # safetensors starts with a little-endian u64 header length followed by a JSON object.
    if len(head) < 8:
        return False
    n = int.from_bytes(head, "little")
    if not 2 <= n <= 100_000_000:
        return False
    with open(path, "rb") as f:
        f.seek(8)
        return f.read(1) == b"{"


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError and OSError variants
        raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from e


def _read_pickled(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"refused to load {path}: it holds objects other than tensors and plain containers, "
            f"and clipsearch never unpickles code ({_first_line(e)})"
        ) from e
    except Exception as e:  # torch raises RuntimeError/EOFError/ValueError for corrupt archives
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint: {_first_line(e)}") from e
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# TorchScript archives: `<root>/data.pkl` pickles the module tree. Modules are objects of classes
# named `__torch__.<module path>.<Class>` whose state is a dict of attributes (submodules, tensors,
# plain values); tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
# with storages as persistent ids `('storage', <torch.XStorage>, key, location, numel)` whose bytes
# are `<root>/data/<key>`. Which tensor attributes are parameters or buffers is written in the
# classes' source under `<root>/code/` (`__parameters__ = [...]`), which we read as text only.

_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class _ScriptModule:
    """Stands in for a TorchScript class while unpickling: keeps the attribute dict, runs nothing."""

    qualname = ""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for {self.qualname}")
        self.attrs = state


class _StorageType:
    def __init__(self, dtype_name: str):
        self.dtype_name = dtype_name


def _identity(value, *_ignored):
    return value


class _TensorOnlyUnpickler(pickle.Unpickler):
    _SAFE_GLOBALS = {
        ("collections", "OrderedDict"): OrderedDict,
        # TorchScript tags typed lists/dicts with these; they only return their argument.
        ("torch.jit._pickle", "restore_type_tag"): _identity,
        ("torch.jit._pickle", "build_intlist"): _identity,
        ("torch.jit._pickle", "build_doublelist"): _identity,
        ("torch.jit._pickle", "build_boollist"): _identity,
        ("torch.jit._pickle", "build_tensorlist"): _identity,
    }

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self._archive = archive
        self._root = root
        self._classes: dict[str, type] = {}
        self._storages: dict[str, Any] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptModule,), {"qualname": qualname})
            return self._classes[qualname]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:  # dtype tags only
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in self._SAFE_GLOBALS:
            return self._SAFE_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        import torch

        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise pickle.UnpicklingError(f"unexpected storage record {pid!r}")
        if key not in self._storages:
            try:
                info = self._archive.getinfo(f"{self._root}/data/{key}")
            except KeyError as e:
                raise pickle.UnpicklingError(f"storage data/{key} missing from the archive") from e
            raw = bytearray(info.file_size)  # read straight into a writable buffer: one copy only
            with self._archive.open(info) as f:
                if f.readinto(raw) != info.file_size:
                    raise pickle.UnpicklingError(f"storage data/{key} is truncated")
            dtype = getattr(torch, storage_type.dtype_name)
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise pickle.UnpicklingError(f"storage data/{key} has {flat.numel()} elements, not {numel}")
            self._storages[key] = flat
        return self._storages[key]


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    import torch

    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("tensor without a storage")
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


_CLASS_RE = re.compile(r"^class (\S+)\((?:Module|Object)\):", re.M)
_LIST_RE = re.compile(r"^\s+__(parameters|buffers)__ = \[([^\]]*)\]", re.M)


def _script_class_tensors(archive: zipfile.ZipFile, root: str) -> dict[str, set[str]]:
    """``{qualified class name: names of its parameters and buffers}`` from the archive's code/."""
    found: dict[str, set[str]] = {}
    prefix = f"{root}/code/"
    for name in archive.namelist():
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        module = name[len(prefix) : -len(".py")].replace("/", ".")
        text = archive.read(name).decode("utf-8", errors="replace")
        starts = list(_CLASS_RE.finditer(text))
        for i, match in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
            body = text[match.end() : end]
            names: set[str] = set()
            for kind in _LIST_RE.finditer(body):
                names.update(re.findall(r'"([^"]+)"', kind.group(2)))
            found[f"{module}.{match.group(1)}"] = names
    return found


def read_torchscript_state_dict(path: str | Path) -> dict:
    """The parameters and buffers of a TorchScript archive as ``{name: Tensor}``, without torch.jit.

    Raises :class:`ModelLoadError` when the archive holds anything but tensors and the module tree.
    """
    import torch

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pickles:
                raise ModelLoadError(f"{path} is a zip archive without data.pkl; not a TorchScript model")
            root = pickles[0].rsplit("/", 1)[0]
            byteorder = f"{root}/byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
                raise ModelLoadError(f"{path} was saved on a big-endian machine; not supported")
            tensor_names = _script_class_tensors(archive, root)
            with archive.open(f"{root}/data.pkl") as f:
                tree = _TensorOnlyUnpickler(f, archive, root).load()
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"refused to load {path}: {e}; clipsearch never runs code from model files"
        ) from e
    except (zipfile.BadZipFile, EOFError, ValueError, RuntimeError, OSError) as e:
        raise ModelLoadError(f"{path} is a corrupt TorchScript archive: {_first_line(e)}") from e
    if not isinstance(tree, _ScriptModule):
        raise ModelLoadError(f"{path} does not hold a TorchScript module")

    state_dict: dict[str, torch.Tensor] = {}

    def walk(module: _ScriptModule, prefix: str, depth: int) -> None:
        if depth > 64:
            raise ModelLoadError(f"{path}: module tree nested implausibly deep")
        known = tensor_names.get(module.qualname)
        for attr, value in getattr(module, "attrs", {}).items():
            if isinstance(value, _ScriptModule):
                walk(value, f"{prefix}{attr}.", depth + 1)
            elif isinstance(value, torch.Tensor) and (known is None or attr in known):
                state_dict[prefix + attr] = value

    walk(tree, "", 0)
    # Tensors are views into their storage; give the rare ones that share a storage their own copy,
    # so that assigning them to a model cannot alias two parameters.
    owners: dict[int, int] = {}
    for tensor in state_dict.values():
        ptr = tensor.untyped_storage().data_ptr()
        owners[ptr] = owners.get(ptr, 0) + 1
    for key, tensor in state_dict.items():
        if owners[tensor.untyped_storage().data_ptr()] > 1:
            state_dict[key] = tensor.clone()
    return state_dict


# --------------------------------------------------------------------------------------------------
# Building models from weights


def _named_config(name: str) -> dict:
    from clipsearch.configs import get_config

    try:
        return dict(get_config(name))
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise ModelLoadError(f"unknown architecture {name!r}: {e}") from e


def _infer_config(state_dict: dict, path: Path) -> dict:
    from clipsearch.configs import config_from_openai_state_dict

    try:
        return config_from_openai_state_dict(state_dict)
    except (ModelLoadError, KeyError, ValueError, IndexError, AttributeError) as e:
        raise ModelLoadError(
            f"the weights in {path} match no CLIP architecture clipsearch knows ({_first_line(e)}); "
            "pass arch= (--arch) to name it"
        ) from e


def _build_and_load(cfg: dict, state_dict: dict, origin: str):
    """Build ``cfg`` and load ``state_dict`` strictly, naming the first key that does not fit.

    The model is built on the meta device and the loaded tensors are assigned to it: a random
    initialisation that every weight then overwrites would cost seconds for a ViT-B/32.
    """
    import torch

    from clipsearch.model import build_model

    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except (ModelLoadError, KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot build the architecture of {origin}: {_first_line(e)}") from e
    expected = model.state_dict()
    # Causal masks are derived, not learned; some exporters saved them, our model need not.
    state_dict = {k: v for k, v in state_dict.items() if k in expected or not k.endswith("attn_mask")}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise ModelLoadError(
            f"the weights in {origin} do not fit the architecture: {'; '.join(parts)} keys; "
            "pass arch= (--arch) if the architecture was guessed wrong"
        )
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelLoadError(
                f"shape mismatch for {key} in {origin}: file has {tuple(tensor.shape)}, "
                f"architecture expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.float()  # OpenAI's archives hold fp16 weights; precision is applied by the caller
    # Buffers left out of state dicts (the causal mask) are still on the meta device: rebuild them.
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name == "attn_mask" and hasattr(module, "build_attention_mask"):
                module.attn_mask = module.build_attention_mask()
            else:
                return _build_and_load_eagerly(cfg, state_dict)
    return model


def _build_and_load_eagerly(cfg: dict, state_dict: dict):
    """The plain way, for a model with derived buffers we do not know how to rebuild."""
    from clipsearch.model import build_model

    model = build_model(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model


def _preprocess_config(
    cfg: dict, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic", resize_mode="shortest"
):
    from clipsearch.transform import PreprocessConfig

    size = cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ModelLoadError(f"non-square image size {size} is not supported")
        size = size[0]
    try:
        return PreprocessConfig(
            image_size=int(size),
            mean=tuple(float(x) for x in mean),
            std=tuple(float(x) for x in std),
            interpolation=interpolation,
            resize_mode=resize_mode,
        )
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"bad preprocessing config: {_first_line(e)}") from e


def _entry_preprocess(entry: dict) -> dict:
    """A registry entry's normalisation settings (OpenAI's unless it says otherwise)."""
    keys = ("mean", "std", "interpolation", "resize_mode")
    return {k: entry[k] for k in keys if k in entry}


def _clip_tokenizer(cfg: dict):
    from clipsearch.tokenizer import Tokenizer

    return Tokenizer(context_length=int(cfg.get("text_cfg", {}).get("context_length", 77)))


def _file_id(name: str, weights: Path) -> str:
    return f"file:{name}:{_user_file_sha256(weights)[:16]}"


def _registered_match(digest: str) -> str | None:
    """The registered name whose published checksum this file has, if any."""
    for name, entry in PRETRAINED.items():
        if entry["sha256"] and digest.startswith(entry["sha256"]):
            return name
    return None


def _load_weights_file(path: Path, arch: str | None, quick_gelu: bool | None) -> ModelBundle:
    state_dict = read_state_dict(path)
    digest = _user_file_sha256(path)
    registered = _registered_match(digest) if arch is None else None
    entry = PRETRAINED[registered] if registered else {}
    if arch is not None:
        cfg = _named_config(arch)
    elif registered:
        # A copy of a released file put somewhere by hand: use what the registry knows about it.
        cfg = _named_config(entry["arch"])
        cfg["quick_gelu"] = entry["quick_gelu"]
    else:
        cfg = _infer_config(state_dict, path)
    if quick_gelu is not None:
        cfg["quick_gelu"] = bool(quick_gelu)
    model = _build_and_load(cfg, state_dict, str(path))
    preprocess_cfg = _preprocess_config(cfg, **_entry_preprocess(entry))
    model_id = registered or f"file:{path.name}:{digest[:16]}"
    return ModelBundle(model, preprocess_cfg, _clip_tokenizer(cfg), model_id, cfg)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{path} is not readable JSON: {_first_line(e)}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _load_hub_dir(directory: Path) -> ModelBundle:
    config = _read_json(directory / HUB_CONFIG)
    cfg = config.get("model_cfg")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("vision_cfg"), dict):
        raise ModelLoadError(f"{directory / HUB_CONFIG} has no model_cfg with a vision_cfg")
    unsupported = [k for k in ("timm_model_name", "hf_model_name") if cfg["vision_cfg"].get(k)]
    unsupported += [k for k in ("hf_model_name", "hf_tokenizer_name") if cfg.get("text_cfg", {}).get(k)]
    if unsupported:
        raise ModelLoadError(
            f"{directory} uses {', '.join(unsupported)}: only CLIP's own towers are supported"
        )
    weights = next((directory / n for n in HUB_WEIGHTS if (directory / n).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{directory} has {HUB_CONFIG} but neither {' nor '.join(HUB_WEIGHTS)}")
    cfg = dict(cfg)
    cfg.setdefault("quick_gelu", False)  # OpenCLIP's default activation is nn.GELU
    model = _build_and_load(cfg, read_state_dict(weights), str(weights))
    pp = config.get("preprocess_cfg") or {}
    preprocess_cfg = _preprocess_config(
        cfg,
        mean=pp.get("mean", OPENAI_MEAN),
        std=pp.get("std", OPENAI_STD),
        interpolation=pp.get("interpolation", "bicubic"),
        resize_mode=pp.get("resize_mode", "shortest"),
    )
    return ModelBundle(model, preprocess_cfg, _clip_tokenizer(cfg), _file_id(directory.name, weights), cfg)


# --------------------------------------------------------------------------------------------------
# The clipsearch model file


def save_model(
    directory: str | Path,
    model,
    preprocess_cfg,
    tokenizer,
    extra: dict | None = None,
    model_cfg: dict | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``clipsearch_model.json`` (+ the tokenizer's files) atomically.

    ``model_cfg`` defaults to the config the model was built from (``model.config``). A new directory
    appears complete or not at all; in an existing one each file is replaced atomically, the JSON
    last, so a reader never sees a config without its weights.
    """
    from safetensors.torch import save_file

    cfg = model_cfg if model_cfg is not None else getattr(model, "config", None)
    if not isinstance(cfg, dict):
        raise ValueError("save_model needs the model's config: pass model_cfg=")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    fresh = not directory.exists()
    work = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(work / MODEL_WEIGHTS), metadata={"format": FORMAT_NAME})
        tok_cfg = tokenizer.to_config() if hasattr(tokenizer, "to_config") else {"type": "clip-bpe"}
        if hasattr(tokenizer, "save"):
            tok_out = tokenizer.save(work)
            if isinstance(tok_out, dict):
                tok_cfg = tok_out
        pp = (
            dataclasses.asdict(preprocess_cfg)
            if dataclasses.is_dataclass(preprocess_cfg)
            else dict(preprocess_cfg)
        )
        pp = {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}
        record = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model_cfg": cfg,
            "preprocess_cfg": pp,
            "tokenizer": tok_cfg,
        }
        if extra:
            record["extra"] = extra
        (work / MODEL_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if fresh:
            os.replace(work, directory)
        else:
            directory.mkdir(exist_ok=True)
            names = sorted(p.name for p in work.iterdir() if p.name != MODEL_JSON) + [MODEL_JSON]
            for name in names:
                os.replace(work / name, directory / name)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return directory


def _load_clipsearch_dir(directory: Path) -> ModelBundle:
    record = _read_json(directory / MODEL_JSON)
    if record.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{directory / MODEL_JSON} is not a clipsearch model file")
    if not isinstance(record.get("version"), int) or record["version"] > FORMAT_VERSION:
        raise ModelLoadError(
            f"{directory} was written by a newer clipsearch (format version {record.get('version')}); "
            "upgrade clipsearch to load it"
        )
    cfg, pp, tok = record.get("model_cfg"), record.get("preprocess_cfg"), record.get("tokenizer")
    if not (isinstance(cfg, dict) and isinstance(pp, dict) and isinstance(tok, dict)):
        raise ModelLoadError(f"{directory / MODEL_JSON} lacks model_cfg, preprocess_cfg or tokenizer")
    weights = directory / MODEL_WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"{directory} has {MODEL_JSON} but no {MODEL_WEIGHTS}")
    model = _build_and_load(cfg, _read_safetensors(weights), str(weights))
    from clipsearch.tokenizer import Tokenizer
    from clipsearch.transform import PreprocessConfig

    try:
        preprocess_cfg = PreprocessConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in pp.items()}
        )
        tokenizer = Tokenizer.from_config(tok, directory)
    except (TypeError, ValueError, KeyError, OSError) as e:
        raise ModelLoadError(f"{directory / MODEL_JSON}: bad preprocess or tokenizer config: {e}") from e
    return ModelBundle(model, preprocess_cfg, tokenizer, _file_id(directory.name, weights), cfg)


def _cast_except_layernorm(model, dtype) -> None:
    """Cast weights to ``dtype`` but keep LayerNorm's affine parameters in fp32 (it computes there)."""
    import torch

    norms = {m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    for module in model.modules():
        if module in norms:
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point():
                setattr(module, name, buf.to(dtype))
