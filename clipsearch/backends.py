"""Image-tower inference backends built from our own CLIP model, and the automatic choice among them.

Each backend turns a preprocessed batch ``[B, 3, H, W]`` (float32) into unnormalised image features
``[B, D]`` (float32 numpy). They differ only in speed and numerics:

=============  ===============================================================================
``torch-fp32``  the model as loaded: the reference every other backend is measured against
``torch-bf16``  a bf16 copy of the image tower (LayerNorm stays fp32); fast only on CPUs with
                AVX512-bf16/AMX, so ``auto`` measures it only there (or on a GPU)
``torch-int8``  dynamic int8 quantisation of the tower's ``nn.Linear`` layers
``onnx-fp32``   the tower exported to ONNX once per model, run by ONNX Runtime
``onnx-int8``   that export with ONNX Runtime's dynamic int8 weight quantisation
``torch-fp16``  an fp16 copy of the image tower (LayerNorm computes in fp32): for GPUs only, so
                it is in :data:`GPU_BACKENDS`, not :data:`BACKENDS` (CPUs emulate fp16 slowly)
=============  ===============================================================================

Which backends ``auto`` measures is :func:`plan_backends`, a pure function of the model's device and
dtype and of the hardware's bf16 support: on the CPU, the fp32 reference, ONNX and int8 (and bf16 where
the CPU has it); on a GPU with an fp32 model, fp32, fp16 and (where supported) bf16 copies; a model
already loaded in reduced precision on a GPU runs as it is.

``auto`` never trades accuracy silently: at first use for a model it runs every candidate on a
calibration batch of photo-like images, keeps those whose features are at cosine >= 0.995 to
``torch-fp32`` on every image, and picks the fastest. The verdict is cached beside the exported
files under ``paths.home()/backends/<model>/`` and measured again when the machine or the library
versions change. Nothing here imports torch or onnxruntime until it is needed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipsearch.atomic import atomic_path
from clipsearch.choices import GPU_IMAGE_BACKENDS, IMAGE_BACKENDS
from clipsearch.errors import ClipsearchError
from clipsearch.paths import cache_dir  # noqa: F401  (re-exported: part of this API)

log = logging.getLogger(__name__)

MIN_COSINE = 0.995  # the fidelity every fast path must keep against torch-fp32, on every image
VERDICT_FILE = "verdict.json"  # the CPU's; another device's is verdict_file(device)
_VERDICT_VERSION = (
    7  # 2: device in the environment; 3: ONNX sessions do not spin; 4: int8 export; 5: read without torch;
    # 6: the int8 graph keeps its patch Conv in float (a new file, measured again); 7: the exports'
    # last block computes the class token alone (new files, measured again)
)
# A process that embeds with ONNX Runtime never imports PyTorch (seconds on a small CPU) nor holds the
# torch model; so ONNX is kept unless a torch backend is more than this much faster per image.
TORCH_FREE_MARGIN = 0.15
# ONNX int8 weights: one scale per output channel, 7-bit range. With the full 8-bit range ONNX
# Runtime's u8 x s8 kernels can saturate their 16-bit intermediate sums on CPUs without VNNI, and
# ViT-B/32 fell to cosine 0.990 to fp32 (tiny-vit 0.990); with these, 0.9997 (tiny-vit 0.9999).
# Only the MatMuls are quantised: ONNX Runtime's ConvInteger kernel for the patch embedding is slower
# than its float Conv (benchmarks/int8_graph.py), and the float patch embedding is also more faithful.
_INT8_OPTIONS = {"per_channel": True, "reduce_range": True, "op_types_to_quantize": ["MatMul"]}
# New names whenever what the files hold changes: an older export or int8 file is not reused, and
# is deleted once its successor exists (~350 and ~90 MB for ViT-B/32, never read again).
_FP32_FILE = "image-fp32-c1.onnx"  # c1: the last block computes the class token alone
_OLD_FP32_FILES = ("image-fp32.onnx",)
_INT8_FILE = "image-int8-mm-c1.onnx"  # MatMuls only, from the c1 export
_OLD_INT8_FILES = ("image-int8.onnx", "image-int8-pc7.onnx", "image-int8-mm.onnx")
_CALIBRATION_IMAGES = 8  # enough images to see a bad backend, few enough to measure in seconds
_ONNX_OPSET = 17


class BackendError(ClipsearchError):
    """An inference backend was asked for by an unknown name, or cannot run on this machine."""


# --------------------------------------------------------------------------------------------------
# Where exported models live


def export_onnx(module, example_args: tuple, target: Path, input_names, output_names, dynamic_axes) -> Path:
    """Export ``module`` with the TorchScript-based exporter to ``target``, atomically.

    The tracing exporter records shapes symbolically, so the axes named in ``dynamic_axes`` (the batch,
    and the sequence length of the text tower) stay free in the graph.

    The graph is traced without its weights, which are then written to the file one tensor at a time
    (:func:`_write_streamed`): with its weights, the exporter holds several copies of all of them at
    once (folded, in the ONNX proto, serialised), about a gigabyte for ViT-B/32's image tower. A model
    whose weights the streamed file cannot hold (over protobuf's 2 GB, or a dtype numpy lacks) is
    exported by torch as a whole, as before.
    """
    import io

    import torch

    weights = {**dict(module.named_buffers()), **dict(module.named_parameters())}
    size = sum(t.numel() * t.element_size() for t in weights.values())
    numpy_dtypes = {torch.float32, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool}
    streamable = size < _STREAMED_MAX_BYTES and all(t.dtype in numpy_dtypes for t in weights.values())
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")  # tracer and deprecation warnings about shape checks
        if not streamable:
            log.info("exporting %s with its weights in one piece (%d MB)", target.name, size >> 20)
            with atomic_path(target) as tmp:
                torch.onnx.export(
                    module,
                    example_args,
                    str(tmp),
                    **_export_options(input_names, output_names, dynamic_axes),
                    do_constant_folding=True,
                )
            return target
        graph = io.BytesIO()
        torch.onnx.export(
            module,
            example_args,
            graph,
            **_export_options(input_names, output_names, dynamic_axes),
            export_params=False,  # weights become graph inputs named as in named_parameters()
            keep_initializers_as_inputs=True,
            do_constant_folding=False,  # it needs the weights; _write_streamed folds the transposes
        )
    _write_streamed(graph.getvalue(), weights, set(input_names), target)
    return target


# The streamed export: protobuf cannot hold more in one message; its field numbers, from onnx.proto.
_STREAMED_MAX_BYTES = (2 << 30) - (64 << 20)
_MODEL_GRAPH_FIELD = 7  # ModelProto.graph
_GRAPH_INITIALIZER_FIELD = 5  # GraphProto.initializer


def _export_options(input_names, output_names, dynamic_axes) -> dict:
    return {
        "dynamo": False,
        "input_names": list(input_names),
        "output_names": list(output_names),
        "dynamic_axes": dynamic_axes,
        "opset_version": _ONNX_OPSET,
    }


def _write_streamed(graph_bytes: bytes, weights: Mapping, inputs: set[str], target: Path) -> None:
    """Write ``graph_bytes`` (an ONNX model whose weights are graph inputs) to ``target`` with each
    weight as an initializer, appended one tensor at a time.

    Protobuf merges a message field that occurs more than once in the encoding (its specification:
    "as if with MergeFrom"), and repeated fields concatenate: so each tensor is written as one more
    ``ModelProto.graph`` holding just that initializer, and every reader sees one graph with all of
    them. A weight only a ``Transpose`` reads (every ``nn.Linear``: ``x @ W.T``) is stored transposed
    under the transpose's output name and the node dropped, as the exporter's constant folding did:
    ONNX Runtime's int8 quantiser only quantises a ``MatMul`` whose weight is an initializer.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(graph_bytes)
    graph = model.graph
    given = [i.name for i in graph.input if i.name not in inputs]
    unknown = [name for name in given if name not in weights]
    if unknown:
        raise ValueError(f"the traced graph reads inputs that are not the module's weights: {unknown[:3]}")
    given_set = set(given)
    kept, plan = [], []  # plan: (initializer name, weight name, permutation or None)
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in given_set:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            plan.append((node.output[0], node.input[0], perm or "reverse"))
        else:
            kept.append(node)
    read = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    plan += [(name, name, None) for name in given if name in read]
    del graph.node[:]
    graph.node.extend(kept)
    real = [i for i in graph.input if i.name not in given_set]
    del graph.input[:]
    graph.input.extend(real)  # weights are initializers now, not inputs a caller could override
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(model.SerializeToString())
        for name, source, perm in plan:
            array = weights[source].detach().cpu().numpy()
            if perm is not None:
                array = array.T if perm == "reverse" else array.transpose(perm)
            tensor = numpy_helper.from_array(np.ascontiguousarray(array), name).SerializeToString()
            entry = _protobuf_key(_GRAPH_INITIALIZER_FIELD) + _varint(len(tensor))
            f.write(_protobuf_key(_MODEL_GRAPH_FIELD) + _varint(len(entry) + len(tensor)) + entry)
            f.write(tensor)


def _protobuf_key(field: int) -> bytes:
    """The key of a length-delimited protobuf field (wire type 2)."""
    return _varint(field << 3 | 2)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _cores(threads: int | None) -> int:
    """The threads a CPU backend uses: ``threads`` when given, else one per core."""
    return int(threads or os.cpu_count() or 1)


def ort_session(path: Path, threads: int | None = None, *, quick_start: bool = False, spin: bool = True):
    """An ONNX Runtime CPU session over ``path`` with ``threads`` intra-op threads (default: all cores).

    ``quick_start``: for a process that runs the graph once (a query), skip the load-time work that
    only pays off over many runs (full graph rewriting, pre-packing the weights of every MatMul).
    ``spin=False``: idle intra-op threads sleep instead of busy-waiting for the next operator, which
    leaves the cores to other threads of the process (the indexer's decoders): faster indexing on
    few cores (figures in ``benchmarks/index_speed.md``).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _cores(threads)
    opts.inter_op_num_threads = 1  # one graph at a time; the parallelism is inside each operator
    opts.log_severity_level = 3  # errors only: the library never prints
    if quick_start:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.add_session_config_entry("session.disable_prepacking", "1")
    else:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------------
# The encoders


class ImageEncoder:
    """``encoder(batch [B, 3, H, W] float32) -> np.ndarray [B, D] float32``, unnormalised features."""

    name: str = "?"
    _parts = 1
    _pool = None

    def __call__(self, batch) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<ImageEncoder {self.name}>"

    def _split_batches(self, cores: int, initializer: Callable[[], None] | None = None) -> None:
        """Run every batch as ``cores`` parts side by side, each on a thread of its own (the
        ``throughput=True`` mode of the CPU encoders below; each part then runs single-threaded).

        A transformer's ~300 operators per forward pass are small: spread over intra-op threads, each
        one ends in a hand-off between threads, which costs CPU time and waits for a descheduled
        thread whenever the indexer's decode threads hold the cores. Whole parts keep every core busy
        without those hand-offs (figures in ``benchmarks/rclip_compare.md`` and ``first_run.md``).
        A batch of one image gets no faster that way, so queries keep intra-op threads.
        """
        self._parts = max(1, cores)
        if self._parts > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(
                self._parts, thread_name_prefix="clipsearch-embed", initializer=initializer
            )

    def _in_parts(self, x: np.ndarray, run) -> np.ndarray:
        """``run(x)``, or ``run`` on each part of ``x`` [B, ...] at once when the batches are split."""
        if self._pool is None or len(x) < 2:
            return run(x)
        parts = np.array_split(x, min(self._parts, len(x)))  # [b, ...] each, in order
        return np.concatenate(list(self._pool.map(run, parts)))  # [B, D]


class TorchImageEncoder(ImageEncoder):
    """Runs an image tower (``module(x) -> [B, D]``) in PyTorch, casting the input to ``dtype``.

    ``throughput=True`` on the CPU: each batch is cut into one part per core, each part running
    single-threaded on a thread of its own (:meth:`ImageEncoder._split_batches`; torch releases the
    GIL inside its operators). The caller's own intra-op threads are left as they were.
    """

    def __init__(
        self, name: str, module, dtype, device, threads: int | None = None, *, throughput: bool = False
    ):
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        if throughput and torch.device(device).type == "cpu":
            self._split_batches(_cores(threads), _one_torch_thread)
        self.name = name
        self._module = module.eval()
        self._dtype = dtype
        self._device = device

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():  # thread-local: set in each part's thread
            x = torch.as_tensor(x).to(device=self._device, dtype=self._dtype)  # [b, 3, H, W]
            return self._module(x).float().cpu().numpy()  # [b, D]

    def __call__(self, batch) -> np.ndarray:
        if hasattr(batch, "detach"):
            batch = batch.detach().cpu().numpy()
        out = self._in_parts(np.ascontiguousarray(batch, dtype=np.float32), self._run)
        if self._pool is not None:
            import torch

            torch.set_num_threads(torch.get_num_threads())  # see _one_torch_thread
        return out


def _one_torch_thread() -> None:
    """Make the calling (new) thread's PyTorch operators single-threaded, and only its own.

    With OpenMP (PyTorch's CPU builds) the thread count is a per-thread setting, initialised from a
    process-wide one on a thread's first parallel operator; ``set_num_threads`` writes both. So this
    thread's own setting is initialised first, then set to 1; the caller, whose threads keep their
    count, writes its own back as the process-wide value after each batch, for threads started later.
    """
    import torch

    torch.get_num_threads()  # initialises this thread's setting from the process-wide one
    torch.set_num_threads(1)


class OnnxImageEncoder(ImageEncoder):
    """Runs an exported image tower in ONNX Runtime.

    ``throughput=True`` (the indexer's choice): the session runs one thread, and a batch is cut into
    one part per core, the parts running at once on threads of their own
    (:meth:`ImageEncoder._split_batches`). Queries keep intra-op threads (the default).
    """

    def __init__(self, name: str, path: Path, threads: int | None = None, *, throughput: bool = False):
        self.name = name
        self.path = Path(path)
        cores = _cores(threads)
        # Image batches run while the indexer's threads decode the next photos: no busy-waiting.
        self._session = ort_session(self.path, 1 if throughput else cores, spin=False)
        self._input = self._session.get_inputs()[0].name
        if throughput:
            self._split_batches(cores)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: x})[0]  # [b, D]; ONNX Runtime releases the GIL

    def __call__(self, batch) -> np.ndarray:
        if hasattr(batch, "detach"):
            batch = batch.detach().cpu().numpy()
        x = np.ascontiguousarray(batch, dtype=np.float32)  # [B, 3, H, W]
        return self._in_parts(x, self._run).astype(np.float32, copy=False)


def _fp32_visual(model):
    """The model's image tower in fp32 (a copy only when the model was loaded in lower precision)."""
    import torch

    if model.dtype == torch.float32:
        return model.visual
    return copy.deepcopy(model.visual).float()


def _make_torch_fp32(bundle, threads, directory, *, throughput: bool = False):
    import torch

    return TorchImageEncoder(
        "torch-fp32",
        _fp32_visual(bundle.model),
        torch.float32,
        bundle.model.device,
        threads,
        throughput=throughput,
    )


def _half_visual(model, dtype):
    """A copy of the image tower in ``dtype`` (bf16 or fp16), with the LayerNorm weights kept in fp32."""
    from clipsearch.model import LayerNorm

    visual = copy.deepcopy(_fp32_visual(model))
    visual.to(dtype)
    for module in visual.modules():
        if isinstance(module, LayerNorm):  # statistics in fp32: half-precision ones visibly shift features
            module.float()
    return visual


def _make_torch_bf16(bundle, threads, directory, *, throughput: bool = False):
    import torch

    visual = _half_visual(bundle.model, torch.bfloat16)
    return TorchImageEncoder(
        "torch-bf16", visual, torch.bfloat16, bundle.model.device, threads, throughput=throughput
    )


def _make_torch_fp16(bundle, threads, directory, *, throughput: bool = False):
    import torch

    visual = _half_visual(bundle.model, torch.float16)
    return TorchImageEncoder(
        "torch-fp16", visual, torch.float16, bundle.model.device, threads, throughput=throughput
    )


def _make_torch_int8(bundle, threads, directory, *, throughput: bool = False):
    import torch
    from torch.ao.quantization import quantize_dynamic

    if bundle.model.device.type != "cpu":
        raise BackendError("torch-int8 runs on the CPU only; use torch-fp32 or torch-bf16 on a GPU")
    tower = _packed_in_projections(_shallow_tower(_fp32_visual(bundle.model)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        visual = quantize_dynamic(tower, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return TorchImageEncoder(
        "torch-int8", visual, torch.float32, torch.device("cpu"), threads, throughput=throughput
    )


def _packed_in_projections(tower):
    """``tower`` (a :func:`_shallow_tower` copy) with each attention's packed q/k/v projection also
    held as an ``nn.Linear`` sharing its weights, which the attention then uses.

    ``quantize_dynamic`` swaps ``nn.Linear`` modules only, and the projection is a bare parameter
    (``in_proj_weight``, as in ``nn.MultiheadAttention``): left in fp32 it was a quarter of each
    block's matrix work, and the int8 tower took 130 instead of 104 ms of CPU per image (ViT-B/32
    at 256 px, one thread).
    """
    import torch

    from clipsearch.model import MultiheadSelfAttention

    for attention in tower.modules():
        if isinstance(attention, MultiheadSelfAttention):
            width = attention.in_proj_weight.shape[1]
            with torch.device("meta"):  # no fp32 copy of the weights: they are set just below
                packed = torch.nn.Linear(width, 3 * width)
            packed.weight, packed.bias = attention.in_proj_weight, attention.in_proj_bias
            attention.in_proj = packed
    return tower


def _shallow_tower(tower):
    """A copy of ``tower``'s module tree that shares every parameter and buffer with it.

    Quantising it in place swaps its own ``nn.Linear`` modules for int8 ones and leaves the model's
    untouched, so the int8 tower costs its int8 weights only, not a second fp32 copy of the tower.
    """
    shared = {id(t): t for t in [*tower.parameters(), *tower.buffers()]}
    return copy.deepcopy(tower, memo=shared)


def image_onnx_path(bundle, directory: Path | None = None) -> Path:
    """Export the image tower to ``<cache>/`` :data:`_FP32_FILE` unless it is there; returns its path."""
    directory = Path(directory or cache_dir(bundle.model_id))
    target = directory / _FP32_FILE
    if not target.is_file():
        import torch

        size = bundle.model.visual.input_resolution
        example = torch.zeros(2, 3, size, size)  # [B, 3, H, W]; B stays free in the graph
        tower = _fp32_visual(bundle.model)
        if bundle.model.device.type != "cpu":
            tower = copy.deepcopy(tower).cpu()
        export_onnx(
            tower,
            (example,),
            target,
            ["image"],
            ["features"],
            {"image": {0: "batch"}, "features": {0: "batch"}},
        )
        for old in _OLD_FP32_FILES:
            (directory / old).unlink(missing_ok=True)
    return target


def _make_onnx_fp32(bundle, threads, directory, *, throughput: bool = False):
    return OnnxImageEncoder("onnx-fp32", image_onnx_path(bundle, directory), threads, throughput=throughput)


def _make_onnx_int8(bundle, threads, directory, *, throughput: bool = False):
    directory = Path(directory or cache_dir(bundle.model_id))
    target = directory / _INT8_FILE
    if not target.is_file():
        from clipsearch.quantise import quantise

        quantise(image_onnx_path(bundle, directory), target, _INT8_OPTIONS)  # in a torch-free child
        for old in _OLD_INT8_FILES:
            (directory / old).unlink(missing_ok=True)
    return OnnxImageEncoder("onnx-int8", target, threads, throughput=throughput)


Factory = Callable[..., ImageEncoder]  # (bundle, threads, directory, *, throughput=False) -> ImageEncoder

_FACTORIES: dict[str, Factory] = {
    "torch-fp32": _make_torch_fp32,
    "torch-bf16": _make_torch_bf16,
    "torch-int8": _make_torch_int8,
    "onnx-fp32": _make_onnx_fp32,
    "onnx-int8": _make_onnx_int8,
    "torch-fp16": _make_torch_fp16,
}
# The backends a user can force by name on any machine (``clipsearch index --backend``), and those
# that only pay off on a GPU (``auto`` measures them there); the names live in clipsearch.choices.
BACKENDS: dict[str, Factory] = {name: _FACTORIES[name] for name in IMAGE_BACKENDS}
GPU_BACKENDS: dict[str, Factory] = {name: _FACTORIES[name] for name in GPU_IMAGE_BACKENDS}


def _all_backends() -> dict[str, Factory]:
    return {**BACKENDS, **GPU_BACKENDS}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-bf16 or AMX).

    Elsewhere PyTorch emulates bf16 and it is slower than fp32, so ``auto`` does not even try it.
    Read from ``/proc/cpuinfo`` (no torch import); elsewhere asked of PyTorch only when it is loaded.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        torch = sys.modules.get("torch")
        try:
            return torch is not None and torch.backends.cpu.get_cpu_capability() == "AMX"
        except AttributeError:
            return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


# The CPU features that decide which kernels PyTorch and ONNX Runtime run (and so a verdict's speeds).
_KERNEL_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
)


def cpu_description() -> str:
    """This CPU as a verdict depends on it, without importing torch: model name and kernel features."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return f"{platform.machine()} {platform.processor()}".strip()
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    have = set(flags.group(1).split()) if flags else set()
    kept = [f for f in _KERNEL_FLAGS if f in have]
    return " ".join([name.group(1).strip() if name else platform.machine(), *kept])


def cuda_has_bf16() -> bool:
    """Whether the current CUDA device computes bf16 natively (Ampere and later)."""
    try:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except (ImportError, AttributeError, RuntimeError):
        return False


def plan_backends(
    device_type: str, dtype_name: str, *, cpu_fast_bf16: bool, cuda_bf16: bool
) -> list[str] | None:
    """The backends ``auto`` measures for a model on ``device_type`` loaded in ``dtype_name``.

    A pure function of its arguments (so every branch is tested without a GPU): ``device_type`` is
    ``torch.device.type`` (``cpu``, ``cuda``, ``mps``...), ``dtype_name`` the parameters' dtype
    (``float32``, ``float16``, ``bfloat16``). ``None`` means "run the model as it is": it is on an
    accelerator in the reduced precision its user loaded it in.
    """
    if device_type == "cpu":
        names = ["torch-fp32", "onnx-fp32", "onnx-int8", "torch-int8"]
        if cpu_fast_bf16:
            names.insert(1, "torch-bf16")
        return names
    if dtype_name != "float32":
        return None
    names = ["torch-fp32", "torch-fp16"]  # ONNX Runtime here is CPU-only; int8 kernels are CPU-only
    if device_type == "cuda" and cuda_bf16:
        names.append("torch-bf16")
    return names


def placement(bundle) -> tuple[str, str]:
    """``(device, dtype name)`` of ``bundle``'s model, e.g. ``("cpu", "float32")``: asked of the
    bundle when it knows them without loading (:class:`clipsearch.checkpoints.LazyBundle`), else of
    the model."""
    known = getattr(bundle, "placement", None)
    if known is not None:
        return known
    return str(bundle.model.device), str(bundle.model.dtype).removeprefix("torch.")


def auto_plan(bundle) -> list[str] | None:
    """:func:`plan_backends` for ``bundle``'s model on this machine."""
    device, dtype_name = placement(bundle)
    device_type = device.split(":")[0]
    return plan_backends(
        device_type,
        dtype_name,
        cpu_fast_bf16=device_type == "cpu" and cpu_has_fast_bf16(),
        cuda_bf16=device_type == "cuda" and cuda_has_bf16(),
    )


def default_candidates(bundle) -> list[str]:
    """The backends ``auto`` measures for ``bundle`` on this machine (the fp32 reference at least)."""
    return auto_plan(bundle) or ["torch-fp32"]


# --------------------------------------------------------------------------------------------------
# Measuring and choosing


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like RGB image ``[height, width, 3]`` uint8: smooth gradients, soft shapes, sensor noise.

    Its statistics are close enough to a photograph's for calibration and for JPEG sizes that look
    like a camera's (a flat random image would compress badly; a flat colour far too well).
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= max(height - 1, 1)
    xx /= max(width - 1, 1)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):  # a sky-to-ground gradient with a tilt per channel
        a, b, base = rng.uniform(-120, 120, 3)
        img[..., c] = 128 + base * 0.5 + a * yy + b * xx
    for _ in range(int(rng.integers(3, 8))):  # soft-edged discs and bands: objects and horizons
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.35)
        colour = rng.uniform(-90, 90, 3)
        d = np.sqrt((yy - cy) ** 2 + ((xx - cx) * width / height) ** 2)
        weight = np.clip((r - d) / (0.02 + 0.1 * r), 0, 1)[..., None]
        img += weight * colour
    img += rng.normal(0, 6, (height, width, 3)).astype(np.float32)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def calibration_batch(bundle, n: int = _CALIBRATION_IMAGES, seed: int = 0):
    """``n`` photo-like images passed through the bundle's eval transform: ``Tensor [n, 3, H, W]``."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    preprocess = bundle.preprocess
    images = []
    for _ in range(n):
        w, h = int(rng.integers(320, 640)), int(rng.integers(240, 480))
        images.append(preprocess(Image.fromarray(synthetic_photo(rng, w, h))))
    return torch.stack(images)  # [n, 3, H, W]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``: ``[B]``."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-30)


@dataclass
class Measurement:
    """One backend on the calibration batch: worst-image cosine to fp32 and images per second."""

    name: str
    cosine: float | None = None
    images_per_s: float | None = None
    error: str | None = None

    @property
    def faithful(self) -> bool:
        return self.error is None and self.cosine is not None and self.cosine >= MIN_COSINE


def time_encoder(encoder: ImageEncoder, batch, repeats: int = 2) -> float:
    """Images per second of ``encoder`` on ``batch``: one warm-up, then the best of ``repeats`` runs."""
    encoder(batch)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encoder(batch)
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def measure(
    encoder: ImageEncoder, batch, reference: np.ndarray, repeats: int = 2, name: str | None = None
) -> Measurement:
    """Fidelity (the worst row's cosine to ``reference``) and speed of ``encoder`` on ``batch``."""
    features = encoder(batch)
    cosine = float(cosine_rows(features, reference).min()) if np.all(np.isfinite(features)) else -1.0
    return Measurement(
        name or encoder.name, cosine=cosine, images_per_s=time_encoder(encoder, batch, repeats)
    )


def _environment(threads: int | None, device=None) -> dict:
    """What a cached verdict depends on besides the model: a change means measuring again.

    Read without importing torch (versions from the installed packages' metadata, the CPU from the
    system), so a run whose verdict says ONNX never loads PyTorch. ``device``: a ``torch.device``
    or its name (``"cpu"``, ``"cuda:0"``).
    """
    import importlib.metadata

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)  # without importing it (slow imports both)
        except importlib.metadata.PackageNotFoundError:
            return None  # its backends then fail to build: recorded, never chosen

    env = {
        "version": _VERDICT_VERSION,
        "torch": version("torch"),
        "onnxruntime": version("onnxruntime"),
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
        "threads": threads,
        "device": "cpu",
    }
    name = "cpu" if device is None else str(device)
    if name != "cpu":
        # a verdict measured on the CPU (or another GPU) says nothing about this one
        env["device"] = name
        if name.startswith("cuda"):
            import torch  # loaded already: the model is on that GPU

            env["gpu"] = torch.cuda.get_device_name(torch.device(name))
    return env


def verdict_file(device: str) -> str:
    """The verdict's file name for a model on ``device`` (``"cpu"``, ``"cuda:0"``): one per device, so
    a machine that indexes on its GPU and, with ``--device cpu``, on its CPU keeps both verdicts
    instead of each measuring over the other's."""
    return VERDICT_FILE if device == "cpu" else f"verdict-{re.sub(r'[^A-Za-z0-9]+', '-', device)}.json"


def _verdict_of(bundle, threads: int | None) -> tuple[Path, dict]:
    """``(verdict path, environment)`` of ``bundle``'s model where it is placed."""
    device = placement(bundle)[0]
    return cache_dir(bundle.model_id) / verdict_file(device), _environment(threads, device)


def _read_verdict(path: Path, env: dict) -> dict[str, Measurement]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("environment") != env:
        return {}
    out = {}
    for name, m in data.get("backends", {}).items():
        if isinstance(m, dict):
            out[name] = Measurement(name, m.get("cosine"), m.get("images_per_s"), m.get("error"))
    return out


def _write_verdict(path: Path, env: dict, results: Mapping[str, Measurement], chosen: str) -> None:
    record = {
        "environment": env,
        "min_cosine": MIN_COSINE,
        "chosen": chosen,
        "backends": {
            m.name: {"cosine": m.cosine, "images_per_s": m.images_per_s, "error": m.error}
            for m in results.values()
        },
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def release_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc only).

    Exporting and quantising ViT-B/32 allocate ~1 GB that is freed at once; glibc keeps freed heap
    pages by default, so without this an index run that measured the backends first would keep
    ~1 GB of nothing for its whole length (measured: 1.94 GB resident after measuring, 0.97 GB after).
    """
    import ctypes
    import gc

    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: glibc's, where it is glibc
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return
    trim(0)


_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's mallopt parameters (malloc.h)
HEAP_ARENAS = 2
HEAP_MMAP_THRESHOLD = 4 << 20
_heap_bounded = False  # bounded_heap() ran in this process


def bounded_heap() -> None:
    """Keep glibc's heap from growing per thread (once per process; glibc only; the user's own
    ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_`` win). The indexer calls it before it starts
    its threads.

    By default glibc gives each new thread that allocates an arena of its own (up to 8 per core),
    and raises its mmap threshold to the largest block freed so far (up to 32 MB), so that freed
    activations of a forward pass stay in the heap. A first index run's torch parts, on threads of
    their own beside four decode threads, raised its peak RSS to 1505-1580 MB that way (ViT-B/32,
    100 mixed photos; the goal is 1.5 GB); with at most :data:`HEAP_ARENAS` arenas and a fixed
    :data:`HEAP_MMAP_THRESHOLD` it peaked at 1389-1421 MB, at the same CPU per image within noise
    (``benchmarks/first_run.md``).
    """
    global _heap_bounded
    if _heap_bounded:
        return
    _heap_bounded = True
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, HEAP_ARENAS)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)


def pick(measured, margin: float = TORCH_FREE_MARGIN) -> str:
    """The backend to keep among ``measured`` (:class:`Measurement`): the fastest faithful one, except
    that the fastest faithful ONNX backend is kept over a torch one less than ``margin`` faster (an
    ONNX run neither imports PyTorch nor holds the torch model: start-up and memory count too).
    ``torch-fp32`` when nothing is faithful. A pure function."""
    faithful = [m for m in measured if m.faithful and m.images_per_s]
    if not faithful:
        return "torch-fp32"
    best = max(faithful, key=lambda m: m.images_per_s)
    onnx = [m for m in faithful if m.name.startswith("onnx-")]
    if onnx and not best.name.startswith("onnx-"):
        best_onnx = max(onnx, key=lambda m: m.images_per_s)
        if best_onnx.images_per_s * (1 + margin) >= best.images_per_s:
            return best_onnx.name
    return best.name


def choose_backend(
    bundle,
    *,
    threads: int | None = None,
    candidates: Mapping[str, Factory] | None = None,
    batch=None,
    done_with_model: Callable[[], None] | None = None,
) -> tuple[str, dict[str, Measurement]]:
    """Measure the candidates once (cached) and return ``(fastest faithful name, all measurements)``.

    ``candidates`` maps names to factories (default: :func:`default_candidates` from
    :data:`BACKENDS`); ``torch-fp32`` is always measured, as the reference. A backend whose worst
    calibration image falls below :data:`MIN_COSINE`, or that fails to build or run, is never chosen.
    Each runs as the indexer runs it (``throughput=True``: on the CPU, one single-threaded part of the
    batch per core), so the speeds compared are the ones indexing gets. The torch backends are
    measured first, then the image tower is exported to ONNX, then the ONNX backends (quantisation
    included) are built from that file alone: ``done_with_model()``, when
    given, is called in between, so a caller that owns the model (:mod:`clipsearch.settle`) can free
    it before ONNX Runtime's quantiser needs its own gigabyte.
    """
    if candidates is None:
        candidates = {name: _all_backends()[name] for name in default_candidates(bundle)}
    candidates = {"torch-fp32": BACKENDS["torch-fp32"], **candidates}
    directory = cache_dir(bundle.model_id)
    verdict_path, env = _verdict_of(bundle, threads)
    results = {k: v for k, v in _read_verdict(verdict_path, env).items() if k in candidates}
    missing = [name for name in candidates if name not in results]
    if missing:
        if batch is None:
            batch = calibration_batch(bundle)
        reference = candidates["torch-fp32"](bundle, threads, directory, throughput=True)(batch)
        release_memory()
        from_file = [n for n in missing if candidates[n] in (_make_onnx_fp32, _make_onnx_int8)]
        missing = [n for n in missing if n not in from_file] + from_file  # those needing the model first
        for name in missing:
            if name == (from_file or [None])[0] and done_with_model is not None:
                try:
                    image_onnx_path(bundle, directory)
                except build_failures() as e:  # the ONNX factories fail and record it below
                    log.info("no ONNX export of the image tower: %s", describe_error(e))
                else:
                    done_with_model()
                    release_memory()
            try:
                encoder = candidates[name](bundle, threads, directory, throughput=True)
                results[name] = measure(encoder, batch, reference, name=name)
            except build_failures() as e:
                # the export, quantisation or runtime failed on this machine: recorded, never chosen
                results[name] = Measurement(name, error=describe_error(e))
            finally:
                # One candidate at a time: the next export starts from the model's own footprint.
                encoder = None
                release_memory()
            log.info("measured %s", results[name])
    chosen = pick(results.values())
    if missing:
        _write_verdict(verdict_path, env, results, chosen)
    return chosen, results


def make_image_encoder(
    bundle,
    backend: str = "auto",
    *,
    threads: int | None = None,
    candidates: Mapping[str, Factory] | None = None,
    settle: bool = False,
    throughput: bool = False,
) -> ImageEncoder:
    """An image encoder for ``bundle`` (a :class:`clipsearch.checkpoints.ModelBundle`).

    ``settle=True`` (the indexer's choice): an ``auto`` with no verdict yet for this model measures
    nothing up front and returns a :class:`SettlingEncoder` instead, which settles on the caller's
    first batch among the quick backends. ``throughput=True`` (the indexer's choice too): the caller
    sends large batches, so a CPU backend runs parts of each batch side by side, one thread each
    (:meth:`ImageEncoder._split_batches`), instead of spreading each operator over the cores.

    ``backend``: ``auto`` (the fastest backend measured faithful on this machine: cosine >= 0.995 to
    fp32), or one of :data:`BACKENDS` (or :data:`GPU_BACKENDS`) by name to force it. ``threads``:
    intra-op threads (default: all cores). The first ``auto`` for a model exports and measures
    (seconds to a minute for ViT-B/32); later ones read the cached verdict, and should the chosen
    backend fail to build now, the next faithful one (at worst ``torch-fp32``) is used. Raises
    :class:`BackendError` for an unknown name, or a forced backend that cannot run here.
    """
    sleeping_openmp_threads()
    directory = cache_dir(bundle.model_id)
    table = {**_all_backends(), **(candidates or {})}

    def build(name: str) -> ImageEncoder:
        return table[name](bundle, threads, directory, throughput=throughput)

    if backend == "auto":
        if settle and candidates is None and needs_measuring(bundle, threads=threads):
            return SettlingEncoder(bundle, threads, throughput=throughput)
        name, results = choose_backend(bundle, threads=threads, candidates=candidates)
        # The chosen one first, then the other faithful ones by speed: a cached verdict can outlive
        # what it measured (an export deleted, a runtime broken since), and auto must still give one.
        faithful = sorted(
            (m for m in results.values() if m.faithful and m.images_per_s and m.name != name),
            key=lambda m: -m.images_per_s,
        )
        order = [name, *(m.name for m in faithful if m.name != "torch-fp32")]
        for candidate in order:
            try:
                encoder = build(candidate)
            except build_failures() as e:
                log.info(
                    "backend %s cannot run now (%s); trying the next faithful one",
                    candidate,
                    describe_error(e),
                )
                continue  # the next faithful backend, torch-fp32 at the end
            log.info("image backend: %s (the measured verdict for this model and machine)", candidate)
            return encoder
        log.info("image backend: torch-fp32 (no faithful backend of the verdict builds)")
        return build("torch-fp32")
    if backend not in table:
        raise BackendError(f"unknown inference backend {backend!r}; use auto or one of {', '.join(table)}")
    try:
        return build(backend)
    except BackendError:
        raise
    except build_failures() as e:
        raise BackendError(
            f"the {backend} backend cannot run on this machine ({describe_error(e)}); use auto or another backend"
        ) from e


def sleeping_openmp_threads() -> None:
    """Make PyTorch's OpenMP threads sleep when they wait, instead of spinning (``OMP_WAIT_POLICY=PASSIVE``),
    unless the user set the policy or PyTorch is loaded already (OpenMP reads it once, as torch loads).

    An index run embeds in the main thread while its decode threads share the same cores: threads
    that spin at the end of every operator take the cores the decoders need, and an operator waits
    for its slowest thread whenever one is descheduled (measured on a first run, torch-int8 while
    settling: ``benchmarks/first_run.md``). The setting is inherited by the background settle, and
    FAISS's OpenMP threads gain from it too (``benchmarks/search_scale.md``).
    """
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    log.info("OpenMP threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE): the decoders share the cores")


def is_quick(name: str) -> bool:
    """Whether backend ``name`` is cheap enough to build in the middle of a first index run: a copy
    of the tower in memory, no export to a file and no quantisation of one (the ONNX backends take
    seconds to a minute and the export a gigabyte: :mod:`clipsearch.settle` does them later)."""
    return not name.startswith("onnx-")


class SettlingEncoder(ImageEncoder):
    """The encoder of a first index run for a model that has no verdict on this machine yet.

    Nothing is measured before the user's photos. On the first batch, each quick candidate of
    :func:`default_candidates` (on a CPU ``torch-int8``, and ``torch-bf16`` where it is fast; on a GPU
    the fp16/bf16 copies) embeds the whole batch, and ``torch-fp32``, the reference, embeds
    :data:`_CALIBRATION_IMAGES` photos spread over it (as many as the full measurement's calibration
    batch): a candidate faithful on every one of them (cosine >= :data:`MIN_COSINE`) and faster per
    photo than fp32 keeps its features and the run goes on with it; else fp32 embeds the rest of the
    batch and stays. So the check costs the first batch a handful of fp32 photos, not a second pass.
    ``measurements`` holds what was seen. The full measurement (ONNX export and quantisation
    included) is :func:`choose_backend`, which the CLI runs after the index (in the background);
    until its verdict exists, every index run settles this way again.
    """

    def __init__(
        self,
        bundle,
        threads: int | None = None,
        candidates: list[str] | None = None,
        *,
        throughput: bool = False,
    ):
        if candidates is None:
            candidates = [n for n in default_candidates(bundle) if n != "torch-fp32" and is_quick(n)]
        self._bundle = bundle
        self._threads = threads
        self._throughput = throughput
        self._encoder = _make_torch_fp32(bundle, threads, None, throughput=throughput)
        self._pending = list(candidates)
        self.name = self._encoder.name
        self.measurements: dict[str, Measurement] = {}

    def __call__(self, batch) -> np.ndarray:
        if not self._pending:
            return self._encoder(batch)
        n = len(batch)
        sample = sample_rows(n, _CALIBRATION_IMAGES)
        start = time.perf_counter()
        reference = self._encoder(batch[sample])  # [S, D]: the fp32 features of the sampled photos
        speed = len(sample) / (time.perf_counter() - start)
        self.measurements[self.name] = Measurement(self.name, cosine=1.0, images_per_s=speed)
        best = (speed, self._encoder, None)  # (images/s, encoder, its features of the whole batch)
        for name in self._pending:
            try:
                encoder = _all_backends()[name](
                    self._bundle, self._threads, None, throughput=self._throughput
                )
                start = time.perf_counter()
                features = encoder(batch)  # [B, D]
                took = time.perf_counter() - start
                finite = np.all(np.isfinite(features))
                cosine = float(cosine_rows(features[sample], reference).min()) if finite else -1.0
                m = Measurement(name, cosine=cosine, images_per_s=n / took)
            except build_failures() as e:
                m = Measurement(name, error=describe_error(e))
            self.measurements[name] = m
            log.info("first run, %s on %d of its photos (checked on %d): %s", name, n, len(sample), m)
            if m.faithful and m.images_per_s > best[0]:
                best = (m.images_per_s, encoder, features)
            encoder = features = None
        self._pending = []
        self._encoder = best[1]
        self.name = self._encoder.name
        log.info("first run goes on with %s; the full measurement comes after it", self.name)
        release_memory()
        if best[2] is not None:
            return best[2]
        out = np.empty((n, reference.shape[1]), np.float32)  # fp32 stays: the rest of the batch too
        out[sample] = reference
        rest = [i for i in range(n) if i not in set(sample)]
        if rest:
            out[rest] = self._encoder(batch[rest])
        return out


def sample_rows(n: int, k: int) -> list[int]:
    """``min(n, k)`` row indices spread evenly over ``range(n)``, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def build_failures() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this backend cannot export, build or run here", not a bug in clipsearch.

    ONNX Runtime's own errors (``Fail``, ``InvalidGraph``...) derive from ``Exception`` only, so they
    are named here; ``AssertionError`` and the like are not, and still surface.
    """
    found: list[type[BaseException]] = [
        RuntimeError,  # torch (export, quantisation, kernels), also torch.onnx's errors
        ValueError,
        TypeError,
        OSError,
        ImportError,
        MemoryError,
        BackendError,
    ]
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
    except ImportError:
        return tuple(found)
    for name in dir(ort_state):
        obj = getattr(ort_state, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == ort_state.__name__:
            found.append(obj)
    return tuple(found)


def backend_names() -> tuple[str, ...]:
    """Every name :func:`make_image_encoder` accepts besides ``auto``."""
    return tuple(_all_backends())


def cached_choice(bundle, *, threads: int | None = None) -> str | None:
    """The backend ``auto`` would take for ``bundle`` from its cached verdict (no measuring, no torch
    import), None when the verdict is missing or stale."""
    if needs_measuring(bundle, threads=threads):
        return None
    return pick(_read_verdict(*_verdict_of(bundle, threads)).values())


def needs_measuring(bundle, *, threads: int | None = None) -> bool:
    """Whether ``make_image_encoder(bundle, "auto")`` will measure (seconds to a minute) first."""
    known = _read_verdict(*_verdict_of(bundle, threads))
    return any(name not in known for name in ["torch-fp32", *default_candidates(bundle)])


def describe_error(e: Exception) -> str:
    """``Type: first line of the message``, short enough for a report."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")
