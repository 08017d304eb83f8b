"""``clipsearch-train demo``: the whole story on a CPU without internet, in a few minutes.

Generate the synthetic shapes set, train a small CLIP on it for a fixed number of epochs (the same
work, and so the same model, on every machine), save it as a clipsearch model, index the held-out
images into a photo library, run a text query and label them through the library API, report
zero-shot accuracy against chance, write an HTML page of the results and print the commands to try
next. Everything goes into one folder outside the checkout (``$CLIPSEARCH_HOME/demo`` by default); the
library records the model's folder, so every ``clipsearch --db DEMO/library.db ...`` command opens it
without ``--model``.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

DEMO_MODEL = "demo-vit"
BATCH_SIZE = 64
EPOCHS = 12  # a fixed amount of work: ~340 steps at the default --n
LR = 2e-3  # high for CLIP, right for a tiny model and a few hundred steps
QUERY = "a red circle"


def default_out() -> Path:
    from clipsearch.paths import home

    return home() / "demo"


def run_demo(
    out=None,
    n: int = 2000,
    seed: int = 0,
    reporter=None,
    echo=lambda s: None,
    epochs: int = EPOCHS,
) -> dict:
    """Run the demo in ``out``; returns the zero-shot metrics, the query's top hits and labels, and
    ``next_commands`` (what to run next) and ``results_page`` (the HTML page)."""
    from clipsearch import indexer, search, zeroshot
    from clipsearch.checkpoints import load_bundle
    from clipsearch.encoders import ModelEncoder
    from clipsearch.report import write_html
    from clipsearch.store import Library
    from trainer import evaluate, train
    from trainer.options import parse
    from trainer.synthetic import generate

    out = Path(out) if out is not None else default_out()
    echo(f"generating {n} captioned shape images in {out / 'data'}")
    data = generate(out / "data", n=n, seed=seed)
    n_train = sum(1 for _ in open(data.train_csv, encoding="utf-8")) - 1
    batch_size = min(BATCH_SIZE, n_train)
    steps_per_epoch = n_train // batch_size
    echo(f"training {DEMO_MODEL} for {epochs} epochs of {steps_per_epoch} steps (batch {batch_size})")
    argv = [
        "--train-data", str(data.train_csv), "--val-data", str(data.val_csv),
        "--zeroshot-data", str(data.zeroshot_dir), "--zeroshot-frequency", str(math.ceil(epochs / 4)),
        "--val-frequency", str(math.ceil(epochs / 4)),
        "--model", DEMO_MODEL, "--batch-size", str(batch_size), "--epochs", str(epochs),
        "--lr", str(LR), "--wd", "0.1", "--warmup", str(min(50, steps_per_epoch * epochs // 10)),
        "--seed", str(seed), "--output", str(out / "run"), "--device", "cpu", "--overwrite",
    ]  # fmt: skip
    model_dir = train.run(parse(argv), reporter)

    bundle = load_bundle(str(model_dir))
    zs = evaluate.read_class_folders(data.zeroshot_dir)
    metrics = evaluate.zeroshot(bundle.model, bundle.tokenizer, bundle.preprocess_cfg, zs)
    db = out / "library.db"
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)  # a previous demo's library indexed another model
    library = Library.open(db, create=True)
    try:
        report = indexer.index_paths(library, bundle, [data.zeroshot_dir], source=str(model_dir))
        echo(f"indexed {report.embedded} held-out images into {db}")
        hits = search.search(library, ModelEncoder(bundle), search.Query.build(text=QUERY), top=8)
        echo(f"query {QUERY!r}: " + ", ".join(f"{h.path.parent.name}/{h.path.name}" for h in hits[:5]))
        labels = zeroshot.label_images(library, ModelEncoder(bundle), data.classnames, templates=zs.templates)
    finally:
        library.close()
    # The library's labels against the folder each image sits in (its true class).
    right = sum(r.label == r.path.parent.name.replace("_", " ") for r in labels)
    label_accuracy = right / max(1, len(labels))
    page = write_html(
        hits,
        out / "results.html",
        title=f"clipsearch demo: {QUERY!r}",
        query_desc=(
            f"{DEMO_MODEL} trained for {epochs} epochs on {n_train} images; zero-shot accuracy "
            f"{metrics['zeroshot_top1']:.1%} on {metrics['zeroshot_n']} held-out images (chance "
            f"{metrics['zeroshot_chance']:.1%}); labels agree with the folders for {label_accuracy:.1%}. "
            f"Training curves: {out / 'run' / 'curves.png'}"
        ),
    )
    q = shlex.quote
    lib = f"clipsearch --db {q(str(db))}"
    classes = ",".join(data.classnames[:3])
    next_commands = [
        f"{lib} query {q('a blue square')}",
        f"{lib} query {q('a yellow triangle')} --html results.html",
        f"{lib} status",
        f"{lib} label --classes {q(classes)}",
        f"clipsearch-train eval --model {q(str(model_dir))} --zeroshot-data {q(str(data.zeroshot_dir))}",
    ]
    metrics.update(
        {
            "model_dir": str(model_dir),
            "library": str(db),
            "query": QUERY,
            "hits": [str(h.path) for h in hits],
            "hits_matching_query": sum(h.path.parent.name == "red_circle" for h in hits[:5]),
            "label_accuracy": label_accuracy,
            "labelled": len(labels),
            "results_page": str(page),
            "next_commands": next_commands,
        }
    )
    return metrics
