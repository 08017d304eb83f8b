"""A synthetic captioned image set: coloured shapes at positions, so a model can be seen learning on a CPU.

``generate(out_dir, n=2000, seed=0)`` writes real image files (PNG, and every fourth one JPEG so both
decoders are exercised) and:

- ``train.csv`` / ``val.csv``: ``filepath,title`` with paths relative to ``out_dir``, e.g.
  ``images/00017.png,a red circle on the left``;
- ``zeroshot/<colour>_<shape>/*.png``: a folder-per-class set of images not seen in training, whose
  class names (``red circle``) are what a zero-shot classifier is asked to tell apart, and
  ``zeroshot/templates.txt``, the prompts to build its classifier with.

The output is a deterministic function of the arguments.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
}
SHAPES = ("circle", "square", "triangle")
# (phrase, centre as fractions of the image size)
POSITIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "left": ("on the left", (0.27, 0.5)),
    "right": ("on the right", (0.73, 0.5)),
    "top": ("at the top", (0.5, 0.27)),
    "bottom": ("at the bottom", (0.5, 0.73)),
    "middle": ("in the middle", (0.5, 0.5)),
}
CAPTION_FORMS = ("a {c} {s} {p}", "a photo of a {c} {s} {p}", "{p}, a {c} {s}", "a {c} {s}")
# Zero-shot prompts in the captions' own language (the paper's ImageNet ensemble speaks of photos of
# objects, which these drawings are not); written to zeroshot/templates.txt for the evaluator.
TEMPLATES = ("a {}", "a photo of a {}")


@dataclass(frozen=True)
class SyntheticSet:
    root: Path
    train_csv: Path
    val_csv: Path
    zeroshot_dir: Path
    classnames: list[str]


def classnames() -> list[str]:
    """The zero-shot classes, in folder order: ``"red circle"``, ``"red square"``, ..."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def draw(colour: str, shape: str, position: str, size: int, rng: random.Random):
    """One RGB PIL image of ``size`` x ``size`` pixels with the shape drawn at the position."""
    from PIL import Image, ImageDraw

    shade = rng.randint(225, 255)
    img = Image.new("RGB", (size, size), (shade, shade, shade))
    d = ImageDraw.Draw(img)
    _, (fx, fy) = POSITIONS[position]
    jitter = size * 0.05
    cx = fx * size + rng.uniform(-jitter, jitter)
    cy = fy * size + rng.uniform(-jitter, jitter)
    r = size * rng.uniform(0.14, 0.2)
    rgb = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in COLOURS[colour])
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        d.rectangle(box, fill=rgb)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=rgb)
    return img


def _sample(rng: random.Random):
    return rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))


def _save(img, path: Path) -> None:
    if path.suffix == ".jpg":
        img.save(path, quality=92)
    else:
        img.save(path)


def generate(
    out_dir: str | Path,
    n: int = 2000,
    seed: int = 0,
    image_size: int = 64,
    val_fraction: float = 0.1,
    zeroshot_per_class: int = 10,
) -> SyntheticSet:
    """Write ``n`` captioned images (split into train/val) plus the zero-shot set; returns the paths."""
    if n < 2:
        raise ValueError("n must be at least 2")
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour, shape, position = _sample(rng)
        path = Path("images") / (f"{i:05d}.jpg" if i % 4 == 3 else f"{i:05d}.png")
        _save(draw(colour, shape, position, image_size, rng), root / path)
        caption = rng.choice(CAPTION_FORMS).format(c=colour, s=shape, p=POSITIONS[position][0])
        rows.append((path.as_posix(), caption))
    n_val = max(1, int(round(n * val_fraction)))
    for name, part in (("train.csv", rows[: n - n_val]), ("val.csv", rows[n - n_val :])):
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["filepath", "title"])
            w.writerows(part)
    zs = root / "zeroshot"
    zs.mkdir(parents=True, exist_ok=True)
    (zs / "templates.txt").write_text("".join(t + "\n" for t in TEMPLATES), encoding="utf-8")
    for name in classnames():
        colour, shape = name.split()
        folder = zs / f"{colour}_{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(zeroshot_per_class):
            position = rng.choice(list(POSITIONS))
            draw(colour, shape, position, image_size, rng).save(folder / f"{j:03d}.png")
    return SyntheticSet(root, root / "train.csv", root / "val.csv", zs, classnames())
