"""Real image sets that a package registry ships, written as clipsearch-train data (PNG + CSV).

Nobody here made these for the occasion, and both download without internet beyond the registries:

- ``emoji``: the emoji images of four vendors (npm ``emoji-datasource-{apple,google,twitter,facebook}``
  16.0.0, 64 px PNG, ~3,790 each) captioned with their Unicode names from the package's ``emoji.json``
  (skin-tone variants get CLDR's "<name>: <tone> skin tone"). Three vendors train, the fourth is held
  out: ``train.csv``, ``val.csv`` (held-out vendor, one caption per image), ``zeroshot/<category>/``
  (held-out vendor by Unicode category) and ``names/<name>/`` (held-out vendor by emoji name).
- ``fashion``: Fashion-MNIST (Debian ``dataset-fashion-mnist``: 60,000 + 10,000 28x28 greyscale
  product photos, 10 classes), captioned "a photo of a <class>". ``train.csv``, ``test.csv`` and
  ``zeroshot/<class>/`` (the test split).

Fetch the sources first (see /work/notes/dataset.md)::

    mkdir -p /tmp/emoji && cd /tmp/emoji && for v in apple google twitter facebook; do
        npm pack emoji-datasource-$v@16.0.0 && mkdir -p $v && tar xzf emoji-datasource-$v-16.0.0.tgz -C $v
    done
    apt-get install -y dataset-fashion-mnist

then ``python benchmarks/real_data.py emoji /tmp/emoji OUT`` or ``python benchmarks/real_data.py fashion OUT``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import struct
from pathlib import Path

VENDORS = ("apple", "google", "facebook", "twitter")  # the last one is held out
TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}
FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows(rows)


def _folder_name(text: str) -> str:
    """A class folder name that reads back as ``text`` ("Food & Drink" -> Food_and_Drink)."""
    kept = "".join(c if c.isalnum() or c in " -" else " " for c in text.replace("&", "and"))
    return "_".join(kept.split())


def emoji_entries(emoji_json: Path):
    """``[(image file name, caption, category, vendor flags)]`` for every emoji and skin-tone variant."""
    out = []
    for e in json.loads(emoji_json.read_text(encoding="utf-8")):
        if e["category"] == "Component":
            continue
        name = e["name"].lower()
        out.append((e["image"], name, e["category"], e))
        for tones, var in (e.get("skin_variations") or {}).items():
            words = [TONES[t] for t in tones.split("-") if t in TONES]
            label = ", ".join(dict.fromkeys(words))
            out.append((var["image"], f"{name}: {label} skin tone", e["category"], var))
    return out


def build_emoji(src: Path, out: Path, held_out: str = "twitter") -> dict:
    from PIL import Image

    entries = emoji_entries(src / held_out / "package" / "emoji.json")
    train, val = [], []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for vendor in VENDORS:
        folder = src / vendor / "package" / "img" / vendor / "64"
        for image, caption, category, flags in entries:
            if not flags.get(f"has_img_{vendor}") or not (folder / image).is_file():
                continue
            rgba = Image.open(folder / image).convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))  # transparent -> white
            rel = Path("images") / vendor / image
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            flat.save(out / rel)
            if vendor == held_out:
                val.append((rel.as_posix(), caption))
                for kind, cls in (("zeroshot", category), ("names", caption)):
                    d = out / kind / _folder_name(cls)
                    d.mkdir(parents=True, exist_ok=True)
                    (d / image).unlink(missing_ok=True)
                    (d / image).symlink_to(Path("../..") / rel)
            else:
                train.append((rel.as_posix(), caption))
    _write_csv(out / "train.csv", train)
    _write_csv(out / "val.csv", val)
    (out / "zeroshot" / "templates.txt").write_text("an emoji of {}\n{}\n", encoding="utf-8")
    (out / "names" / "templates.txt").write_text("{}\n", encoding="utf-8")
    return {"train": len(train), "val": len(val)}


def _idx(path: Path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return dims, data[4 + 4 * ndim :]


def build_fashion(out: Path, src: Path = FASHION_DIR, limit: int | None = None) -> dict:
    from PIL import Image

    counts = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        (n, h, w), pixels = _idx(src / f"{stem}-images-idx3-ubyte.gz")
        _, labels = _idx(src / f"{stem}-labels-idx1-ubyte.gz")
        n = min(n, limit) if limit else n
        rows = []
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = Image.frombytes("L", (w, h), pixels[i * h * w : (i + 1) * h * w])
            rel = Path("images") / split / f"{i:05d}.png"
            img.save(out / rel)
            cls = FASHION_CLASSES[labels[i]]
            rows.append((rel.as_posix(), f"a photo of a {cls}"))
            if split == "test":
                d = out / "zeroshot" / _folder_name(cls)
                d.mkdir(parents=True, exist_ok=True)
                (d / rel.name).unlink(missing_ok=True)
                (d / rel.name).symlink_to(Path("../..") / rel)
        _write_csv(out / f"{split}.csv", rows)
        counts[split] = n
    (out / "zeroshot" / "templates.txt").write_text("a photo of a {}\n", encoding="utf-8")
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="set", required=True)
    e = sub.add_parser("emoji")
    e.add_argument("src", type=Path, help="folder with <vendor>/package/ unpacked from npm")
    e.add_argument("out", type=Path)
    e.add_argument("--held-out", default="twitter", choices=VENDORS)
    f = sub.add_parser("fashion")
    f.add_argument("out", type=Path)
    f.add_argument("--limit", type=int, default=None, help="first N images of each split")
    args = p.parse_args(argv)
    if args.set == "emoji":
        print(build_emoji(args.src, args.out, args.held_out))
    else:
        print(build_fashion(args.out, limit=args.limit))


if __name__ == "__main__":
    main()
