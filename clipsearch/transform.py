"""Image preprocessing: a PIL image to the normalised tensor CLIP's image tower takes.

The eval transform is OpenAI's: resize the shorter side to ``S`` (bicubic), crop the centre
``S x S``, RGB, scale to [0, 1], subtract the mean and divide by the std of OpenAI's training set.
It is written with PIL and torch directly (no torchvision import on the query path) and equals
torchvision's/OpenCLIP's to the last bit; the tests check that. ``train=True`` gives the random
square crop of the paper as OpenCLIP trains with it (torchvision's, seeded from torch's generator,
again without importing torchvision).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clipsearch.imageio import COVERS_KEY, FULL_SIZE_KEY

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # per-channel mean of OpenAI's training images
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "longest", "squash")
TRAIN_SCALE = (0.9, 1.0)  # RandomResizedCrop's area range, OpenCLIP's default


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model wants its pixels; stored in every model file.

    ``resize_mode``: ``shortest`` (OpenAI: shorter side to ``image_size``, centre crop), ``longest``
    (longer side to ``image_size``, pad the rest with black) or ``squash`` (stretch to a square).
    """

    image_size: int  # side of the square input, pixels
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self):
        if (
            isinstance(self.image_size, bool)
            or int(self.image_size) != self.image_size
            or self.image_size < 1
        ):
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        object.__setattr__(self, "image_size", int(self.image_size))
        for name in ("mean", "std"):
            value = tuple(float(x) for x in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B), got {len(value)}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")

    def to_dict(self) -> dict:
        """JSON-ready: tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a ``ValueError`` (a newer file format)."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown preprocess settings {sorted(unknown)}")
        if "image_size" not in d:
            raise ValueError("preprocess settings lack image_size")
        return cls(**d)


def _resample(name: str):
    from PIL import Image

    return Image.Resampling.BICUBIC if name == "bicubic" else Image.Resampling.BILINEAR


def to_normalised_array(img, mean, std):
    """RGB PIL image -> ``float32 [3, H, W]`` numpy: /255 then (x - mean) / std, as ToTensor + Normalize.

    The one implementation: the torch transform wraps this array (torch-free callers use it as it is).
    """
    import numpy as np

    x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)  # [3, H, W]
    x /= np.float32(255)
    x -= np.asarray(mean, np.float32).reshape(3, 1, 1)
    x /= np.asarray(std, np.float32).reshape(3, 1, 1)
    return x


def _to_normalised_tensor(img, mean, std):
    """RGB PIL image -> float Tensor [3, H, W] (:func:`to_normalised_array`)."""
    import torch

    return torch.from_numpy(to_normalised_array(img, mean, std))


class EvalTransform:
    """``PIL.Image -> Tensor [3, S, S]``, deterministic (OpenAI's eval preprocessing by default)."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg

    def __repr__(self) -> str:
        return f"EvalTransform({self.cfg})"

    def resize_and_crop(self, img):
        """The geometric part alone: the ``S x S`` RGB PIL image the tensor is made from.

        An image that :func:`clipsearch.imageio.open_image` decoded at a reduced scale carries the
        full image's size and the region its pixels span; the sizes and crops are then those of
        the full image, and the resize reads the matching box of the small one, so the picture
        keeps the full decode's geometry to a fraction of a pixel (a resize of the small image
        alone would round its sizes and crop offsets differently: half a pixel off).
        """
        s, resample = self.cfg.image_size, _resample(self.cfg.interpolation)
        w, h = img.size
        box = None
        full = img.info.get(FULL_SIZE_KEY)
        covers = img.info.get(COVERS_KEY)
        if full is not None and covers is not None:
            box = _box_of_full_image(covers, img.size, full)
            w, h = full

        def resize(size):
            return img.resize(size, resample, box=box) if box is not None else img.resize(size, resample)

        if self.cfg.resize_mode == "squash":
            out = resize((s, s))
        elif self.cfg.resize_mode == "shortest":
            # torchvision's Resize(int): the shorter side becomes s, the longer one is truncated
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = s, int(s * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            out = img if size == img.size and box is None else resize(size)
            out = _center_crop_or_pad(out, s)
        else:  # longest: timm's ResizeKeepRatio(longest=1) then crop-or-pad, as OpenCLIP
            ratio = max(w / s, h / s)
            size = (max(1, round(w / ratio)), max(1, round(h / ratio)))  # OpenCLIP fails on 0
            out = resize(size)
            out = _center_crop_or_pad(out, s)
        # RGB after the resize, as OpenAI (a palette image is therefore resized by nearest neighbour)
        return out if out.mode == "RGB" else out.convert("RGB")

    def __call__(self, img):
        return _to_normalised_tensor(self.resize_and_crop(img), self.cfg.mean, self.cfg.std)

    def array(self, img):
        """The same as a call, as ``float32 [3, S, S]`` numpy (no torch: ONNX Runtime's input)."""
        return to_normalised_array(self.resize_and_crop(img), self.cfg.mean, self.cfg.std)


def _box_of_full_image(covers, size, full):
    """Where the whole full-scale image (``full`` = (W, H)) lies in a reduced image of ``size``
    whose pixels span the full image's box ``covers``; clamped to the reduced image's bounds."""
    x0, y0, x1, y1 = covers
    w, h = size
    sx, sy = w / (x1 - x0), h / (y1 - y0)  # reduced pixels per full pixel
    return (
        max(0.0, -x0 * sx),
        max(0.0, -y0 * sy),
        min(float(w), (full[0] - x0) * sx),
        min(float(h), (full[1] - y0) * sy),
    )


def _center_crop_or_pad(img, s: int):
    """Centre ``s x s`` crop with torchvision's rounding; black padding where the image is smaller."""
    from PIL import Image

    w, h = img.size
    if w < s or h < s:
        padded = Image.new(img.mode, (max(w, s), max(h, s)))
        if img.mode == "P":
            padded.putpalette(img.getpalette())  # fill is palette index 0, as torchvision pads
        padded.paste(img, ((max(w, s) - w) // 2, (max(h, s) - h) // 2))
        img, (w, h) = padded, padded.size
    top = int(round((h - s) / 2.0))
    left = int(round((w - s) / 2.0))
    if (left, top, w, h) == (0, 0, s, s):
        return img
    return img.crop((left, top, left + s, top + s))


TRAIN_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect range (width / height)


class TrainTransform:
    """The paper's augmentation as OpenCLIP trains: a random crop of 90-100% of the area, any aspect
    in [3/4, 4/3], resized to ``S x S``. Draws from torch's global generator (seed it per sample).

    The crop is torchvision's ``RandomResizedCrop``, drawn from the same generator in the same
    order with the same float32 arithmetic, so a seed gives the same crop to the pixel (tested
    against torchvision and OpenCLIP); written here so that a training run, and each of its data
    loader processes, does not import torchvision for it (~0.6 s of CPU on this machine beyond
    ``torch._dynamo``, which PyTorch's optimizers import at their first step anyway).
    """

    def __init__(self, cfg: PreprocessConfig, scale=TRAIN_SCALE, ratio=TRAIN_RATIO):
        from PIL import Image

        self.cfg = cfg
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self._resample = Image.BICUBIC if cfg.interpolation == "bicubic" else Image.BILINEAR

    def __repr__(self) -> str:
        return f"TrainTransform({self.cfg}, scale={self.scale}, ratio={self.ratio})"

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of the random crop of a ``width x height`` image.

        Ten tries of an area fraction uniform in ``scale`` and a log-uniform aspect in ``ratio``;
        the first that fits is placed uniformly at random. When none fits (a very long image), the
        centre crop of the whole image clamped to ``ratio``.
        """
        import math

        import torch

        log_lo, log_hi = torch.log(torch.tensor(self.ratio)).tolist()  # float32, as torchvision
        for _ in range(10):
            area = width * height * torch.empty(1).uniform_(*self.scale).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi)).item()
            w = int(round(math.sqrt(area * aspect)))
            h = int(round(math.sqrt(area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,)).item())
                left = int(torch.randint(0, width - w + 1, size=(1,)).item())
                return left, top, left + w, top + h
        w, h = width, height
        if width / height < min(self.ratio):
            h = int(round(width / min(self.ratio)))
        elif width / height > max(self.ratio):
            w = int(round(height * max(self.ratio)))
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, img):
        s = self.cfg.image_size
        out = img.crop(self.crop_box(*img.size)).resize((s, s), self._resample)
        if out.mode != "RGB":
            out = out.convert("RGB")
        return _to_normalised_tensor(out, self.cfg.mean, self.cfg.std)


def image_transform(cfg: PreprocessConfig | dict, train: bool = False):
    """The callable ``PIL.Image -> float Tensor [3, S, S]`` for ``cfg`` (eval, or train augmentation)."""
    if isinstance(cfg, dict):
        cfg = PreprocessConfig.from_dict(cfg)
    return TrainTransform(cfg) if train else EvalTransform(cfg)
