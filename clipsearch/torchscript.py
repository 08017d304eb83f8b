"""OpenAI's TorchScript model archives read as data: tensors and the module tree, no code run.

A TorchScript archive is a zip. ``<root>/data.pkl`` pickles the module tree: modules are objects of
classes named ``__torch__.<module path>.<Class>`` whose state is a dict of attributes (submodules,
tensors, plain values); tensors are ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)`` with storages as persistent ids ``('storage', <torch.XStorage>, key, location, numel)`` whose
bytes are ``<root>/data/<key>``. Which tensor attributes are parameters or buffers is written in the
classes' source under ``<root>/code/`` (``__parameters__ = [...]``), which is read as text only.

The unpickler below can only rebuild tensors, tag typed lists, and make attribute-dict stand-ins for
the module classes; any other global is refused. Every size the archive declares is checked before
memory is allocated for it: a storage's record must hold exactly ``numel`` elements of its dtype and
be producible from the bytes the record really has in the file (and under :data:`MAX_RECORD_BYTES`), a tensor's view must lie
inside its storage, and the pickle and code files are bounded too. An archive that lies about a size
is refused with :class:`ModelLoadError` before anything of that size is read.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from clipsearch.errors import ModelLoadError

# The largest tensor of any released CLIP (ViT-bigG's token embedding in fp32) is under 1 GiB.
MAX_RECORD_BYTES = 4 << 30
MAX_TEXT_BYTES = 64 << 20
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than this (zlib's technical notes)  # data.pkl and each code/*.py: kilobytes to a few megabytes in practice


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a zip with TorchScript's ``constants.pkl`` (not a plain ``torch.save``)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# Storage class -> (torch dtype name, bytes per element).
_STORAGE_DTYPES = {
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
}


class _ScriptModule:
    """Stands in for a TorchScript class while unpickling: keeps the attribute dict, runs nothing."""

    qualname = ""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for {self.qualname}")
        self.attrs = state


class _StorageType:
    def __init__(self, dtype_name: str, itemsize: int):
        self.dtype_name = dtype_name
        self.itemsize = itemsize


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

    def __init__(self, file, archive: zipfile.ZipFile, root: str, archive_bytes: int):
        super().__init__(file)
        self._archive = archive
        self._archive_bytes = archive_bytes
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
            return _StorageType(*_STORAGE_DTYPES[name])
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
            _check_record_size(info, numel, storage_type.itemsize, self._archive_bytes)
            raw = bytearray(info.file_size)  # read straight into a writable buffer: one copy only
            with self._archive.open(info) as f:
                if f.readinto(raw) != info.file_size:
                    raise pickle.UnpicklingError(f"storage data/{key} is truncated")
            dtype = getattr(torch, storage_type.dtype_name)
            self._storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self._storages[key]


def _check_record_size(info: zipfile.ZipInfo, numel, itemsize: int, archive_bytes: int) -> None:
    """Refuse a storage record whose declared size is not what its tensor needs, before reading it."""
    name = info.filename.rsplit("/", 2)[-2:]
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise pickle.UnpicklingError(f"storage {'/'.join(name)} declares {numel!r} elements")
    if info.file_size != numel * itemsize:
        raise pickle.UnpicklingError(
            f"storage {'/'.join(name)} holds {info.file_size} bytes but its tensor needs "
            f"{numel} x {itemsize} bytes"
        )
    # torch writes records uncompressed; a zip tool may deflate them. Either way the declared size
    # must be one the compressed bytes in this file can really produce.
    if info.compress_type == zipfile.ZIP_STORED:
        limit = min(info.compress_size, archive_bytes)
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        limit = min(info.compress_size, archive_bytes) * _DEFLATE_MAX_RATIO + 1024
    else:
        raise pickle.UnpicklingError(f"storage {'/'.join(name)} uses zip compression {info.compress_type}")
    if info.file_size > min(limit, MAX_RECORD_BYTES):
        raise pickle.UnpicklingError(
            f"storage {'/'.join(name)} declares {info.file_size} bytes, more than its "
            f"{info.compress_size} stored bytes can hold"
        )


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    import torch

    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("tensor without a storage")
    ints = [offset, *size, *stride]
    if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in ints):
        raise pickle.UnpicklingError(f"bad tensor view: offset {offset}, size {size}, stride {stride}")
    if all(size):  # an empty tensor touches no element
        last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
        if last >= storage.numel():
            raise pickle.UnpicklingError(
                f"tensor view (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) reaches "
                f"element {last}, out of bounds of a storage of {storage.numel()}"
            )
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


def _read_text(archive: zipfile.ZipFile, name: str) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > MAX_TEXT_BYTES:
        raise ModelLoadError(f"{name} in the archive declares {info.file_size} bytes; refusing to read it")
    return archive.read(info)


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
        text = _read_text(archive, name).decode("utf-8", errors="replace")
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
            if byteorder in archive.namelist() and _read_text(archive, byteorder).strip() != b"little":
                raise ModelLoadError(f"{path} was saved on a big-endian machine; not supported")
            tensor_names = _script_class_tensors(archive, root)
            pickled = _read_text(archive, f"{root}/data.pkl")
            tree = _TensorOnlyUnpickler(io.BytesIO(pickled), archive, root, os.path.getsize(path)).load()
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"refused to load {path}: {e}; clipsearch never runs code from model files"
        ) from e
    except (zipfile.BadZipFile, EOFError, ValueError, RuntimeError, OSError) as e:
        raise ModelLoadError(f"{path} is a corrupt TorchScript archive: {first_line(e)}") from e
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


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (torch's errors run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
