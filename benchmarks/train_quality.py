"""clipsearch-train against OpenCLIP's own trainer (``open_clip_train.main``) on a real image-caption set.

The set is the emoji of ``benchmarks/real_data.py emoji`` (Unicode names as captions; apple, google and
facebook images train, twitter's are held out). For each seed both trainers run at the same time, one
thread each, as subprocesses with the same architecture JSON (``--model``), flags and data, so that the
machine's load hits both alike. Then one function (``trainer.evaluate``) scores both final models with
the same preprocessing:

- ``names_top1``: zero-shot classification of each held-out image among all emoji names (prompt "{}"),
- ``category_top1``: zero-shot over the 9 Unicode categories (prompts "an emoji of {}" and "{}"),
- ``i2t_R@1`` / ``t2i_R@1``: retrieval over the held-out (image, name) pairs,
- ``samples/s``: median over logged steps of each trainer's own per-step figure (data loading included).

    python benchmarks/real_data.py emoji /tmp/emo /tmp/emoji-set
    python benchmarks/train_quality.py /tmp/emoji-set --seeds 0 1 2 --epochs 4 --concurrent 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OPEN_CLIP_MAIN = """
import sys, open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""


def common_flags(args, seed: int) -> list[str]:
    """The flags both trainers read the same way (OpenCLIP's names)."""
    return [
        "--train-data", "train.csv", "--model", args.model, "--batch-size", str(args.batch_size),
        "--epochs", str(args.epochs), "--lr", str(args.lr), "--wd", str(args.wd),
        "--warmup", str(args.warmup), "--seed", str(seed), "--workers", str(getattr(args, "workers", 1)),
        "--precision", "fp32", "--csv-img-key", "filepath", "--csv-caption-key", "title",
    ]  # fmt: skip


def start_ours(args, seed: int, out: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "trainer.cli", *common_flags(args, seed), "--output", str(out / "ours"),
            "--zeroshot-frequency", "0", "--device", "cpu", "--log-every-n-steps", _log_every(args)]  # fmt: skip
    return _start(argv, args.data, out / "ours.log", getattr(args, "threads", 1))


def start_open_clip(args, seed: int, out: Path, cfg_dir: Path) -> subprocess.Popen:
    argv = [sys.executable, "-c", OPEN_CLIP_MAIN, str(cfg_dir), *common_flags(args, seed),
            "--dataset-type", "csv", "--csv-separator", ",", "--logs", str(out), "--name", "openclip",
            "--save-frequency", str(args.epochs), "--zeroshot-frequency", "0",
            "--log-every-n-steps", _log_every(args), "--report-to", ""]  # fmt: skip
    return _start(argv, args.data, out / "openclip.log", getattr(args, "threads", 1))


def _log_every(args) -> str:
    return str(getattr(args, "log_every_n_steps", 10))


def _start(argv, cwd: Path, log: Path, threads: int) -> subprocess.Popen:
    n = str(threads)
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def rates_ours(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "ours" / "metrics.jsonl").read_text().splitlines() if x]
    return [r["samples_per_s"] for r in rows if "samples_per_s" in r]


