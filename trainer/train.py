"""``clipsearch-train train``: CLIP contrastive training, one CPU to many GPUs (torchrun).

``main(argv)`` takes an argument list (flags as OpenCLIP's trainer where they mean the same) so tests
can drive it. The loop: a seeded, resumable data order; the symmetric CLIP loss over the global batch
(features gathered across ranks); optional gradient accumulation that keeps the whole contrastive
batch; AdamW with warm-up + cosine; NaN/inf steps skipped; atomic checkpoints; a clipsearch model dir
at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from clipsearch.atomic import write_text
from clipsearch.errors import ClipsearchError
from clipsearch.loss import ClipLoss
from trainer import checkpointing
from trainer.distributed import DistEnv, all_reduce_sum, barrier, init_distributed, shutdown
from trainer.optim import cosine_lr, make_optimizer, set_lr
from trainer.placement import Placement, check_precision


class TrainError(ClipsearchError):
    """Training cannot start with the given options (the message says which to change)."""


def build_parser():
    """The argparse parser of ``train`` (see :mod:`trainer.options`)."""
    from trainer.options import build_parser

    return build_parser()


# ---------------------------------------------------------------------------------------------------
# Set-up


def _build(args, env: DistEnv, train_captions):
    """``(model, preprocess_cfg, tokenizer)`` from --pretrained or a fresh --model config."""
    from clipsearch.configs import get_config
    from clipsearch.model import build_model
    from clipsearch.tokenizer import Tokenizer
    from clipsearch.transform import PreprocessConfig

    if args.pretrained:
        from clipsearch.checkpoints import load_bundle

        bundle = load_bundle(args.pretrained)
        if args.train_tokenizer:
            raise TrainError("--train-tokenizer needs a model trained from scratch; drop --pretrained")
        return bundle.model.float(), bundle.preprocess_cfg, bundle.tokenizer, bundle.config
    cfg = json.loads(json.dumps(get_config(args.model)))  # a private copy
    if getattr(args, "force_quick_gelu", False):
        cfg["quick_gelu"] = True
    context_length = cfg["text_cfg"].get("context_length", 77)
    if args.train_tokenizer:
        from clipsearch.tokenizer import train_bpe

        try:
            tokenizer = train_bpe(train_captions(), args.train_tokenizer, context_length=context_length)
        except ValueError as e:
            raise TrainError(f"--train-tokenizer: {e}") from e
        cfg["text_cfg"]["vocab_size"] = tokenizer.vocab_size
    else:
        tokenizer = Tokenizer(context_length=context_length)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(cfg)
    pp = dict(cfg.get("preprocess_cfg") or {})
    pp.setdefault("image_size", cfg["vision_cfg"]["image_size"])
    preprocess_cfg = PreprocessConfig.from_dict(pp)
    return model, preprocess_cfg, tokenizer, cfg


def _captions_reader(args):
    def read():
        from trainer.data import detect_type, read_csv, read_folder, read_jsonl, readable_caption

        kind = detect_type(args.train_data) if args.dataset_type == "auto" else args.dataset_type
        if kind == "csv":
            pairs = read_csv(args.train_data, args.csv_img_key, args.csv_caption_key, args.csv_separator)
        elif kind == "jsonl":
            pairs = read_jsonl(args.train_data, args.csv_img_key, args.csv_caption_key)
        elif kind == "folder":
            pairs = read_folder(args.train_data)
        else:
            raise TrainError("--train-tokenizer reads captions from csv, jsonl or folder data only")
        return [c for _, c in pairs if readable_caption(c)]  # the samples training will skip are left out

    return read


# ---------------------------------------------------------------------------------------------------
# One optimisation step


class Stepper:
    """Forward, loss and backward of one optimiser step over ``accum_freq`` micro-batches."""

    def __init__(self, model, loss_fn, placement: Placement, accum_freq: int):
        self.model, self.loss_fn, self.placement = model, loss_fn, placement
        self.autocast = placement.autocast
        self.accum_freq = accum_freq

    def _inputs(self, batch):
        return self.placement.put_images(batch.images), self.placement.put_tokens(batch.texts)

    def loss_and_backward(self, batches, backward) -> torch.Tensor:
        """Returns the loss (detached); calls ``backward(loss)`` for each graph to differentiate.

        With one micro-batch this is the plain step. With k micro-batches (OpenCLIP's --accum-freq):
        a first pass without gradients caches every micro-batch's features; then each micro-batch is
        recomputed with gradients and scored against the cached features of the others, so the loss
        always sees the full batch and the summed gradients equal the full batch's gradient. The
        temperature is live only in the last pass (detached before) so that its gradient is counted
        once, not k times.
        """
        if len(batches) == 1:
            images, texts = self._inputs(batches[0])
            with self.autocast():
                img, txt, scale = self.model(images, texts)
                loss = self.loss_fn(img, txt, scale)
            backward(loss)
            return loss.detach()
        inputs = [self._inputs(b) for b in batches]
        with torch.no_grad(), self.autocast():
            cached = [self.model(im, tx)[:2] for im, tx in inputs]
            cached_img = [c[0] for c in cached]
            cached_txt = [c[1] for c in cached]
        total = None
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        for j, (im, tx) in enumerate(inputs):
            last = j == len(inputs) - 1
            sync = contextlib.nullcontext() if (last or not ddp) else self.model.no_sync()
            with sync:
                with self.autocast():
                    img, txt, scale = self.model(im, tx)
                    all_img = torch.cat(cached_img[:j] + [img] + cached_img[j + 1 :])
                    all_txt = torch.cat(cached_txt[:j] + [txt] + cached_txt[j + 1 :])
                    loss = self.loss_fn(all_img, all_txt, scale if last else scale.detach())
                backward(loss)
            total = loss.detach()
        return total


# ---------------------------------------------------------------------------------------------------


class NullReporter:
    """What the loop tells its observer; the CLI passes a rich progress display instead."""

    def start(self, total_steps: int, start_step: int) -> None: ...
    def step(self, metrics: dict) -> None: ...
    def eval(self, metrics: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


def run(args, reporter=None) -> Path | None:
    """Train as ``args`` say; returns the final model directory on rank 0 (None on other ranks)."""
    from trainer import evaluate, plots
    from trainer.data import make_loader

    reporter = reporter or NullReporter()
    check_numbers(args)
    env = init_distributed(args.device)
    try:
        check_precision(args.precision, env.device)
        placement = Placement(env.device, args.precision)
        out = Path(args.output)
        ckpt_dir = out / "checkpoints"
        # Refused now; the old run is removed (--overwrite) and args.json written only once the set-up
        # below holds: a wrong --model, data or checkpoint leaves --output as it was.
        claim_output(out, resume=bool(args.resume), overwrite=args.overwrite, main=False)

        model, preprocess_cfg, tokenizer, model_cfg = _build(args, env, _captions_reader(args))
        from clipsearch.transform import image_transform

        data = make_loader(
            args.train_data,
            dataset_type=args.dataset_type,
            transform=image_transform(preprocess_cfg, train=True),
            tokenizer=tokenizer,
            batch_size=args.batch_size,
            seed=args.seed,
            rank=env.rank,
            world_size=env.world_size,
            workers=args.workers,
            img_key=args.csv_img_key,
            caption_key=args.csv_caption_key,
            separator=args.csv_separator,
            num_samples=args.train_num_samples,
            shuffle_buffer=args.shuffle_buffer,
            resampled=args.dataset_resampled,
        )
        steps_per_epoch = data.batches_per_epoch // args.accum_freq
        if steps_per_epoch == 0:
            raise TrainError("fewer batches per epoch than --accum-freq; lower --batch-size or --accum-freq")
        total_steps = steps_per_epoch * args.epochs

        if env.is_main:  # a wrong evaluation set fails now, not after the first epoch
            evaluate.read_eval_sets(
                args.zeroshot_data if args.zeroshot_frequency else None,
                args.val_data if args.val_frequency else None,
                img_key=args.csv_img_key,
                caption_key=args.csv_caption_key,
                separator=args.csv_separator,
                classnames=args.zeroshot_classnames,
                templates=args.zeroshot_templates,
            )

        if args.lock_image:
            model.lock_image_tower(args.lock_image_unlocked_groups, args.lock_image_freeze_bn_stats)
        if args.lock_text:
            lock_text_tower(model, args.lock_text_unlocked_layers)
        if args.grad_checkpointing:
            model.set_grad_checkpointing()
        placement.put_model(model)
        raw_model = model
        optimizer = make_optimizer(raw_model, args.lr, args.wd, args.beta1, args.beta2, args.eps)
        scaler = torch.amp.GradScaler(env.device.type) if placement.needs_loss_scaler else None

        step, epoch, pos = 0, 0, 0  # global step, epoch, batches of the epoch consumed
        counts = Counter()
        if args.resume:
            stem, weights, state, bad = checkpointing.resume_from(args.resume, ckpt_dir)
            counts["checkpoints_unreadable"] += len(bad)
            for b in bad:
                reporter.message(f"skipped unreadable checkpoint {b.name}")
            try:
                raw_model.load_state_dict(weights)
                optimizer.load_state_dict(state["optimizer"])
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
                step, epoch, pos = state["step"], state["epoch"], state["batch_in_epoch"]
                counts.update(state.get("counts", {}))
                torch.set_rng_state(state["rng_cpu"])
            except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
                raise TrainError(
                    f"checkpoint {stem} does not fit this run ({_first_line(e)}); resume with the --model "
                    "and flags it was written with"
                ) from e
            if env.device.type == "cuda" and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], env.device)
            if env.is_main:
                _truncate_metrics(out / "metrics.jsonl", step)
                reporter.message(f"resumed from {stem.name}: step {step}, epoch {epoch}, batch {pos}")

        claim_output(out, resume=bool(args.resume), overwrite=args.overwrite, main=env.is_main)
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / "args.json", json.dumps(vars(args), indent=2, default=str))
        barrier(env)

        fwd_model = model
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            fwd_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=ids, static_graph=args.ddp_static_graph
            )
        if args.torchcompile:
            fwd_model = torch.compile(fwd_model)
        loss_fn = ClipLoss(args.local_loss, args.gather_with_grad, env.rank, env.world_size)
        stepper = Stepper(fwd_model, loss_fn, placement, args.accum_freq)
        logger = _MetricsLog(out, env.is_main, "tensorboard" in args.report_to)

        def backward(loss):
            (scaler.scale(loss) if scaler is not None else loss).backward()

        def save_checkpoint():
            if env.is_main:
                state = {
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": pos,
                    "counts": dict(counts),
                    "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None,
                }
                checkpointing.save(ckpt_dir, step, raw_model.state_dict(), state, keep=args.keep_checkpoints)
            barrier(env)

        reporter.start(total_steps, step)
        first_step, trained_steps = step, 0
        stop = args.max_steps if args.max_steps is not None else total_steps
        fwd_model.train()
        while epoch < args.epochs and step < stop:
            data.set_epoch(epoch, pos)
            it = iter(data.loader)
            if data.skip_in_loader:
                for _ in range(pos):
                    next(it)
            while pos + args.accum_freq <= data.batches_per_epoch and step < stop:
                t0 = time.perf_counter()
                batches = [next(it) for _ in range(args.accum_freq)]
                pos += args.accum_freq
                n_samples = sum(len(b) for b in batches)
                for b in batches:
                    counts.update({f"skipped_{k}": v for k, v in b.skipped.items()})
                batches = _equalise(batches, env)
                lr = cosine_lr(step, args.lr, args.warmup, total_steps)
                set_lr(optimizer, lr)
                optimizer.zero_grad(set_to_none=True)
                if batches is None:  # a micro-batch lost all (or all but one) of its samples
                    counts["skipped_steps_empty"] += 1
                    step += 1
                    continue
                trained_steps += 1
                loss = stepper.loss_and_backward(batches, backward)
                finite = all_reduce_sum(float(torch.isfinite(loss).item()), env) == env.world_size
                if not finite:
                    counts["nan_steps_skipped"] += 1
                    optimizer.zero_grad(set_to_none=True)
                    reporter.message(f"step {step}: non-finite loss {loss.item()}, step skipped")
                else:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if args.grad_clip_norm is not None:
                        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip_norm)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    with torch.no_grad():
                        raw_model.logit_scale.clamp_(0, math.log(100))
                step += 1
                dt = time.perf_counter() - t0
                if env.is_main and (step % args.log_every_n_steps == 0 or step == stop):
                    m = {
                        "step": step,
                        "epoch": epoch + pos / data.batches_per_epoch,
                        "loss": loss.item(),
                        "lr": lr,
                        "temperature": raw_model.logit_scale.exp().item(),
                        "samples_per_s": n_samples * env.world_size / max(dt, 1e-9),
                        **counts,
                    }
                    logger.write(m)
                    reporter.step({**m, "total_steps": total_steps})
                if args.save_every_n_steps and step % args.save_every_n_steps == 0:
                    save_checkpoint()
            if pos + args.accum_freq > data.batches_per_epoch:  # the epoch is complete
                epoch, pos = epoch + 1, 0
                if epoch == args.epochs or (args.save_frequency and epoch % args.save_frequency == 0):
                    save_checkpoint()
                zs_due = _due(epoch, args.zeroshot_frequency, args.epochs)
                val_due = _due(epoch, args.val_frequency, args.epochs)
                if env.is_main and (zs_due or val_due):
                    fwd_model.eval()
                    m = evaluate.during_training(
                        raw_model,
                        tokenizer,
                        preprocess_cfg,
                        args.zeroshot_data if zs_due else None,
                        args.val_data if val_due else None,
                        img_key=args.csv_img_key,
                        caption_key=args.csv_caption_key,
                        separator=args.csv_separator,
                        classnames=args.zeroshot_classnames,
                        templates=args.zeroshot_templates,
                    )
                    fwd_model.train()
                    if m:
                        m = {"step": step, "epoch": epoch, **m}
                        logger.write(m)
                        reporter.eval(m)
                barrier(env)
        if step >= stop and pos:
            save_checkpoint()  # an interrupted epoch (--max-steps) can be resumed
        skipped = {k.removeprefix("skipped_"): v for k, v in counts.items() if k.startswith("skipped_")}
        skipped.pop("steps_empty", None)
        if step > first_step and not trained_steps:
            raise TrainError(
                f"no sample of --train-data could be read ({_count_text(skipped)}); check its image paths"
            )
        if skipped:
            reporter.message(
                f"skipped {sum(skipped.values())} samples that could not be read ({_count_text(skipped)}); "
                "per step in metrics.jsonl"
            )
        final = None
        if env.is_main:
            from clipsearch.checkpoints import save_model

            final = out / "model"
            save_model(final, raw_model.float(), preprocess_cfg, tokenizer)
            logger.close()
            plots.plot_metrics(out / "metrics.jsonl", out / "curves.png")
        return final
    except OSError as e:  # --output cannot be written: read-only, a full disk
        from trainer.checkpointing import kept_note

        kept = kept_note(Path(args.output) / "checkpoints")
        raise TrainError(f"cannot write {e.filename or args.output}: {e.strerror or e}; {kept}") from e
    finally:
        reporter.close()  # the progress display lets go of the terminal whatever ended the run
        shutdown(env)


def _first_line(e: Exception, limit: int = 160) -> str:
    """The informative line of an exception (torch's load_state_dict puts a heading first)."""
    if isinstance(e, KeyError):
        return f"it lacks {e}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _count_text(counts: dict) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "none skipped"


def check_numbers(args) -> None:
    """Refuse a flag value that would crash the run later or silently train nothing (``--batch-size 1``:
    a contrastive step needs a negative, so every step would be skipped). OpenCLIP's meanings: 0 means
    never for the frequencies (``--save-frequency 0``: a checkpoint only at the end)."""
    minimum = {
        "--batch-size": (args.batch_size, 2),
        "--accum-freq": (args.accum_freq, 1),
        "--epochs": (args.epochs, 1),
        "--max-steps": (args.max_steps, 1),
        "--train-num-samples": (args.train_num_samples, 1),
        "--lock-image-unlocked-groups": (args.lock_image_unlocked_groups, 0),
        "--lock-text-unlocked-layers": (args.lock_text_unlocked_layers, 0),
        "--log-every-n-steps": (args.log_every_n_steps, 1),
        "--save-frequency": (args.save_frequency, 0),
        "--save-every-n-steps": (args.save_every_n_steps, 0),
        "--keep-checkpoints": (args.keep_checkpoints, 0),
        "--workers": (args.workers, 0),
        "--warmup": (args.warmup, 0),
        "--lr": (args.lr, 0),
        "--wd": (args.wd, 0),
        "--eps": (args.eps, 0),
    }
    for flag, (value, low) in minimum.items():
        if value is not None and value < low:
            raise TrainError(f"{flag} must be at least {low}, got {value}")
    if args.grad_clip_norm is not None and not args.grad_clip_norm > 0:  # negative: gradient ascent
        raise TrainError(f"--grad-clip-norm must be above 0, got {args.grad_clip_norm}")
    for flag, value in (("--beta1", args.beta1), ("--beta2", args.beta2)):
        if value is not None and not 0 <= value < 1:
            raise TrainError(f"{flag} must be in [0, 1), got {value}")


RUN_OUTPUTS = ("args.json", "metrics.jsonl", "curves.png", "checkpoints", "model", "tensorboard")


def claim_output(out: Path, *, resume: bool, overwrite: bool, main: bool = True) -> None:
    """Refuse an ``--output`` that holds another run, unless resuming it or told to overwrite it.

    ``--overwrite`` removes only the files a run writes (:data:`RUN_OUTPUTS`), nothing else there.
    """
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise TrainError(f"--output {out}: {folder} is a file, not a folder")
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise TrainError(
            f"{out} already holds a training run ({', '.join(found)}); continue it with --resume latest, "
            "replace it with --overwrite, or choose another --output"
        )
    if main:
        import shutil

        for name in found:
            p = out / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _equalise(batches, env: DistEnv):
    """Cut every micro-batch to the smallest size over ranks (skipped samples make sizes differ).

    Features are gathered across ranks, which needs equal shapes. None if a micro-batch has fewer than
    2 samples left somewhere: a contrastive step needs at least one negative.
    """
    from trainer.data import Batch

    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    if env.distributed:
        import torch.distributed as dist

        t = -sizes
        if env.backend == "nccl":
            t = t.to(env.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # max of the negatives: the min size
        sizes = -t.cpu()
    if sizes.min().item() < 2:
        return None
    return [
        Batch(b.images[: int(n)], b.texts[: int(n)], b.skipped)
        for b, n in zip(batches, sizes.tolist(), strict=True)
    ]


class _MetricsLog:
    """metrics.jsonl (one JSON object per line) and, optionally, TensorBoard; rank 0 only."""

    def __init__(self, out: Path, active: bool, tensorboard: bool):
        self.active = active
        self.path = out / "metrics.jsonl"
        self.tb = None
        if active and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise TrainError("--report-to tensorboard needs `pip install tensorboard`") from e
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, metrics: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the metric lines written after the checkpoint being resumed (they will be redone)."""
    from trainer.plots import read_metrics

    if not path.exists():
        return
    keep = [row for row in read_metrics(path) if row.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


def _due(epoch: int, every: int, last: int) -> bool:
    """Whether an evaluation run every ``every`` epochs (0: never) is due after ``epoch`` (1-based)."""
    return bool(every) and (epoch % every == 0 or epoch == last)


def lock_text_tower(model, unlocked_layers: int = 0) -> None:
    """Freeze the text tower (OpenCLIP's --lock-text): everything but the image tower and temperature.

    ``unlocked_layers`` (OpenCLIP's --lock-text-unlocked-layers) leaves the last N of OpenCLIP's groups
    trainable, counted from the output: the projection; the last block with the final LayerNorm; then
    one block each; then the token and position embeddings.
    """
    if unlocked_layers < 0:
        raise TrainError(f"--lock-text-unlocked-layers must be >= 0, got {unlocked_layers}")
    for name, p in model.named_parameters():
        if not name.startswith("visual.") and name != "logit_scale":
            p.requires_grad_(False)
    blocks = list(model.transformer.resblocks)
    groups = [
        [model.token_embedding, model.positional_embedding],
        *[[b] for b in blocks[:-1]],
        [blocks[-1], model.ln_final],
        [model.text_projection],
    ]
    for group in groups[len(groups) - unlocked_layers :] if unlocked_layers else []:
        for item in group:
            for p in [item] if isinstance(item, torch.nn.Parameter) else item.parameters():
                p.requires_grad_(True)


def main(argv: list[str] | None = None, reporter=None) -> int:
    """Parse ``argv`` and train; returns the exit code. Errors the user can fix raise ClipsearchError."""
    from trainer.options import parse

    args = parse(list(sys.argv[1:] if argv is None else argv))
    run(args, reporter)
    return 0
