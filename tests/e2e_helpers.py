"""Shared pieces for end-to-end tests: a tiny saved model and a folder of real photo files.

The photos are distinct synthetic scenes (gradients, stripes, blobs in different colours) written
in the formats a phone or camera produces, so the tiny random model gives them distinct embeddings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A random tiny-vit CLIP saved with ``save_model`` (a clipsearch model folder)."""
    import torch

    from clipsearch.checkpoints import save_model
    from clipsearch.configs import get_config
    from clipsearch.model import build_model
    from clipsearch.tokenizer import Tokenizer
    from clipsearch.transform import PreprocessConfig

    torch.manual_seed(seed)
    cfg = get_config("tiny-vit")
    model = build_model(cfg)
    pp = PreprocessConfig(image_size=cfg["vision_cfg"]["image_size"])
    return save_model(
        directory, model, pp, Tokenizer(cfg["text_cfg"].get("context_length", 77)), model_cfg=cfg
    )


def scene(seed: int, size: tuple[int, int] = (96, 72)) -> np.ndarray:
    """A distinct uint8 RGB picture [H, W, 3] for ``seed``: gradient + stripes + a blob."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx / w * np.cos(seed) + yy / h * np.sin(seed)) % 1.0
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    freq = rng.uniform(0.1, 0.6)
    img += 60 * np.sin(freq * (xx + 2 * yy))[..., None] * rng.uniform(-1, 1, 3)[None, None]
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 30)
    blob = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
    img[blob] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_photo(
    path: Path, seed: int, fmt: str | None = None, size=(96, 72), exif_orientation: int | None = None
):
    """Write scene ``seed`` to ``path`` in ``fmt`` (from the suffix by default)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(scene(seed, size))
    fmt = fmt or {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF"}.get(
        path.suffix.lower(), path.suffix[1:].upper()
    )
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    if fmt == "GIF":
        img = img.convert("P")
    img.save(path, format=fmt, **kwargs)
    return path


def heic_supported() -> bool:
    try:
        import pillow_heif
        from PIL import Image

        pillow_heif.register_heif_opener()
        import io

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="HEIF")
        return True
    except Exception:  # noqa: BLE001 - any failure means the encoder is not available here
        return False


def make_photo_folder(root: Path) -> dict[str, Path]:
    """A small collection in every common format, with a subfolder; returns name -> path."""
    photos = {
        "beach.jpg": write_photo(root / "beach.jpg", 1),
        "forest.png": write_photo(root / "forest.png", 2),
        "city.webp": write_photo(root / "city.webp", 3),
        "anim.gif": write_photo(root / "anim.gif", 4),
        "rotated.jpg": write_photo(root / "trips" / "rotated.jpg", 5, exif_orientation=6),
        "upper.JPG": write_photo(root / "trips" / "upper.JPG", 6),
    }
    if heic_supported():
        photos["phone.heic"] = write_photo(root / "trips" / "phone.heic", 7, fmt="HEIF")
    return photos


def run_cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m clipsearch ARGS`` in a real subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "clipsearch", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


def parse_json(output: str):
    return json.loads(output)


def sidecar_keywords(photo) -> list[str]:
    """The ``dc:subject`` keywords of ``photo``'s XMP sidecar as ElementTree reads them (empty when
    there is none): a reader independent of clipsearch.xmp."""
    import xml.etree.ElementTree as ET

    from clipsearch.xmp import sidecar_path

    side = sidecar_path(photo)
    if not side.exists():
        return []
    dc, rdf = "http://purl.org/dc/elements/1.1/", "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
    return [li.text or "" for li in ET.parse(side).iterfind(f".//{{{dc}}}subject//{{{rdf}}}li")]
