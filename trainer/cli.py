"""``clipsearch-train``: train (the default subcommand), eval, synth and demo.

``train`` keeps OpenCLIP's argparse flags (``clipsearch-train --train-data ... --model ...`` works as
``python -m open_clip_train.main`` does); the other subcommands are click commands. Errors the user can
fix become one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import sys

import click

from clipsearch import __version__
from clipsearch.errors import ClipsearchError

SUBCOMMANDS = ("train", "eval", "synth", "demo")
HELP = {"help_option_names": ["-h", "--help"]}


@click.group(
    help="Train and evaluate CLIP models for clipsearch. `train` is the default subcommand: "
    "`clipsearch-train --train-data ... --model ...` trains; `clipsearch-train train -h` lists its flags.",
    context_settings=HELP,
)
@click.version_option(__version__, "-V", "--version", prog_name="clipsearch-train")
def cli():
    pass


@cli.command(
    "train",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.pass_context
def train_cmd(ctx):
    """Train or fine-tune a CLIP model (OpenCLIP's flags; see `clipsearch-train train --help`)."""
    from trainer import train

    reporter = None
    if _rank() == 0:  # only rank 0 shows progress
        from trainer.progress import RichReporter

        reporter = RichReporter()
    from trainer.options import parse

    args = parse(ctx.args)
    if args.debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        model_dir = train.run(args, reporter)
    except KeyboardInterrupt:
        _say_where_to_resume(args.output)
        raise
    if model_dir is not None:
        click.echo(f"model saved to {model_dir}  (use: clipsearch index --model {model_dir} PATH)")


def _say_where_to_resume(output: str) -> None:
    from pathlib import Path

    from trainer.checkpointing import list_checkpoints

    stems = list_checkpoints(Path(output) / "checkpoints")
    if stems:
        click.echo(f"interrupted; continue from {stems[-1].name} with --resume latest", err=True)
    else:
        click.echo("interrupted before the first checkpoint; nothing to resume", err=True)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


@cli.command("synth", context_settings=HELP)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--n", default=2000, show_default=True, type=click.IntRange(min=2), help="captioned images (train + val)"
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--image-size", default=64, show_default=True, type=click.IntRange(min=1), help="pixels per side"
)
@click.option("--zeroshot-per-class", default=10, show_default=True, type=click.IntRange(min=0))
def synth_cmd(out_dir, n, seed, image_size, zeroshot_per_class):
    """Write a synthetic captioned dataset of coloured shapes (train.csv, val.csv, zeroshot/)."""
    from trainer.synthetic import generate

    s = generate(out_dir, n=n, seed=seed, image_size=image_size, zeroshot_per_class=zeroshot_per_class)
    click.echo(f"wrote {n} images: {s.train_csv}, {s.val_csv}; zero-shot set {s.zeroshot_dir}")


