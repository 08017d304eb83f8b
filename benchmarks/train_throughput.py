"""Training throughput and final zero-shot accuracy: clipsearch-train vs an OpenCLIP training loop.

``open_clip_train`` (OpenCLIP's trainer package) is not installable here, so the reference is a loop
built from OpenCLIP's own parts exactly as its trainer wires them: ``open_clip.create_model_and_transforms``
with the same architecture JSON, its training transform and tokenizer, ``open_clip.ClipLoss``, AdamW with
its weight-decay exclusion rule, warm-up + cosine, and a torch DataLoader over the same CSV. Both run the
same steps on the same synthetic data, batch size, seed and thread count, alternating epoch by epoch
(ours stops with --max-steps and continues with --resume) so that load from other processes on the
machine hits both alike; samples/s is the median over steps (data loading included) after 3 warm-up steps. Zero-shot accuracy of both models is measured by the same
function below on the held-out folder-per-class set.

    python benchmarks/train_throughput.py --n 1200 --epochs 6 --threads 2
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MODEL = "demo-vit"
TEMPLATES = ["a {}", "a photo of a {}"]


def zeroshot_accuracy(encode_image, encode_text, tokenize, transform, zs_dir: Path) -> float:
    """Top-1 accuracy with class prompts averaged over TEMPLATES (same code for both models)."""
    from PIL import Image

    classes = sorted(d for d in zs_dir.iterdir() if d.is_dir())
    names = [d.name.replace("_", " ") for d in classes]
    with torch.no_grad():
        weights = []
        for name in names:
            t = F.normalize(encode_text(tokenize([tpl.format(name) for tpl in TEMPLATES])).float(), dim=-1)
            weights.append(F.normalize(t.mean(0), dim=-1))
        classifier = torch.stack(weights, dim=1)  # [D, C]
        correct = total = 0
        for label, d in enumerate(classes):
            images = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(d.glob("*.png"))])
            pred = (F.normalize(encode_image(images).float(), dim=-1) @ classifier).argmax(1)
            correct += (pred == label).sum().item()
            total += len(images)
    return correct / total


def run_ours(data, out: Path, epochs: int, batch: int, lr: float, seed: int):
    """A generator: trains one more epoch per ``next()`` (stopping with --max-steps, then --resume)."""
    from clipsearch.checkpoints import load_bundle
    from clipsearch.transform import image_transform
    from trainer import train

    n_train = sum(1 for _ in open(data.train_csv, encoding="utf-8")) - 1
    per_epoch = n_train // batch
    argv = ["--train-data", str(data.train_csv), "--model", MODEL, "--batch-size", str(batch),
            "--epochs", str(epochs), "--lr", str(lr), "--wd", "0.1", "--warmup", "20", "--seed", str(seed),
            "--output", str(out), "--zeroshot-frequency", "0", "--device", "cpu"]  # fmt: skip
    wall = 0.0
    for e in range(epochs):
        t0 = time.perf_counter()
        resume = ["--resume", "latest"] if e else []
        model_dir = train.run(
            train.build_parser().parse_args(argv + ["--max-steps", str((e + 1) * per_epoch)] + resume)
        )
        wall += time.perf_counter() - t0
        yield
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][3:]
    b = load_bundle(str(model_dir))
    b.model.eval()
    acc = zeroshot_accuracy(
        b.model.encode_image,
        b.model.encode_text,
        b.tokenizer,
        image_transform(b.preprocess_cfg),
        data.zeroshot_dir,
    )
    yield {"samples_per_s": statistics.median(rates), "wall_s": wall, "zeroshot_top1": acc,
           "final_loss": rows[-1]["loss"], "steps": rows[-1]["step"]}  # fmt: skip


def run_open_clip(data, epochs: int, batch: int, lr: float, seed: int) -> dict:
    import open_clip
    from PIL import Image

    from clipsearch.configs import get_config

    cfg_dir = Path(tempfile.mkdtemp())
    (cfg_dir / f"oc-{MODEL}.json").write_text(json.dumps(get_config(MODEL)))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(seed)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(f"oc-{MODEL}")
    tokenizer = open_clip.get_tokenizer(f"oc-{MODEL}")

    root = data.train_csv.parent
    with open(data.train_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    class CsvDataset(torch.utils.data.Dataset):  # open_clip_train.data.CsvDataset, in substance
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            image = preprocess_train(Image.open(root / rows[i]["filepath"]))
            return image, tokenizer([rows[i]["title"]])[0]

    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        CsvDataset(), batch_size=batch, shuffle=True, drop_last=True, generator=g
    )
    # open_clip_train.main: exclude = ndim < 2 or bn/ln/bias/logit_scale in the name.
    excl = [
        p
        for n, p in model.named_parameters()
        if p.ndim < 2 or any(s in n for s in ("bn", "ln", "bias", "logit_scale"))
    ]
    rest = [
        p
        for n, p in model.named_parameters()
        if not (p.ndim < 2 or any(s in n for s in ("bn", "ln", "bias", "logit_scale")))
    ]
    opt = torch.optim.AdamW([{"params": excl, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.1}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)  # fmt: skip
    total = len(loader) * epochs
    loss_fn = open_clip.ClipLoss()
    rates, step, wall = [], 0, 0.0
    model.train()
    for _ in range(epochs):
        yield
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                images, texts = next(it)
            except StopIteration:
                break
            e, es = step - 20, total - 20
            lr_now = lr * (step + 1) / 20 if step < 20 else 0.5 * (1 + math.cos(math.pi * e / es)) * lr
            for group in opt.param_groups:
                group["lr"] = lr_now
            opt.zero_grad()
            img, txt, scale = model(images, texts)
            loss = loss_fn(img, txt, scale)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            rates.append(len(images) / (time.perf_counter() - t0))
            wall += time.perf_counter() - t0
            step += 1
    model.eval()
    acc = zeroshot_accuracy(
        model.encode_image, model.encode_text, tokenizer, preprocess_val, data.zeroshot_dir
    )
    yield {"samples_per_s": statistics.median(rates[3:]), "wall_s": wall, "zeroshot_top1": acc,
            "final_loss": loss.item(), "steps": step}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1200)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from trainer.synthetic import classnames, generate

    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "data", n=args.n, seed=args.seed)
        ours = run_ours(data, Path(tmp) / "ours", args.epochs, args.batch_size, args.lr, args.seed)
        ref = run_open_clip(data, args.epochs, args.batch_size, args.lr, args.seed)
        next(ref)  # build the reference model before timing starts
        # Alternate epochs of the two trainers, so that load from other processes hits both alike.
        for _ in range(args.epochs):
            next(ours)
            loads.append(os.getloadavg()[0])
            ref_result = next(ref)  # the last epoch also evaluates and returns the metrics
            loads.append(os.getloadavg()[0])
        ours, ref = next(ours), ref_result
    # Other processes on the machine skew a sequential comparison: report the 1-minute load average.
    print(f"1-minute load average after each epoch: {' '.join(f'{x:.1f}' for x in loads)}")
    print(f"{MODEL}, {args.n} synthetic images, {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.threads} threads, chance {1 / len(classnames()):.3f}")  # fmt: skip
    print("| trainer | samples/s (median) | final loss | zero-shot top-1 |")
    print("|---|---|---|---|")
    for name, r in (("clipsearch-train", ours), ("open_clip loop", ref)):
        print(f"| {name} | {r['samples_per_s']:.0f} | {r['final_loss']:.3f} | {r['zeroshot_top1']:.3f} |")


if __name__ == "__main__":
    main()
