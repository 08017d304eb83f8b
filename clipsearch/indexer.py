"""Indexing: bring a library up to date with the photos under some paths.

The job, in order:

1. Take the library's writer lock (a second index run fails at once with a clear message).
2. Walk the paths (``walk.py``): image files only, hidden and excluded ones skipped, no loops.
3. Files whose size and mtime match their row, and that have an embedding of this model, are
   unchanged and never read.
4. The rest are read and hashed (blake2b, streamed) in a thread pool. A hash that already has an
   embedding of this model is reused without decoding: a file that vanished from the scan with the
   same hash was *moved* (its row keeps its id, embeddings and labels); otherwise it is a
   *duplicate* (a new row with a copy of the embedding). Unknown content is decoded (at a reduced
   scale that still covers the model's input, see ``imageio.open_image``) and preprocessed in the
   same pool while the main thread runs the image backend (``clipsearch.backends``; ``auto``: the
   fastest one measured faithful, loaded while the first files decode) on the previous batch; at
   most ``2 * batch_size + workers`` files are in flight, so memory does not grow with the
   collection.
5. Each batch is committed in one transaction with its images and embeddings together, so an
   interrupted run loses at most one batch and the next run resumes where it stopped.
6. Rows under the scanned paths whose files are gone are deleted with their embeddings and labels,
   unless the folder looks absent rather than emptied (:func:`removal_hold`): it is missing, holds
   no photo at all, is on another device than last time (a mount point without its drive), or the
   run would remove most of its photos at once. Then its rows are kept, the report says why
   (``report.kept``), and only ``prune=True`` (``index --prune``) removes them. Nothing is ever
   removed under a folder that could not be listed, nor for a file that could not be read this
   time (permission, I/O error, vanished mid-run): it keeps its row and embeddings.

Failures (unreadable, not an image, too many pixels, dead symlinks...) are recorded in the
library's ``errors`` table with a reason, reported, and cleared once the file indexes or vanishes.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.errors import ClipsearchError, ImageDecodeError, LibraryError, ModelLoadError
from clipsearch.imageio import DEFAULT_MAX_PIXELS, check_header, open_image
from clipsearch.metadata import METADATA_VERSION, sidecar_stamp
from clipsearch.store import ImageRow, Library, LibraryWriteError
from clipsearch.walk import oserror_reason, walk

logger = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20  # 1 MiB reads while hashing
_PHOTO_GONE_REASONS = ("dead symlink", "not a regular file")  # walk failures that delete the path's row
# A run removes at most this many of a folder's photos freely; more, and more than half of them, at
# once looks like a drive that is not all there rather than a user's deletion (see removal_hold).
MASS_REMOVAL_MIN = 10
# Failures that say nothing final about a file's content: an indexed photo that fails so keeps its
# row. A file cut short ("truncated") is most often one still being copied or synced in place: its
# row waits for the next run, which reads it again once its size or time has changed.
_NOT_READ = ("permission denied", "unreadable", "vanished", "not a regular file", "empty file", "truncated")


class IndexPathError(ClipsearchError):
    """A path given to ``index`` does not exist."""


@dataclass
class KeptFolder:
    """Photos a run did not remove although their files were not found: see :func:`removal_hold`."""

    path: Path  # the scanned folder (or file)
    photos: int  # rows kept under it
    reason: str  # why its absence looks accidental, in words


def removal_hold(
    *, exists: bool, known: int, found: int, gone: int, device: int | None, device_before: int | None
) -> str | None:
    """Why the rows of a scanned folder whose files were not found must be kept, or None to remove them.

    ``known``: the folder's photos in the library; ``found``: image files found under it now;
    ``gone``: known photos not found; ``device``/``device_before``: its ``st_dev`` now and at the
    last run that removed freely (None when unknown). A folder with nothing gone is never held.
    """
    if gone == 0:
        return None
    if not exists:
        return "the folder is missing (is its drive mounted?)"
    if found == 0:
        return "the folder holds no photos now (is its drive mounted?)"
    if device_before is not None and device is not None and device != device_before:
        return "the folder is on another device than last time (is its drive mounted?)"
    if gone > MASS_REMOVAL_MIN and 2 * gone > known:
        return f"{gone} of its {known} photos would be removed at once"
    return None


@dataclass
class IndexReport:
    """What an index run did. ``failed`` lists ``(path, reason)`` of every file skipped."""

    new: int = 0  # files embedded for the first time (for this model)
    updated: int = 0  # files whose content changed, embedded again
    moved: int = 0  # files found under a new path: row and embeddings kept
    duplicates: int = 0  # copies of known content: embedding reused
    removed: int = 0  # rows whose files are gone
    unchanged: int = 0  # skipped on size + mtime (or same hash)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    kept: list[KeptFolder] = field(default_factory=list)  # folders whose vanished photos were kept
    seconds: float = 0.0
    model_id: str = ""
    # The image inference backend that embedded this run's images (clipsearch.backends), "model" for
    # the model as it was loaded, "" when nothing needed embedding; the note says why auto fell back.
    backend: str = ""
    backend_note: str = ""
    metadata: int = 0  # photos indexed earlier whose metadata was read again (headers only, no embedding)

    @property
    def embedded(self) -> int:
        """Images that went through the model in this run."""
        return self.new + self.updated


@dataclass
class _Job:
    path: Path
    stored: str
    row: ImageRow | None  # the row at this path, if any


@dataclass
class _Result:
    job: _Job
    size: int | None = None  # set once the open file was examined
    mtime_ns: int | None = None
    content_hash: str = ""
    tensor: Any = None  # preprocessed image [3, H, W], None when the embedding can be reused
    meta: Any = None  # clipsearch.metadata.PhotoMetadata, read from the same bytes
    error: tuple[str, str] | None = None  # (reason, detail)


def read_and_hash(fd: int, keep: bool) -> tuple[str, bytes | None]:
    """blake2b-160 of everything readable from ``fd``, and the bytes themselves if ``keep``."""
    h = hashlib.blake2b(digest_size=20)
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, HASH_CHUNK)
        if not chunk:
            return h.hexdigest(), (b"".join(chunks) if keep else None)
        h.update(chunk)
        if keep:
            chunks.append(chunk)


def _read_metadata(data: bytes, path: Path):
    """The photo's metadata from its bytes (headers only), or None when they say nothing readable."""
    from clipsearch.metadata import read_metadata

    try:
        return read_metadata(io.BytesIO(data), path)
    except ImageDecodeError:
        return None  # not an image: the decode below says why
    except Exception:  # a parser bug on one odd file costs its metadata, never the photo
        logger.warning("could not read the metadata of %s", path, exc_info=True)
        return None


