"""Training data: (image, caption) pairs from CSV/TSV, JSONL, a captioned folder or WebDataset tar shards.

Every sample is decoded by ``clipsearch.imageio.open_image``; one that cannot be read becomes a
:class:`Skip` with a reason, which :func:`collate` drops and counts, so a bad file never stops a run.

Order and augmentation are deterministic functions of ``(seed, epoch, sample)``: the map-style order is
a seeded permutation per epoch, and each sample's random crop draws from a generator seeded by
``(seed, epoch, index)``, whatever worker decodes it. Resuming mid-epoch therefore only has to skip the
batches already consumed (:meth:`EpochBatchSampler.set_epoch`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from clipsearch.errors import ClipsearchError
from clipsearch.imageio import open_image

log = logging.getLogger(__name__)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".avif"}
CAPTION_EXTS = {".txt"}


class DataError(ClipsearchError):
    """The training or evaluation data could not be found or is not in a format the trainer reads."""


@dataclass(frozen=True)
class Skip:
    """A sample that was dropped; ``reason`` is a short key used to count them."""

    reason: str


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W]
    texts: torch.Tensor  # [B, L] token ids
    skipped: Counter = field(default_factory=Counter)  # reason -> number of samples dropped

    def __len__(self) -> int:
        return self.images.shape[0]


def collate(samples: list) -> Batch:
    """Stack the good samples of a batch and count the skipped ones; never raises on bad samples."""
    skipped = Counter(s.reason for s in samples if isinstance(s, Skip))
    good = [s for s in samples if not isinstance(s, Skip)]
    if not good:
        return Batch(torch.empty(0, 3, 1, 1), torch.empty(0, 1, dtype=torch.long), skipped)
    images = torch.stack([g[0] for g in good])
    texts = torch.stack([g[1] for g in good])
    return Batch(images, texts, skipped)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed for the augmentation, independent of which worker decodes the sample."""
    return (seed * 1_000_003 + epoch) * 1_000_000_007 + index & 0x7FFF_FFFF_FFFF_FFFF


def readable_caption(caption: str) -> bool:
    """False for a caption that was not valid UTF-8 (the listing readers keep its bad bytes as
    surrogates, so that file names, which are bytes on disk, still open)."""
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_pair(path, caption: str, transform, tokenizer, seed: int):
    """Decode, augment (with ``seed``) and tokenize one pair; a :class:`Skip` if it cannot be read."""
    if not readable_caption(caption):
        return Skip("bad_caption")
    try:
        image = open_image(path) if not isinstance(path, bytes) else open_image(io.BytesIO(path))
    except (ClipsearchError, OSError, ValueError) as e:
        return Skip(getattr(e, "reason", "unreadable"))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(
            seed
        )  # the CPU generator only: torch.manual_seed also visits every accelerator's
        pixels = transform(image)
    tokens = tokenizer([caption])[0]
    return pixels, tokens


# ---------------------------------------------------------------------------------------------------
# Listing the pairs of the file formats. Files are decoded as UTF-8 with surrogateescape: a Latin-1 file
# name still opens, and a caption with bad bytes becomes one skipped sample (``bad_caption``).


def read_csv(path, img_key: str = "filepath", caption_key: str = "title", sep: str | None = None):
    """``[(image_path, caption)]`` from a CSV/TSV file; relative paths resolve against its folder."""
    path = Path(path)
    if sep is None:
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter=sep, restval="")  # a short row: a bad sample, not None
            fields = reader.fieldnames or []
            for key in (img_key, caption_key):
                if key not in fields:
                    raise DataError(
                        f"{path}: no column {key!r} (columns: {', '.join(fields) or 'none'}); "
                        "set --csv-img-key / --csv-caption-key / --csv-separator"
                    )
            rows = [(row[img_key], row[caption_key]) for row in reader]
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV ({e}); check --csv-separator") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    return [(_resolve(path.parent, p), str(c)) for p, c in rows]


