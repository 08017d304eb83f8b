"""How close the image forward pass runs to this CPU's own matrix-multiply rate, one core.

    python benchmarks/gemm_peak.py [--onnx IMAGE-INT8.onnx] [--images 16] [--rounds 10]

Builds one ``MatMul`` of ViT-B/32's MLP shape (``[65 * images, 768] x [768, 3072]``: 65 tokens per
image at 256 px) as an ONNX graph, quantises a copy the way the ``onnx-int8`` backend is made
(dynamic, per channel, 7-bit weights), and times both in ONNX Runtime on one thread: the rate this
core reaches in fp32 and in int8, in multiply-adds per second (median of ``--rounds``). With
``--onnx`` (a settled model's ``$CLIPSEARCH_HOME/backends/<model>/image-int8-mm-c1.onnx``) it also
times the whole image tower on the same thread and says what share of its matrix work's time at
the int8 rate that is: near 1, the forward pass is bound by the CPU's int8 arithmetic, and only a
CPU with int8 dot-product instructions (AVX512-VNNI / AVX-VNNI) or fewer multiply-adds make it faster.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

TOKENS, WIDTH, HIDDEN, LAYERS, PATCH = 65, 768, 3072, 12, 32  # ViT-B/32 at 256 px
OUT = 512


def vit_b32_macs(image_size: int = 256) -> int:
    """Multiply-adds of ViT-B/32's image tower per image (matrix products only; the last block
    computes the class token alone, as the exports do)."""
    tokens = (image_size // PATCH) ** 2 + 1
    patch = (image_size // PATCH) ** 2 * 3 * PATCH * PATCH * WIDTH
    block = lambda t_out, t_kv: (  # noqa: E731
        t_kv * WIDTH * 2 * WIDTH  # k, v
        + t_out * WIDTH * WIDTH  # q
        + 2 * t_out * t_kv * WIDTH  # scores and the weighted sum
        + t_out * WIDTH * WIDTH  # out projection
        + t_out * 2 * WIDTH * HIDDEN  # MLP
    )
    return patch + (LAYERS - 1) * block(tokens, tokens) + block(1, tokens) + WIDTH * OUT


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def median_seconds(run, rounds: int) -> float:
    for _ in range(2):
        run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_files(work: Path, m: int) -> tuple[Path, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import quantize_dynamic

    weight = np.random.default_rng(0).standard_normal((WIDTH, HIDDEN)).astype(np.float32) * 0.02
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, HIDDEN])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fp32, int8 = work / "matmul-fp32.onnx", work / "matmul-int8.onnx"
    onnx.save(model, str(fp32))
    quantize_dynamic(str(fp32), str(int8), per_channel=True, reduce_range=True)  # as backends._INT8_OPTIONS
    return fp32, int8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, help="a settled model's image-int8-mm-c1.onnx (ViT-B/32 at 256 px)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()

    flags = cpu_flags()
    vnni = sorted(f for f in flags if "vnni" in f)
    print(f"CPU: avx2={'avx2' in flags}, avx512f={'avx512f' in flags}, int8 dot products: {vnni or 'none'}")
    m = TOKENS * args.images
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for name, path in zip(("fp32", "int8"), matmul_files(Path(tmp), m), strict=True):
            s = session(path)
            x = rng.standard_normal((m, WIDTH)).astype(np.float32)
            seconds = median_seconds(lambda s=s, x=x: s.run(None, {"x": x}), args.rounds)
            rates[name] = m * WIDTH * HIDDEN / seconds
            print(
                f"MatMul [{m} x {WIDTH}] x [{WIDTH} x {HIDDEN}], {name}: {rates[name] / 1e9:.1f} GMAC/s (one thread)"
            )
    print(f"int8 / fp32: {rates['int8'] / rates['fp32']:.2f}x")
    if args.onnx:
        s = session(args.onnx)
        name = s.get_inputs()[0].name
        x = rng.random((args.images, 3, 256, 256), dtype=np.float32)
        per_image = median_seconds(lambda: s.run(None, {name: x}), max(3, args.rounds // 2)) / args.images
        bound = vit_b32_macs() / rates["int8"]
        print(
            f"image tower: {per_image * 1000:.1f} ms per image (one thread); its {vit_b32_macs() / 1e9:.2f} G "
            f"multiply-adds at the int8 MatMul rate: {bound * 1000:.1f} ms, i.e. {bound / per_image:.0%} of its time"
        )


if __name__ == "__main__":
    main()