def _decoder_settings(max_pixels: int | None) -> str:
    """What a decode verdict depends on besides the file: a change retries every recorded failure."""
    import importlib.util

    import PIL

    from clipsearch import __version__

    heif = importlib.util.find_spec("pillow_heif") is not None  # HEIC/AVIF decodable or not
    libraw = importlib.util.find_spec("rawpy") is not None  # RAW files with small previews
    return (
        f"clipsearch {__version__}; pillow {PIL.__version__}; heif {heif}; rawpy {libraw}; "
        f"max_pixels {max_pixels}"
    )


def index_paths(
    library: Library,
    bundle,
    paths: Sequence[Path | str],
    *,
    exclude: Sequence[str] = (),
    include_hidden: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Callable[[dict], None] | None = None,
    source: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    update_vectors: bool = True,
    backend: str = "auto",
    prune: bool = False,
) -> IndexReport:
    """Index the images under ``paths`` into ``library`` with ``bundle``'s model.

    ``bundle`` needs ``model`` (with ``encode_image``), ``preprocess`` (PIL image -> Tensor
    [3, H, W]) and ``model_id``; ``source`` (default ``bundle.source`` if present, else the model id)
    is recorded as how to load the model again; images over ``max_pixels`` are refused unread;
    ``update_vectors`` brings the model's saved FAISS index in step at the end. ``backend`` picks the
    image inference backend (:func:`clipsearch.backends.make_image_encoder`): ``auto`` is the fastest
    one measured faithful (cosine >= 0.995 to fp32) on this machine, chosen only when some file needs
    the model; should it fail to build or run, the run goes on with the model as loaded
    (``report.backend_note`` says why). A model already in fp16/bf16 on a GPU, or a bundle without a
    ``preprocess_cfg`` (test fakes), runs as given. A named backend is forced: one that cannot run
    here raises ``BackendError``. ``workers`` decode threads default to :func:`default_workers`.
    ``prune`` removes the rows :func:`removal_hold` would keep (a folder missing, emptied, on another
    device, or most of it gone); a missing path that holds indexed photos is allowed either way.

    ``progress`` receives, in this order, ``{"event": "scan", "found": n}``, ``{"event": "start",
    "total": n}``, once some file needs the model (the backend loads while the first files decode)
    ``{"event": "backend", "status": "settling"}`` (a first ``auto`` for this model and machine: it
    starts on torch fp32 and keeps the fastest faithful quick backend measured on the first batch,
    :class:`~clipsearch.backends.SettlingEncoder`; :func:`clipsearch.settle.settle` measures the
    rest later) and ``{"event": "backend", "name": str}``, then ``{"event": "advance", "n": k}``
    and ``{"event": "done"}``; a consumer should ignore events it
    does not know. Raises :class:`IndexPathError` for a missing path and ``LibraryError`` when
    another index run holds the library or the database cannot be written (e.g. a full disk;
    committed batches are kept).
    """
    started = time.monotonic()
    emit = progress or (lambda event: None)
    missing = [Path(os.path.abspath(p)) for p in paths if not os.path.lexists(p)]
    unknown = [p for p in missing if not library.image_ids_under(p)]
    if unknown:
        raise IndexPathError(f"no such file or folder: {unknown[0]}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if backend != "auto":
        from clipsearch.backends import BackendError, backend_names

        if backend not in backend_names():
            raise BackendError(
                f"unknown inference backend {backend!r}; use auto or one of {', '.join(backend_names())}"
            )
    model_id = bundle.model_id
    report = IndexReport(model_id=model_id)
    with library.writer_lock():
        config = getattr(bundle, "config", None)
        dim = config.get("embed_dim") if isinstance(config, dict) else None
        try:
            library.register_model(
                model_id, source or getattr(bundle, "source", None) or model_id, dim, config
            )
            present = [p for p in paths if os.path.lexists(p)]
            found = walk(present, exclude=exclude, include_hidden=include_hidden)
            emit({"event": "scan", "found": len(found.files)})
            from clipsearch.backends import placement

            device_type = placement(bundle)[0].split(":")[0]
            n_workers = workers or default_workers(device_type, os.cpu_count() or 1)
            run = _Run(library, bundle, report, batch_size, n_workers, emit, max_pixels, backend)
            run.execute(found, missing, prune)
            if update_vectors:
                from clipsearch.vectors import VectorIndex

                # Bring the saved FAISS index in step now (by id), so the next query just maps it;
                # an IVF tuned before the model had a text export is retuned with its text probes.
                VectorIndex.for_library(library, model_id, retune=True)
        except LibraryWriteError as e:
            # Disk full, I/O error, a lock held past the busy timeout: what was committed is kept.
            raise LibraryError(
                f"{e}; the batches done so far are saved: fix the cause and run index again"
            ) from e
    report.seconds = time.monotonic() - started
    if not getattr(bundle, "loaded", True):  # a LazyBundle whose exports did all the work
        logger.info("model %s not loaded: its ONNX export embedded (torch not needed)", bundle.name)
    emit({"event": "done"})
    return report


def default_workers(device_type: str, cores: int) -> int:
    """Decode threads for a model on ``device_type`` with ``cores`` CPU cores.

    On the CPU the model needs the cores too, and 4 threads keep it fed; a GPU embeds large photos
    faster than a few cores decode them, so decoding gets every core (up to 16).
    """
    cap = 4 if device_type == "cpu" else 16
    return max(1, min(cap, cores))


def _image_encoder(bundle, backend: str, emit, report: IndexReport):
    """The image encoder for this run (numpy out), or None to run ``bundle.model`` as it is."""
    from clipsearch import backends

    if backend != "auto":
        # forced: its BackendError reaches the user
        return backends.make_image_encoder(bundle, backend, throughput=True)
    if getattr(bundle, "preprocess_cfg", None) is None:
        return None  # a bare model (no pixel settings to calibrate with)
    try:
        plan = backends.auto_plan(bundle)
    except (AttributeError, StopIteration, TypeError):  # not a CLIP module with parameters
        return None
    if plan is None:
        return None  # already in reduced precision on an accelerator: as its user loaded it
    try:
        if backends.needs_measuring(bundle):
            # No verdict for this model here yet: settle on the first batch of these photos rather
            # than make the user wait for exports and measurements (clipsearch.settle does those).
            emit({"event": "backend", "status": "settling"})
        return backends.make_image_encoder(bundle, "auto", settle=True, throughput=True)
    except backends.build_failures() as e:  # a fast path that fails must never end the index run
        report.backend_note = (
            f"auto backend unavailable ({backends.describe_error(e)}); ran the model as loaded"
        )
        return None


class _Run:
    """One index run's state; ``execute`` does the work described in the module docstring."""

    def __init__(
        self,
        library: Library,
        bundle,
        report: IndexReport,
        batch_size: int,
        workers: int,
        emit,
        max_pixels,
        backend: str = "auto",
    ):
        self.lib = library
        self.bundle = bundle
        self.model_id = bundle.model_id
        self.report = report
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.emit = emit
        cfg = getattr(bundle, "preprocess_cfg", None)
        if cfg is not None:  # numpy pixels: the same for every backend, and no torch for ONNX Runtime
            from clipsearch.transform import image_transform

            self.preprocess = image_transform(cfg).array
        else:  # a bare model with its own transform (tensors)
            self.preprocess = bundle.preprocess
        self.backend = backend
        self.encoder = None  # chosen in execute(), once some file needs the model
        self.encoder_failures: tuple[type[BaseException], ...] = ()  # what means "the backend broke"
        # JPEGs decode at a reduced scale that still covers the model's input (see open_image).
        self.draft_size = getattr(cfg, "image_size", None)
        self.max_pixels = max_pixels
        self.settings = _decoder_settings(max_pixels)
        self.batch: list[_Result] = []
        self.reuse: list[_Result] = []
        self.gone_by_hash: dict[str, list[int]] = {}

    # --- planning -----------------------------------------------------------------------------

    def execute(self, found, missing: Sequence[Path] = (), prune: bool = False) -> None:
        lib = self.lib
        rows = {row.stored: row for row in lib.images()}
        embedded = set(lib.embedding_ids(self.model_id).tolist())
        self.known_hashes = lib.embedded_hashes(self.model_id)
        failures = lib.known_failures()
        seen: set[str] = set()
        jobs: list[_Job] = []
        edited: list[int] = []
        for f in found.files:
            stored = lib.stored_path(f.path)
            seen.add(stored)
            row = rows.get(stored)
            if row is not None and row.size == f.size and row.mtime_ns == f.mtime_ns and row.id in embedded:
                self.report.unchanged += 1
                if (found.sidecars or row.sidecar_mtime_ns is not None) and sidecar_stamp(
                    f.path, found.sidecars
                ) != row.sidecar_mtime_ns:
                    edited.append(row.id)  # its sidecar was edited, added or removed since: read again
                continue
            failure = failures.get(stored) if row is None else None
            if failure is not None and (failure.size, failure.mtime_ns, failure.settings) == (
                f.size,
                f.mtime_ns,
                self.settings,
            ):
                self.report.failed.append((f.path, failure.reason))  # the same bad file: not read again
                continue
            jobs.append(_Job(f.path, stored, row))
        # A file that exists but could not be read keeps its row; a dead symlink, or a FIFO/socket/device
        # now where the photo was, means the photo is gone.
        failed_paths = {
            lib.stored_path(p) for p, reason, _ in found.failed if reason not in _PHOTO_GONE_REASONS
        }
        scanned = [*found.roots, *missing]
        gone_paths = [
            stored
            for stored, row in rows.items()
            if stored not in seen
            and stored not in failed_paths
            and _inside_any(row.path, scanned)
            and not _inside_any(row.path, found.unreadable_dirs)
        ]
        if not prune:
            # A photo still on disk that this run did not select (hidden, without --include-hidden;
            # left out by --exclude) is not gone: its row, embeddings and labels stay (--prune removes).
            reported = {lib.stored_path(p) for p, _, _ in found.failed}
            gone_paths = [p for p in gone_paths if p in reported or not os.path.isfile(rows[p].path)]
        gone = [rows[p] for p in self._hold_back(gone_paths, rows, found, missing, prune)]
        for row in gone:
            if row.id in embedded:
                self.gone_by_hash.setdefault(row.content_hash, []).append(row.id)
        self.gone_ids = {row.id for row in gone}

        with lib.transaction():
            for path, reason, detail in found.failed:
                lib.record_error(path, reason, detail)
                self.report.failed.append((path, reason))
            lib.mark_metadata_stale(edited)  # refresh_metadata below reads them: headers and sidecar only
        self.emit({"event": "start", "total": len(jobs)})
        self._pipeline(jobs)
        self._finish(found)
        self.report.metadata = refresh_metadata(lib, found.roots, self.workers)

    def _hold_back(
        self, gone: list[str], rows: dict, found, missing: Sequence[Path], prune: bool
    ) -> list[str]:
        """``gone`` (stored paths) without those of folders :func:`removal_hold` keeps, which the
        report lists; notes the device of every folder that removed freely, for the next run."""
        lib = self.lib
        self.devices: dict[Path, int] = {}
        kept: set[str] = set()
        for root in [*found.roots, *missing]:
            exists = root not in missing
            device = os.stat(root).st_dev if exists and os.path.isdir(root) else None
            mine_gone = [p for p in gone if _inside_any(rows[p].path, [root])]
            reason = removal_hold(
                exists=exists,
                known=sum(1 for row in rows.values() if _inside_any(row.path, [root])),
                found=sum(1 for f in found.files if _inside_any(f.path, [root])),
                gone=len(mine_gone),
                device=device,
                device_before=lib.folder_device(root) if device is not None else None,
            )
            if reason is not None and not prune:
                kept.update(mine_gone)
                self.report.kept.append(KeptFolder(root, len(mine_gone), reason))
            elif device is not None:
                self.devices[root] = device
        return [p for p in gone if p not in kept]

    # --- the pipeline -------------------------------------------------------------------------

    def _choose_encoder(self) -> None:
        """The image backend for this run (loading it takes seconds: only for a run with files to read)."""
        self.encoder = _image_encoder(self.bundle, self.backend, self.emit, self.report)
        if self.encoder is not None:
            from clipsearch.backends import build_failures

            self.encoder_failures = build_failures()
        self.emit({"event": "backend", "name": self.encoder.name if self.encoder else "model"})

    def _pipeline(self, jobs: list[_Job]) -> None:
        from clipsearch.backends import bounded_heap

        bounded_heap()  # before the decode threads start: each would otherwise grow an arena of its own
        window = 2 * self.batch_size + self.workers  # bounded: files in flight at most
        pending: deque[Future] = deque()
        todo = iter(jobs)
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="clipsearch-decode") as pool:
            try:
                # The first photos decode while the backend loads (an ONNX session, or the model):
                # otherwise the decode threads would wait for it with the cores idle.
                pending.extend(pool.submit(self._prepare, job) for job in itertools.islice(todo, window))
                if pending:
                    self._choose_encoder()
                for job in todo:
                    pending.append(pool.submit(self._prepare, job))
                    if len(pending) >= window:
                        self._consume(pending.popleft().result())
                while pending:
                    self._consume(pending.popleft().result())
                self._flush()
            finally:
                for f in pending:
                    f.cancel()

    def _prepare(self, job: _Job) -> _Result:
        """In a worker thread: read and hash the file, then decode it unless its content is known."""
        res = _Result(job)
        try:
            # O_NONBLOCK: should a FIFO replace the file after the walk, opening it cannot hang.
            fd = os.open(job.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            res.error = (oserror_reason(e), e.strerror or str(e))
            return res
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                res.error = ("not a regular file", "replaced while indexing")
                return res
            res.size, res.mtime_ns = st.st_size, st.st_mtime_ns
            if st.st_size == 0:
                res.error = ("empty file", "zero bytes")
                return res
            # Its header first: a non-image or a bomb is refused before its bytes are read into memory.
            with open(fd, "rb", closefd=False) as head:
                check_header(head, job.path, self.max_pixels)
            os.lseek(fd, 0, os.SEEK_SET)  # the header read moved the shared offset
            # The bytes are kept only until decoded: hash and pixels then come from the same read,
            # even if the file changes meanwhile.
            res.content_hash, data = read_and_hash(fd, keep=True)
        except ImageDecodeError as e:
            res.error = (e.reason, e.detail)
            return res
        except OSError as e:
            res.error = (oserror_reason(e), e.strerror or str(e))
            return res
        finally:
            os.close(fd)
        res.meta = _read_metadata(data, job.path)
        if res.content_hash in self.known_hashes:
            return res
        try:
            image = open_image(io.BytesIO(data), max_pixels=self.max_pixels, draft_size=self.draft_size)
            del data
            res.tensor = self.preprocess(image)
        except ImageDecodeError as e:
            res.error = (e.reason, e.detail)
        except OSError as e:
            res.error = (oserror_reason(e), e.strerror or str(e))
        except Exception as e:  # a decoder bug on one odd file must not end the run: counted below
            res.error = ("decode-failed", f"{type(e).__name__}: {e}")
        return res

    def _consume(self, res: _Result) -> None:
        if res.error is not None:
            self._fail(res)
        elif res.tensor is None:
            self.reuse.append(res)
            if len(self.reuse) >= 4 * self.batch_size:
                self._flush()
        else:
            self.batch.append(res)
            if len(self.batch) >= self.batch_size:
                self._flush()

    def _fail(self, res: _Result) -> None:
        job = res.job
        with self.lib.transaction():
            verdict = res.error[0] not in _NOT_READ  # about the content, not about access to it
            if job.row is not None and verdict and res.content_hash != job.row.content_hash:
                # Its new content is no photo: the old embedding describes nothing. A file that could
                # not be read this time (permission, I/O error, vanished, mid-copy) keeps its row.
                self.report.removed += self.lib.remove_images([job.row.id])
            self.lib.record_error(
                job.path,
                res.error[0],
                res.error[1],
                size=res.size,
                mtime_ns=res.mtime_ns,
                settings=self.settings,
            )
        self.report.failed.append((job.path, res.error[0]))
        self.emit({"event": "advance", "n": 1})

    def _embed(self, results: list[_Result]) -> np.ndarray:
        if self.encoder is not None:
            try:
                feats = self.encoder(_stack([r.tensor for r in results]))  # [B, D] numpy
            except self.encoder_failures as e:
                from clipsearch.backends import BackendError, describe_error

                if self.backend != "auto":
                    raise BackendError(
                        f"the {self.backend} backend failed ({describe_error(e)}); the batches done so far "
                        "are saved: run index again with --backend auto"
                    ) from e
                self.report.backend_note = (
                    f"{self.encoder.name} failed ({describe_error(e)}); ran the model as loaded"
                )
                self.encoder = None
            else:
                if np.all(np.isfinite(feats)):
                    self.report.backend = self.encoder.name
                    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
                # NaN or inf for some photo: a half-precision copy that overflowed on it, or damaged
                # weights. Never stored (it would poison every search); the model as loaded decides.
                from clipsearch.backends import BackendError

                if self.backend != "auto":
                    raise BackendError(
                        f"the {self.backend} backend gave NaN or infinite features; the batches done so "
                        "far are saved: run index again with --backend auto"
                    )
                self.report.backend_note = (
                    f"{self.encoder.name} gave NaN or infinite features; ran the model as loaded"
                )
                self.encoder = None
        import torch

        self.report.backend = "model"
        model = self.bundle.model
        with torch.inference_mode():
            x = torch.as_tensor(_stack([r.tensor for r in results])).to(
                model.device, model.dtype
            )  # [B, 3, H, W]
            feats = model.encode_image(x).float()  # [B, D]
            if not bool(torch.isfinite(feats).all()):
                raise ModelLoadError(
                    f"the model {self.bundle.name} gives NaN or infinite features: its weights are damaged, "
                    "or the training run that made them diverged. Nothing of it was stored for these photos; "
                    "the photos indexed before are kept"
                )
            feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return feats.cpu().numpy()

    def _flush(self) -> None:
        """Embed the batch, then commit it and the pending reuses in one transaction."""
        if not self.batch and not self.reuse:
            return
        vectors = self._embed(self.batch) if self.batch else None
        lib, report = self.lib, self.report
        with lib.transaction():
            if vectors is not None:
                lib.set_model_dim(self.model_id, vectors.shape[1])
            for res, vector in zip(self.batch, vectors if vectors is not None else [], strict=True):
                row = res.job.row
                if row is not None and row.content_hash == res.content_hash:
                    # Same content, first embedding of this model: keep the row and other models' vectors.
                    image_id = row.id
                    lib.touch_image(image_id, res.size, res.mtime_ns)
                    lib.clear_errors([res.job.path])
                else:
                    image_id = self._add(res)
                if res.meta is not None:
                    lib.set_metadata(image_id, res.meta, METADATA_VERSION)
                lib.put_embedding(image_id, self.model_id, vector)
                if row is None or row.content_hash == res.content_hash:
                    report.new += 1  # a new file, or known content's first embedding of this model
                else:
                    report.updated += 1
            for res in self.reuse:
                self._apply_reuse(res)
        for res in self.batch:
            self.known_hashes.add(res.content_hash)
        done = len(self.batch) + len(self.reuse)
        self.batch, self.reuse = [], []
        self.emit({"event": "advance", "n": done})

    def _add(self, res: _Result) -> int:
        return self.lib.add_image(
            res.job.path, size=res.size, mtime_ns=res.mtime_ns, content_hash=res.content_hash
        )

    def _apply_reuse(self, res: _Result) -> None:
        lib, report, job = self.lib, self.report, res.job
        if job.row is not None and job.row.content_hash == res.content_hash:
            if lib.has_embedding(job.row.id, self.model_id):  # same bytes, new mtime (touched or copied)
                lib.touch_image(job.row.id, res.size, res.mtime_ns)
                lib.clear_errors([job.path])
                report.unchanged += 1
                return
        candidates = self.gone_by_hash.get(res.content_hash)
        while candidates:
            old_id = candidates.pop()
            if lib.has_image(old_id):
                lib.move_image(old_id, job.path, res.size, res.mtime_ns)
                self.gone_ids.discard(old_id)
                report.moved += 1
                return
        source = lib.embedded_twin(res.content_hash, self.model_id)
        if source is None:
            # The content's only embedded copy vanished meanwhile: embed it next time round.
            lib.record_error(job.path, "retry", "its known twin disappeared during the run")
            report.failed.append((job.path, "retry"))
            return
        new_id = self._add(res)
        if res.meta is not None:
            lib.set_metadata(new_id, res.meta, METADATA_VERSION)
        else:
            lib.copy_metadata(source.id, new_id)
        lib.copy_embeddings(source.id, new_id)
        if job.row is None:
            report.duplicates += 1
        else:
            report.updated += 1

    # --- the end ------------------------------------------------------------------------------

    def _finish(self, found) -> None:
        lib = self.lib
        with lib.transaction():
            self.report.removed += lib.remove_images(sorted(self.gone_ids))
            for folder, device in self.devices.items():
                lib.record_folder_device(folder, device)
            held = [k.path for k in self.report.kept]
            failed_now = {lib.stored_path(p) for p, _ in self.report.failed}

            def keep(path: Path) -> bool:
                # An error stays while its file is outside what was scanned, or failed again now.
                if not _inside_any(path, found.roots) or _inside_any(path, held):
                    return True
                return lib.stored_path(path) in failed_now

            lib.clear_errors_where(keep)


METADATA_BATCH = 500  # rows per transaction while filling metadata in


def _stack(pixels: list):
    """Preprocessed images ``[3, H, W]`` -> one batch ``[B, 3, H, W]``: numpy arrays stay numpy (no
    torch import on the ONNX path); tensors (a bare model's own transform) stay tensors."""
    if all(isinstance(p, np.ndarray) for p in pixels):
        return np.stack(pixels)
    import torch

    return torch.stack([torch.as_tensor(p) for p in pixels])


def refresh_metadata(library: Library, roots: Sequence[Path], workers: int = 4) -> int:
    """Read the metadata of photos under ``roots`` indexed by an older extractor (headers only: no
    pixel is decoded, no embedding changes). A file that cannot be read now is marked read with
    what is known, so it is not retried every run; a changed file is read again by the index run
    anyway. Returns how many rows were updated."""
    from clipsearch.metadata import PhotoMetadata, read_metadata

    stale = library.metadata_stale_ids(METADATA_VERSION)
    if not stale:
        return 0
    paths = {i: p for i, p in library.image_paths(sorted(stale)).items() if _inside_any(p, roots)}

    def read(item: tuple[int, Path]) -> tuple[int, PhotoMetadata]:
        image_id, path = item
        try:
            return image_id, read_metadata(path)
        except (ImageDecodeError, OSError) as e:
            logger.info("no metadata for %s: %s", path, e)
        except Exception:  # a parser bug on one odd file costs its metadata, never the run
            logger.warning("could not read the metadata of %s", path, exc_info=True)
        return image_id, PhotoMetadata()

    items = sorted(paths.items())
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="clipsearch-meta") as pool:
        for start in range(0, len(items), METADATA_BATCH):
            found = list(pool.map(read, items[start : start + METADATA_BATCH]))
            with library.transaction():
                for image_id, meta in found:
                    library.set_metadata(image_id, meta, METADATA_VERSION)
    logger.info("read the metadata of %d photo(s) indexed before it was stored", len(items))
    return len(items)


def _inside_any(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path`` is one of ``roots`` or below one (string prefixes: fast on big libraries)."""
    text = str(path)
    for root in roots:
        r = str(root)
        if text == r or text.startswith(r.rstrip("/") + "/"):
            return True
    return False
