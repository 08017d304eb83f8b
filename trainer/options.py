"""The command line of ``clipsearch-train train``: flags, OpenCLIP's names for them, the paper's recipe.

Flags carry OpenCLIP's names where they mean the same thing. OpenCLIP flags with another spelling
here are accepted and translated (:data:`OPENCLIP_ALIASES`); those for features clipsearch-train does not
have are refused with the equivalent, before anything starts (:data:`OPENCLIP_REFUSED`).
``--recipe paper`` fills the optimisation flags from the CLIP paper's training tables for the
architecture (flags given explicitly still win).
"""

from __future__ import annotations

import argparse
import logging

from clipsearch.errors import ClipsearchError
from trainer.placement import PRECISIONS

log = logging.getLogger(__name__)


class OptionError(ClipsearchError):
    """A flag is not supported as given (the message names the equivalent)."""


# OpenCLIP flags that clipsearch-train refuses, with what to use instead. Every flag of OpenCLIP's
# parser is either accepted with its meaning or listed here (tests/test_trainer_options.py checks it
# against open_clip_train.params); "--flag=value" refuses one value of an accepted flag.
OPENCLIP_REFUSED = {
    "--horovod": "launch with torchrun (one process per GPU); clipsearch-train reads RANK/WORLD_SIZE",
    "--dist-url": "torchrun sets the rendezvous (MASTER_ADDR/MASTER_PORT)",
    "--dist-backend": "the backend follows the device: nccl on CUDA, gloo on the CPU",
    "--no-set-device-rank": "with one GPU visible per process, pass --device cuda:0",
    "--siglip": "only the CLIP softmax loss is implemented",
    "--loss-dist-impl": "the one distributed loss gathers features (--local-loss, --gather-with-grad)",
    "--coca-caption-loss-weight": "CoCa models are not supported",
    "--coca-contrastive-loss-weight": "CoCa models are not supported",
    "--distill-model": "distillation is not supported",
    "--distill-pretrained": "distillation is not supported",
    "--image-mean": "put mean/std in the model JSON's preprocess_cfg and pass its path as --model",
    "--image-std": "put mean/std in the model JSON's preprocess_cfg and pass its path as --model",
    "--image-interpolation": "put interpolation in the model JSON's preprocess_cfg (--model path.json)",
    "--image-resize-mode": "put resize_mode in the model JSON's preprocess_cfg (--model path.json)",
    "--force-image-size": "set vision_cfg.image_size in a model JSON and pass its path as --model",
    "--force-context-length": "set text_cfg.context_length in a model JSON and pass its path as --model",
    "--force-custom-text": "the text tower has one layout (OpenAI's names); custom text towers are not supported",
    "--force-patch-dropout": "patch dropout is not supported",
    "--aug-cfg": "training uses the paper's random square crop (scale 0.9-1) only",
    "--pretrained-image": "timm ImageNet weights are not used; --pretrained loads a whole CLIP model",
    "--use-bn-sync": "only the ResNet towers have BatchNorm; SyncBatchNorm is not supported",
    "--use-bnb-linear": "bitsandbytes int8 layers are not supported; use --precision amp_bf16",
    "--torchscript": "use --torchcompile",
    "--trace": "use --torchcompile",
    "--momentum": "only AdamW (--beta1, --beta2, --eps)",
    "--skip-scheduler": "the learning rate always follows --warmup then cosine; use --lr-scheduler cosine",
    "--epochs-cooldown": "only --lr-scheduler cosine (no const-cooldown schedule)",
    "--lr-cooldown-end": "only --lr-scheduler cosine (no const-cooldown schedule)",
    "--lr-cooldown-power": "only --lr-scheduler cosine (no const-cooldown schedule)",
    "--lr-scheduler=const": "only --lr-scheduler cosine (warm-up then cosine)",
    "--lr-scheduler=const-cooldown": "only --lr-scheduler cosine (warm-up then cosine)",
    "--save-most-recent": "--resume latest finds the newest checkpoint; --keep-checkpoints N keeps N",
    "--wandb-project-name": "use --report-to tensorboard (metrics.jsonl is always written)",
    "--wandb-notes": "use --report-to tensorboard (metrics.jsonl is always written)",
    "--remote-sync": "write --output to a synced folder instead",
    "--remote-sync-frequency": "write --output to a synced folder instead",
    "--remote-sync-protocol": "write --output to a synced folder instead",
    "--log-local": "only rank 0 logs (metrics.jsonl in --output)",
    "--copy-codebase": "args.json in --output records the flags; the code is the installed clipsearch",
    "--cache-dir": "set $CLIPSEARCH_HOME; downloaded weights go under it",
    "--val-num-samples": "--val-data is read whole",
    "--imagenet-v2": "one zero-shot set during training (--imagenet-val/--zeroshot-data); evaluate "
    "others with `clipsearch-train eval --zeroshot-data DIR`",
    "--train-data-upsampling-factors": "sources joined with :: are read in proportion to their size",
    "--dataset-type=synthetic": "generate data with `clipsearch-train synth`",
}
# OpenCLIP spellings read as clipsearch-train flags ("flag": "what it becomes").
OPENCLIP_ALIASES = {
    "--logs": "--output LOGS/NAME (with --name)",
    "--name": "--output LOGS/NAME (with --logs)",
    "--imagenet-val": "--zeroshot-data (synset folders get ImageNet's class names)",
    "--delete-previous-checkpoint": "--keep-checkpoints 1",
}