def rates_open_clip(out: Path) -> list[float]:
    text = (out / "openclip" / "out.log").read_text()
    return [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", text)]


def load_open_clip(args, out: Path, cfg_dir: Path):
    import open_clip

    open_clip.add_model_config(cfg_dir)
    model = open_clip.create_model(args.model)
    ckpt = torch.load(out / "openclip" / "checkpoints" / f"epoch_{args.epochs}.pt", weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), open_clip.get_tokenizer(args.model)


class EncodedOnce:
    """``trainer.evaluate.image_features`` that encodes each image file once (by its real path): the
    three scores below read the same held-out images (``zeroshot/`` holds links to them)."""

    def __init__(self):
        self._rows: dict[Path, torch.Tensor | None] = {}  # None: unreadable

    def __call__(self, model, preprocess_cfg, paths):
        from collections import Counter

        from trainer import evaluate
        from trainer.data import DataError

        real = [Path(p).resolve() for p in paths]
        new = list(dict.fromkeys(p for p in real if p not in self._rows))
        if new:
            feats, kept, _ = evaluate.image_features(model, preprocess_cfg, new)  # [K, D]
            self._rows.update(dict.fromkeys(new))
            self._rows.update((new[i], f) for i, f in zip(kept, feats, strict=True))
        kept = [i for i, p in enumerate(real) if self._rows[p] is not None]
        if not kept:
            raise DataError("none of the evaluation images could be read")
        skipped = Counter({"unreadable": len(real) - len(kept)} if len(kept) < len(real) else {})
        return torch.stack([self._rows[real[i]] for i in kept]), kept, skipped


def score(model, tokenizer, preprocess_cfg, data: Path) -> dict:
    """The same evaluation code for both trainers' models; each held-out image is encoded once."""
    from trainer import evaluate
    from trainer.data import read_csv

    names = evaluate.read_class_csv(data / "val.csv", "filepath", "title")
    cats = evaluate.read_class_folders(data / "zeroshot")
    once = EncodedOnce()
    n = evaluate.zeroshot(model, tokenizer, preprocess_cfg, names, templates=["{}"], encode_images=once)
    c = evaluate.zeroshot(model, tokenizer, preprocess_cfg, cats, encode_images=once)
    r = evaluate.retrieval(model, tokenizer, preprocess_cfg, read_csv(data / "val.csv"), encode_images=once)
    return {
        "names_top1": n["zeroshot_top1"],
        "category_top1": c["zeroshot_top1"],
        "i2t_R@1": r["image_to_text_R@1"],
        "t2i_R@1": r["text_to_image_R@1"],
    }


def start_seed(args, seed: int, work: Path) -> tuple[Path, list[subprocess.Popen]]:
    """Start both trainers on ``seed``; returns the seed's folder and the two processes."""
    from clipsearch.configs import get_config

    out = work / f"seed{seed}"
    out.mkdir(parents=True)
    cfg_dir = work / "configs"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / f"{args.model}.json").write_text(json.dumps(get_config(args.model)))
    return out, [start_ours(args, seed, out), start_open_clip(args, seed, out, cfg_dir)]


def finish_seed(args, seed: int, work: Path, out: Path, procs) -> dict:
    """Wait for both trainers of ``seed``, then score both final models with the same code."""
    from clipsearch.checkpoints import load_bundle

    for p, log in zip(procs, ("ours.log", "openclip.log"), strict=True):
        if p.wait() != 0:
            raise SystemExit(f"seed {seed}: {log} failed:\n{(out / log).read_text()[-3000:]}")
    bundle = load_bundle(str(out / "ours" / "model"))
    oc_model, oc_tok = load_open_clip(args, out, work / "configs")
    return {
        "clipsearch-train": {
            **score(bundle.model.eval(), bundle.tokenizer, bundle.preprocess_cfg, args.data),
            "samples/s": statistics.median(rates_ours(out)[1:]),
        },
        "open_clip_train": {
            **score(oc_model, oc_tok, bundle.preprocess_cfg, args.data),
            "samples/s": statistics.median(rates_open_clip(out)[1:]),
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="the output of `benchmarks/real_data.py emoji`")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="demo-vit")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    p.add_argument(
        "--concurrent", type=int, default=1, help="seeds trained at the same time (2 processes each)"
    )
    args = p.parse_args()
    args.data = args.data.resolve()
    torch.set_num_threads(2)
    work = args.work or Path(tempfile.mkdtemp(prefix="train-quality-"))
    keys = ("names_top1", "category_top1", "i2t_R@1", "t2i_R@1", "samples/s")
    print(f"{args.model}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, wd {args.wd}, "
          f"warmup {args.warmup}, 1 thread each, {args.concurrent} seed(s) at a time, "
          f"load {os.getloadavg()[0]:.1f}; runs in {work}")  # fmt: skip
    print("| seed | trainer | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    results = []
    pending = list(args.seeds)
    while pending:
        group, pending = pending[: args.concurrent], pending[args.concurrent :]
        started = [(seed, *start_seed(args, seed, work)) for seed in group]
        for seed, out, procs in started:
            r = finish_seed(args, seed, work, out, procs)
            results.append(r)
            for name, m in r.items():
                print(f"| {seed} | {name} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |", flush=True)
    for name in results[0]:
        means = [statistics.mean(r[name][k] for r in results) for k in keys]
        print(f"| mean | {name} | " + " | ".join(f"{v:.3f}" for v in means) + " |")


if __name__ == "__main__":
    main()