def read_jsonl(path, img_key: str = "filepath", caption_key: str = "title"):
    """``[(image_path, caption)]`` from a JSON-lines file (one object per line)."""
    path = Path(path)
    pairs = []
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    pairs.append((_resolve(path.parent, obj[img_key]), str(obj[caption_key])))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(
                        f"{path}:{n}: expected an object with {img_key!r} and {caption_key!r} ({e})"
                    ) from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    return pairs


def read_folder(path):
    """``[(image_path, caption)]`` for every image in a folder tree with a same-named ``.txt`` beside it."""
    root = Path(path)
    pairs = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS:
            txt = p.with_suffix(".txt")
            if txt.is_file():
                pairs.append((p, txt.read_text(encoding="utf-8", errors="surrogateescape").strip()))
    if not pairs:
        raise DataError(f"{root}: no images with a same-named .txt caption found")
    return pairs


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def expand_braces(pattern: str) -> list[str]:
    """Expand ``shard-{000..009}.tar`` (zero-padded ranges) and ``{a,b}`` lists; ``::`` joins lists."""
    out = []
    for part in pattern.split("::"):
        out.extend(_expand_one(part))
    return out


def _expand_one(s: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", s)
    if not m:
        return [s]
    head, body, tail = s[: m.start()], m.group(1), s[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        width = len(a) if a.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    else:
        choices = body.split(",")
    return [x for c in choices for x in _expand_one(head + c + tail)]


def detect_type(data: str) -> str:
    """``csv``, ``jsonl``, ``folder`` or ``webdataset`` from the shape of a ``--train-data`` value."""
    if ".tar" in data or "{" in data or "::" in data:
        return "webdataset"
    p = Path(data)
    if p.is_dir():
        return "folder"
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise DataError(f"cannot tell the format of {data!r}; pass --dataset-type csv|jsonl|folder|webdataset")


# ---------------------------------------------------------------------------------------------------
# Map-style pairs and their deterministic order


class PairDataset(torch.utils.data.Dataset):
    """A list of (image path, caption) pairs; indexed by ``(index, epoch)`` for seeded augmentation."""

    def __init__(self, pairs, transform, tokenizer, seed: int = 0):
        self.pairs = list(pairs)
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, caption = self.pairs[index]
        return load_pair(path, caption, self.transform, self.tokenizer, sample_seed(self.seed, epoch, index))


class EpochBatchSampler(Sampler):
    """Batches of ``(index, epoch)`` for one rank: a seeded permutation per epoch, split across ranks.

    Every rank gets the same number of full batches (the remainder is dropped: the contrastive batch
    must have the same size on every rank). ``set_epoch(epoch, skip=k)`` starts after ``k`` batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0
        if len(self) == 0:
            raise DataError(
                f"{n} samples are fewer than one batch of {batch_size} per process "
                f"x {world_size} processes; lower --batch-size"
            )

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return (self.n // self.world_size) // self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[self.rank :: self.world_size].tolist()
        for b in range(self.skip, len(self)):
            yield [(i, self.epoch) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]


# ---------------------------------------------------------------------------------------------------
# WebDataset tar shards, streamed


def safe_member_name(name: str) -> bool:
    """False for member paths that are absolute or climb out of the archive (``../``)."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in PurePosixPath(name.replace("\\", "/")).parts


def iter_tar_samples(fileobj):
    """Group a streamed tar's members by key (the path up to the first dot of the file name).

    Yields ``{"__key__": key, ".jpg": bytes, ".txt": bytes, ...}`` dicts, or a :class:`Skip` for every
    member with an unsafe path (which is never read) or a corrupt archive tail.
    """
    current: dict | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if not safe_member_name(member.name):
                    yield Skip("unsafe_path")
                    continue
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                key = f"{directory}/{stem}" if directory else stem
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                f = tar.extractfile(member)
                current["." + ext.lower()] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError):
        yield Skip("corrupt_shard")  # the sample being read and the rest of the shard are lost
        return
    if current is not None:
        yield current


class WebDatasetShards(IterableDataset):
    """Pairs streamed from tar shards, shuffled as OpenCLIP's WebDataset pipeline does.

    Per epoch the shard list is shuffled with a seed of ``(seed, epoch)`` and split across ranks, then
    across loader workers; with ``resampled`` each worker instead draws shards with replacement, for
    ever (OpenCLIP's ``--dataset-resampled``). Raw samples then pass through a shuffle buffer of
    ``shuffle_buffer`` samples seeded by ``(seed, epoch, rank, worker)``, which mixes samples across
    the shards a worker has open (OpenCLIP's sample shuffle). A rank cycles through its shards for as
    long as it is asked (the trainer takes a fixed number of batches per epoch, so all ranks stay in
    step). A shard that is missing or unreadable is skipped with a warning and counted
    (``missing_shard`` / ``corrupt_shard``).
    """

    def __init__(
        self,
        urls,
        transform,
        tokenizer,
        seed=0,
        rank=0,
        world_size=1,
        caption_exts=(".txt",),
        shuffle_buffer: int = 1000,
        resampled: bool = False,
    ):
        self.urls = list(urls)
        if not self.urls:
            raise DataError("no WebDataset shards given")
        present = [u for u in self.urls if os.path.isfile(u)]
        if not present:
            raise DataError(f"none of the {len(self.urls)} shards exists (first: {self.urls[0]})")
        for u in self.urls:
            if u not in present:
                log.warning("shard not found, skipped: %s", u)
        self.transform, self.tokenizer = transform, tokenizer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.caption_exts = caption_exts
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.epoch = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch  # skipping consumed batches is done by the trainer on the loader

    def _generator(self, worker: int, salt: int) -> torch.Generator:
        key = ((self.seed * 1_000_003 + self.epoch) * 10_007 + self.rank) * 1_009 + worker
        return torch.Generator().manual_seed((key * 7 + salt) & 0x7FFF_FFFF_FFFF_FFFF)

    def my_shards(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = [self.urls[i] for i in torch.randperm(len(self.urls), generator=g).tolist()]
        mine = order[self.rank :: self.world_size] or order  # fewer shards than ranks: share
        return mine[worker::num_workers] or mine

    def _shard_stream(self, worker: int, num_workers: int):
        """Shard paths in reading order: this worker's share, cycled, or drawn with replacement."""
        if self.resampled:
            g = self._generator(worker, 1)
            while True:
                yield self.urls[int(torch.randint(len(self.urls), (1,), generator=g))]
        shards = self.my_shards(worker, num_workers)
        while True:
            yield from shards

    def _raw_samples(self, worker: int, num_workers: int):
        readable = 0
        reported: set[str] = set()  # a shard read again (cycled, resampled) does not count its skips twice
        for i, url in enumerate(self._shard_stream(worker, num_workers)):
            if i and i % len(self.urls) == 0 and not readable:
                return  # a whole round of shards without one readable sample
            first_read = url not in reported
            reported.add(url)
            try:
                f = open(url, "rb")
            except OSError as e:
                if first_read:  # once: a Skip per visit would fill the batches while the buffer fills
                    log.warning("shard %s skipped: %s", url, e.strerror or e)
                    yield Skip("missing_shard")
                continue
            with f:
                for sample in iter_tar_samples(f):
                    if isinstance(sample, Skip):
                        if not first_read:
                            continue
                        if sample.reason == "corrupt_shard":
                            log.warning("shard %s is corrupt; the rest of it is skipped", url)
                    else:
                        readable += 1
                    yield sample

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        samples = shuffled(
            self._raw_samples(worker, num_workers), self.shuffle_buffer, self._generator(worker, 2)
        )
        for n, sample in enumerate(samples):
            if isinstance(sample, Skip):
                yield sample
            else:
                yield self._decode(sample, sample_seed(self.seed, self.epoch, n))

    def _decode(self, sample: dict, seed: int):
        image = next((sample[e] for e in sample if e in IMAGE_EXTS), None)
        caption = next((sample[e] for e in self.caption_exts if e in sample), None)
        if image is None or caption is None:
            return Skip("incomplete_sample")
        try:
            text = caption.decode("utf-8").strip()
        except UnicodeDecodeError:
            return Skip("bad_caption")
        return load_pair(image, text, self.transform, self.tokenizer, seed)


def shuffled(items, buffer_size: int, generator: torch.Generator):
    """``items`` mixed through a buffer of ``buffer_size``: each output is a random pick among the
    buffered ones, replaced by the next input (webdataset's ``shuffle``); 0 or 1 passes them through.
    :class:`Skip` markers pass straight through."""
    if buffer_size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if isinstance(item, Skip):
            yield item  # a count, not a sample: it neither waits in the buffer nor is lost when the epoch stops
            continue
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        i = int(torch.randint(len(buf), (1,), generator=generator))
        buf[i], item = item, buf[i]
        yield item
    while buf:
        yield buf.pop(int(torch.randint(len(buf), (1,), generator=generator)))


def count_tar_samples(urls) -> int:
    """Number of distinct keys in the shards (reads only the tar headers of uncompressed shards).

    A missing or corrupt shard counts what could be read of it, with a warning.
    """
    total = 0
    for u in urls:
        keys = set()
        try:
            with tarfile.open(u, "r:*") as tar:
                for m in tar:
                    if m.isfile() and safe_member_name(m.name):
                        directory, _, base = m.name.rpartition("/")
                        keys.add((directory, base.partition(".")[0]))
        except (OSError, tarfile.TarError, EOFError) as e:
            log.warning("shard %s: %s; counting the %d samples read before", u, e, len(keys))
        total += len(keys)
    return total


# ---------------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    loader: DataLoader
    batches_per_epoch: int
    num_samples: int
    set_epoch: object  # callable(epoch, skip)
    skip_in_loader: bool  # True when resume must skip batches by drawing them (iterable data)


def make_loader(
    data: str,
    *,
    dataset_type: str = "auto",
    transform,
    tokenizer,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    img_key: str = "filepath",
    caption_key: str = "title",
    separator: str | None = None,
    num_samples: int | None = None,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
) -> TrainData:
    """A DataLoader over ``data`` yielding :class:`Batch` es, with a fixed number of batches per epoch."""
    kind = detect_type(data) if dataset_type == "auto" else dataset_type
    common = dict(collate_fn=collate, num_workers=workers, persistent_workers=False, prefetch_factor=None)
    if workers > 0:
        common["prefetch_factor"] = 2
    if kind == "webdataset":
        urls = expand_braces(data)
        ds = WebDatasetShards(
            urls,
            transform,
            tokenizer,
            seed,
            rank,
            world_size,
            shuffle_buffer=shuffle_buffer,
            resampled=resampled,
        )
        if resampled and not num_samples:
            raise DataError("--dataset-resampled draws shards for ever: give --train-num-samples per epoch")
        total = num_samples or count_tar_samples(urls)
        per_epoch = total // (batch_size * world_size)
        if per_epoch == 0:
            raise DataError(f"{total} samples are fewer than one global batch; lower --batch-size")
        loader = DataLoader(ds, batch_size=batch_size, **common)
        return TrainData(loader, per_epoch, total, ds.set_epoch, skip_in_loader=True)
    if kind == "csv":
        pairs = read_csv(data, img_key, caption_key, separator)
    elif kind == "jsonl":
        pairs = read_jsonl(data, img_key, caption_key)
    elif kind == "folder":
        pairs = read_folder(data)
    else:
        raise DataError(f"unknown dataset type {kind!r}; use auto, csv, jsonl, folder or webdataset")
    ds = PairDataset(pairs, transform, tokenizer, seed)
    sampler = EpochBatchSampler(len(ds), batch_size, seed, rank, world_size)
    # The epoch travels with every index (the sampler runs in this process), so the workers can stay
    # alive between epochs (as OpenCLIP's do) instead of being forked again for every epoch. Tar
    # shards cannot: their epoch lives in the dataset object, which each worker copies.
    common["persistent_workers"] = workers > 0
    loader = DataLoader(ds, batch_sampler=sampler, **common)
    return TrainData(loader, len(sampler), len(ds), sampler.set_epoch, skip_in_loader=False)