# The CLIP paper's training tables (Radford et al. 2021, Tables 19 and 20): learning rate per
# architecture; Adam beta2 / eps differ between the ResNets and the ViTs.
PAPER_LR = {
    "RN50": 5e-4, "RN101": 5e-4, "RN50x4": 5e-4, "RN50x16": 4e-4, "RN50x64": 3.6e-4,
    "ViT-B-32": 5e-4, "ViT-B-16": 5e-4, "ViT-L-14": 4e-4,
}  # fmt: skip
PAPER = {
    "wd": 0.2,
    "warmup": 2000,
    "epochs": 32,
    "global_batch": 32768,
    "beta1": 0.9,
    "resnet": {"beta2": 0.999, "eps": 1e-8},
    "vit": {"beta2": 0.98, "eps": 1e-6},
}


class _Formatter(argparse.HelpFormatter):
    """argparse help laid out as click's (``Usage:`` / ``Options:``), as the other subcommands."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=100)

    def add_usage(self, usage, actions, groups, prefix=None):
        super().add_usage(usage, actions, groups, prefix="Usage: ")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipsearch-train train",
        usage="clipsearch-train [train] --train-data DATA [OPTIONS]",
        description="Train or fine-tune a CLIP model. OpenCLIP's flag names are accepted "
        "(see docs/training.md for the table).",
        formatter_class=_Formatter,
        add_help=False,
    )
    g = p.add_argument_group("Data")
    a = g.add_argument
    a("--train-data", required=True, help="CSV/TSV, JSONL, captioned folder, or tar shards (brace lists)")
    a("--val-data", default=None, help="held-out pairs (same formats) for validation loss and retrieval")
    a("--dataset-type", default="auto", choices=["auto", "csv", "jsonl", "folder", "webdataset"])
    a("--csv-img-key", default="filepath")
    a("--csv-caption-key", default="title")
    a("--csv-separator", default=None, help="default: ',' for .csv, tab for .tsv")
    a("--train-num-samples", type=int, default=None, help="samples per epoch of tar shards (else counted)")
    a("--dataset-resampled", action="store_true", help="draw tar shards with replacement (endless)")
    a("--shuffle-buffer", type=int, default=1000, help="samples mixed across tar shards (0: none)")
    a("--workers", type=int, default=0, help="data loader processes per training process")
    g = p.add_argument_group("Model")
    a = g.add_argument
    a("--model", default="tiny-vit", help="a named config or a path to an OpenCLIP-schema JSON file")
    a("--pretrained", default=None, help="any clipsearch.load source to fine-tune from")
    a("--force-quick-gelu", action="store_true", help="QuickGELU activations (OpenAI's models)")
    a("--lock-image", action="store_true", help="freeze the image tower (LiT)")
    a("--lock-image-unlocked-groups", type=int, default=0, help="with --lock-image: last N groups train")
    a("--lock-image-freeze-bn-stats", action="store_true", help="with --lock-image: BatchNorm stats too")
    a("--lock-text", action="store_true", help="freeze the text tower")
    a("--lock-text-unlocked-layers", type=int, default=0, help="with --lock-text: last N groups train")
    a("--lock-text-freeze-layer-norm", action="store_true", help="(always: LayerNorms lock with the tower)")
    a("--train-tokenizer", type=int, default=None, metavar="VOCAB_SIZE", help="learn a BPE on the captions")
    g = p.add_argument_group("Optimisation")
    a = g.add_argument
    a("--recipe", choices=["paper"], default=None, help="the paper's hyperparameters for --model")
    a("--batch-size", type=int, default=64, help="per process (per micro-batch with --accum-freq)")
    a("--epochs", type=int, default=1)
    a("--lr", type=float, default=5e-4)
    a("--wd", type=float, default=0.2)
    a("--warmup", type=int, default=100, help="warm-up steps")
    a("--lr-scheduler", default="cosine", choices=["cosine"], help="warm-up then cosine (the only one)")
    a("--opt", default="adamw", choices=["adamw"], help="the optimiser (AdamW only)")
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=None, help="default: 0.98 for ViTs, 0.999 for ResNets (as OpenCLIP)")
    a("--eps", type=float, default=None, help="default: 1e-6 for ViTs, 1e-8 for ResNets (as OpenCLIP)")
    a("--grad-clip-norm", type=float, default=None)
    a("--accum-freq", type=int, default=1, help="micro-batches per step; the loss sees all of them")
    a("--seed", type=int, default=0)
    a("--max-steps", type=int, default=None, help="stop after this global step (schedule unchanged)")
    g = p.add_argument_group("Precision, devices, distributed")
    a = g.add_argument
    a("--precision", default="fp32", choices=PRECISIONS, help="fp32, amp_bf16, amp (CUDA)")
    a("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    a("--grad-checkpointing", action="store_true")
    a("--torchcompile", action="store_true")
    a("--ddp-static-graph", action="store_true", help="DDP's static-graph optimisation")
    a("--gather-with-grad", dest="gather_with_grad", action="store_true", default=True, help="(default)")
    a("--no-gather-with-grad", dest="gather_with_grad", action="store_false")
    a("--local-loss", dest="local_loss", action="store_true", default=None, help="(default when exact)")
    a("--no-local-loss", dest="local_loss", action="store_false")
    g = p.add_argument_group("Evaluation")
    a = g.add_argument
    a("--zeroshot-data", "--imagenet-val", default=None, help="folder-per-class images for zero-shot")
    a("--zeroshot-classnames", default=None, metavar="FILE", help="folder -> class name (e.g. synset IDs)")
    a("--zeroshot-templates", default=None, metavar="FILE", help="prompt templates, one with {} per line")
    a("--zeroshot-frequency", type=int, default=1, help="zero-shot every N epochs (0: never)")
    a("--val-frequency", type=int, default=1, help="--val-data loss and retrieval every N epochs (0: never)")
    g = p.add_argument_group("Output")
    a = g.add_argument
    a("--output", default=None, help="checkpoints, metrics.jsonl, curves.png, model/ (default runs/clip)")
    a("--logs", default=None, help="OpenCLIP's: --output is LOGS/NAME")
    a("--name", default=None, help="OpenCLIP's: --output is LOGS/NAME")
    a("--resume", default=None, help="'latest' or a checkpoint file")
    a("--overwrite", action="store_true", help="replace the run already in --output (else refused)")
    a("--save-frequency", type=int, default=1, help="a checkpoint every N epochs")
    a("--save-every-n-steps", type=int, default=0)
    a("--keep-checkpoints", type=int, default=3, help="the newest N checkpoints are kept (0: all of them)")
    a("--delete-previous-checkpoint", action="store_true", help="OpenCLIP's: --keep-checkpoints 1")
    a("--log-every-n-steps", type=int, default=1)
    a("--report-to", default="", help="'tensorboard' to also write TensorBoard events")
    a("--debug", action="store_true", help="log at DEBUG level")
    g = p.add_argument_group("Other")
    g.add_argument("-h", "--help", action="help", help="Show this message and exit.")
    return p


def refuse_unsupported(argv: list[str]) -> None:
    """Raise OptionError for an OpenCLIP flag clipsearch-train does not have, naming the equivalent."""
    for i, arg in enumerate(argv):
        flag = arg.split("=", 1)[0]
        value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
        for key in (f"{flag}={value}", flag):
            if key in OPENCLIP_REFUSED:
                raise OptionError(f"{key.replace('=', ' ')}: not supported; {OPENCLIP_REFUSED[key]}")


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse and normalise ``argv`` (OpenCLIP's spellings translated, --recipe applied)."""
    refuse_unsupported(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.logs or args.name:
        if args.output:
            raise OptionError("give either --output or --logs/--name, not both")
        args.output = f"{args.logs or 'logs'}/{args.name or 'clip'}"
    args.output = args.output or "runs/clip"
    if args.delete_previous_checkpoint:
        args.keep_checkpoints = 1
    if args.local_loss is None:
        args.local_loss = args.gather_with_grad  # exact (same gradients) only with gathered gradients
    unknown = [r for r in args.report_to.split(",") if r.strip() and r.strip() != "tensorboard"]
    if unknown:
        raise OptionError(f"--report-to {unknown[0]}: not supported; use --report-to tensorboard")
    if args.recipe:
        given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
        apply_paper_recipe(args, given)
    if args.beta2 is None or args.eps is None:  # OpenCLIP's defaults: they differ for the ResNets
        adam = PAPER["resnet" if _is_resnet(args.model) else "vit"]
        args.beta2 = adam["beta2"] if args.beta2 is None else args.beta2
        args.eps = adam["eps"] if args.eps is None else args.eps
    return args


def _is_resnet(model: str) -> bool:
    """Whether ``--model`` names a ResNet image tower (False when it is not a config we can read)."""
    from clipsearch.configs import get_config

    try:
        return isinstance(get_config(str(model))["vision_cfg"].get("layers"), list)
    except ClipsearchError as e:  # an unknown name fails later, where the model is built, with its message
        log.debug("--model %s: config not readable here (%s); ViT Adam defaults", model, e)
        return False


def apply_paper_recipe(args, given: set[str], world_size: int | None = None) -> dict:
    """Set the paper's hyperparameters for ``args.model`` on every flag not given; returns what it set.

    The batch size per process is the paper's 32,768 divided by ranks x ``--accum-freq``.
    """
    import os

    from clipsearch.configs import get_config

    name = str(args.model)
    get_config(name)  # an unknown --model fails here, with its message
    resnet = _is_resnet(name)
    lr = PAPER_LR.get(name.removesuffix("-quickgelu"))
    if lr is None:
        raise OptionError(
            f"--recipe paper has hyperparameters for {', '.join(PAPER_LR)}, not {name}; "
            "drop --recipe and set --lr/--warmup/--wd yourself"
        )
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    per_rank, rest = divmod(PAPER["global_batch"], world * args.accum_freq)
    if rest:
        raise OptionError(f"32768 is not divisible by {world} ranks x --accum-freq {args.accum_freq}")
    values = {
        "lr": lr,
        "wd": PAPER["wd"],
        "warmup": PAPER["warmup"],
        "epochs": PAPER["epochs"],
        "beta1": PAPER["beta1"],
        "batch_size": per_rank,
        **PAPER["resnet" if resnet else "vit"],
    }
    applied = {}
    for key, value in values.items():
        if f"--{key.replace('_', '-')}" not in given:
            setattr(args, key, value)
            applied[key] = value
    log.info("--recipe paper for %s: %s", name, applied)
    return applied
