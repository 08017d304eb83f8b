"""Which torch-free text encoder and which BPE a query process should use, as whole processes.

    python benchmarks/text_encoders.py [--runs 9] [--work DIR]

A query process encodes one short text once, so what it pays is mostly start-up: imports, loading
weights or a session, building the BPE. Each variant is a fresh ``python -c`` process doing only
that step on a ViT-B/32 text tower with random weights (``benchmarks/backends.py``), timed from the
parent (wall and CPU of the child), runs interleaved:

- ``BPE: tokenizers (Rust)``: :class:`clipsearch.tokenizer.Tokenizer` built from OpenAI's merges,
  one text tokenised;
- ``BPE: table``: :class:`clipsearch.tokenizer_table.TableTokenizer` on the exported table, the same text;
- ``tower: numpy``: :class:`clipsearch.fastquery.NumpyTextTower` on the exported weights, one text;
- ``tower: ONNX Runtime``: the same tower exported to ONNX (weights in a side file, memory-mapped),
  a one-thread quick-start session, one text (what clipsearch ran before the numpy tower);
- ``floor``: ``import numpy``, which every variant pays.

The issue's rule: keep a second implementation only where it saves more than 0.1 s per query.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import machine, random_model_dir, set_home  # noqa: E402  (the sibling benchmark)
from query_latency import timed  # noqa: E402

TEXT = "a photo of a dog running on the beach at sunset"


def setup(work: Path) -> tuple[Path, Path]:
    """The model's torch-free export, and its text tower as ONNX (made once)."""
    import torch

    from clipsearch import fastquery
    from clipsearch.backends import export_onnx
    from clipsearch.checkpoints import load_bundle

    bundle = load_bundle(random_model_dir(work))
    fastquery.ensure_text_encoder(bundle)
    directory = fastquery.cache_dir(bundle.model_id)
    onnx = work / "text-tower" / "text.onnx"
    if not onnx.is_file():
        import onnx as onnx_lib

        onnx.parent.mkdir(parents=True, exist_ok=True)

        class TextTower(torch.nn.Module):  # encode_text on tokens already cut, free length
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, tokens):
                self.model._eot_cut = False
                return self.model.encode_text(tokens)

        single = onnx.with_name("single.onnx")
        tokens = torch.tensor([[49406, 320, 1929, 49407]] * 2)
        axes = {"tokens": {0: "batch", 1: "length"}, "features": {0: "batch"}}
        export_onnx(TextTower(bundle.model.float()).eval(), (tokens,), single, ["tokens"], ["features"], axes)
        graph = onnx_lib.load(str(single))
        onnx_lib.save_model(
            graph, str(onnx), save_as_external_data=True, location=onnx.name + ".data", size_threshold=0
        )
        single.unlink()
    return directory, onnx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    args = ap.parse_args(argv)
    set_home(args.work)
    directory, onnx = setup(args.work)
    tokens = "np.array([[49406, 320, 1125, 539, 320, 1929, 2761, 525, 518, 2117, 536, 3424, 49407]])"
    variants = {
        "BPE: tokenizers (Rust)": f"from clipsearch.tokenizer import Tokenizer; Tokenizer().rows([{TEXT!r}])",
        "BPE: table": (
            "from clipsearch.tokenizer_table import TableTokenizer; "
            f"TableTokenizer({str(directory / 'tokenizer.sqlite')!r}).rows([{TEXT!r}])"
        ),
        "tower: numpy": (
            "import json, numpy as np; from clipsearch.fastquery import NumpyTextTower; "
            f"meta = json.load(open({str(directory / 'text.json')!r})); "
            f"NumpyTextTower({str(directory)!r}, meta['numpy'])({tokens})"
        ),
        "tower: ONNX Runtime": (
            "import numpy as np; from clipsearch.backends import ort_session; "
            f"s = ort_session({str(onnx)!r}, threads=1, quick_start=True); "
            f"s.run(None, {{'tokens': {tokens}}})"
        ),
        "floor: import numpy": "import numpy",
    }
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # as `clipsearch query` sets it
    for code in variants.values():  # warm the page cache; a failing variant stops here
        out = subprocess.run(
            [sys.executable, "-c", code + "; print(1)"], env=env, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    load = os.getloadavg()
    for _ in range(args.runs):
        for name, code in variants.items():
            times[name].append(timed([sys.executable, "-c", code + "; print(1)"], env))
    print(f"# one fresh process per run, {args.runs} runs interleaved; {time.strftime('%Y-%m-%d')}")
    print(f"# {machine()}")
    print(f"# load average at the start {load[0]:.2f}, at the end {os.getloadavg()[0]:.2f}")
    print("| variant | wall median s | wall min s | CPU median s | CPU min s |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        walls, cpus = [w for w, _ in ts], [c for _, c in ts]
        print(
            f"| {name} | {statistics.median(walls):.3f} | {min(walls):.3f} | "
            f"{statistics.median(cpus):.3f} | {min(cpus):.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