@cli.command("eval", context_settings=HELP)
@click.option("--model", "source", required=True, help="a clipsearch model dir or any clipsearch.load source")
@click.option(
    "--zeroshot-data",
    "--imagenet-val",
    default=None,
    help="folder-per-class images or a CSV with a label column (ImageNet synset folders get ImageNet's names)",
)
@click.option(
    "--zeroshot-classnames",
    default=None,
    type=click.Path(dir_okay=False),
    help="class folder -> name: 'FOLDER NAME' lines (LOC_synset_mapping.txt) or JSON",
)
@click.option(
    "--zeroshot-templates",
    default=None,
    type=click.Path(dir_okay=False),
    help="prompt templates, one with {} per line  [default: templates.txt in the folder, else the paper's 80]",
)
@click.option("--retrieval-data", default=None, help="CSV/JSONL of held-out (image, caption) pairs")
@click.option("--linear-probe-data", default=None, help="folder-per-class images to fit the probe on")
@click.option("--linear-probe-test", default=None, help="folder-per-class test images (else 30% held out)")
@click.option("--csv-img-key", default="filepath")
@click.option("--csv-caption-key", default="title")
@click.option("--csv-label-key", default="label")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or mps  [default: the best available]")
@click.option("--json", "as_json", is_flag=True, help="print the metrics as one JSON object")
def eval_cmd(
    source,
    zeroshot_data,
    zeroshot_classnames,
    zeroshot_templates,
    retrieval_data,
    linear_probe_data,
    linear_probe_test,
    csv_img_key,
    csv_caption_key,
    csv_label_key,
    device,
    as_json,
):
    """Zero-shot accuracy, retrieval recall@1/5/10 and linear-probe accuracy of a model."""
    from clipsearch.checkpoints import load_bundle
    from trainer import evaluate

    if not (zeroshot_data or retrieval_data or linear_probe_data):
        raise click.UsageError("give at least one of --zeroshot-data, --retrieval-data, --linear-probe-data")
    from trainer.placement import resolve_device

    where = resolve_device(device)  # a device that is not there fails before the model loads
    bundle = load_bundle(source)
    model = bundle.model.to(where).eval()
    metrics = {}
    if zeroshot_data:
        data = evaluate.read_labelled(
            zeroshot_data,
            csv_img_key,
            csv_label_key,
            classnames=zeroshot_classnames,
            templates=zeroshot_templates,
        )
        metrics.update(evaluate.zeroshot(model, bundle.tokenizer, bundle.preprocess_cfg, data))
    if retrieval_data:
        _, pairs = evaluate.read_eval_sets(
            None, retrieval_data, img_key=csv_img_key, caption_key=csv_caption_key
        )
        metrics.update(evaluate.retrieval(model, bundle.tokenizer, bundle.preprocess_cfg, pairs))
    if linear_probe_data:
        train = evaluate.read_labelled(linear_probe_data, csv_img_key, csv_label_key)
        test = (
            evaluate.read_labelled(linear_probe_test, csv_img_key, csv_label_key)
            if linear_probe_test
            else None
        )
        metrics.update(evaluate.linear_probe_images(model, bundle.preprocess_cfg, train, test))
    if as_json:
        click.echo(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            click.echo(f"{k:24s} {v:.4f}" if isinstance(v, float) else f"{k:24s} {v}")


@cli.command("demo", context_settings=HELP)
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="folder for everything the demo writes  [default: demo/ in the clipsearch home]",
)
@click.option(
    "--epochs",
    default=12,
    show_default=True,
    type=click.IntRange(min=1),
    help="training epochs (a fixed amount of work)",
)
@click.option(
    "--n", default=2000, show_default=True, type=click.IntRange(min=2), help="synthetic captioned images"
)
@click.option("--seed", default=0, show_default=True)
def demo_cmd(out, epochs, n, seed):
    """Generate shapes, train a small CLIP on the CPU, index and search the held-out images."""
    from trainer.demo import run_demo
    from trainer.progress import RichReporter

    r = run_demo(out, n=n, seed=seed, epochs=epochs, reporter=RichReporter(), echo=click.echo)
    click.echo(
        f"zero-shot accuracy on {r['zeroshot_n']} held-out images: "
        f"{r['zeroshot_top1']:.1%} (chance {r['zeroshot_chance']:.1%})"
    )
    click.echo(f"results page: {r['results_page']}")
    click.echo("try next:")
    for command in r["next_commands"]:
        click.echo(f"  {command}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` without a subcommand means ``train``. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Flags first means `train` (OpenCLIP's command line); a word first is a subcommand, and a
    # mistyped one gets click's "No such command ... Did you mean" rather than training.
    if argv and argv[0].startswith("-") and argv[0] not in ("--help", "-h", "--version", "-V"):
        argv = ["train", *argv]
    if argv[:1] == ["train"] and any(a in ("--help", "-h") for a in argv[1:]):
        from trainer.train import build_parser

        build_parser().print_help()
        return 0
    try:
        cli.main(args=argv, prog_name="clipsearch-train", standalone_mode=False)
    except ClipsearchError as e:
        click.echo(f"error: {e}", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        return 130
    except SystemExit as e:  # argparse's usage errors
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
