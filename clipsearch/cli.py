"""The ``clipsearch`` command: thin click commands over the library's jobs; rich renders the output.

Each command parses its options, calls one library function and renders the result (a rich table
for people, ``--json`` for programs). Errors: a :class:`ClipsearchError` becomes one line
``Error: ...`` on stderr and exit 1; click usage errors exit 2; anything else is a bug, shown as one
line (the traceback with ``--verbose``) and exit 1; Ctrl-C exits 130.

Start-up stays cheap: torch, faiss and PIL are imported inside the commands that need them, so
``clipsearch --help`` (and a failing ``clipsearch query`` on a missing library) never load them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

import click

from clipsearch import __version__, choices
from clipsearch.errors import ClipsearchError, LibraryError, ModelLoadError
from clipsearch.names import one_line, printable

DEFAULT_MODEL = "ViT-B-32/openai"
MAX_FAILURES_SHOWN = 20
MAX_LABEL_ROWS = 200  # a table longer than this helps nobody; the summary counts and --json do


# --------------------------------------------------------------------------------------------------
# Output helpers


class _PrintableStream:
    """Wraps stdout/stderr for rich: every string written goes through :func:`printable`."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(printable(text))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(printable(text))


def _console(stderr: bool = False):
    from rich.console import Console

    stream = _PrintableStream(sys.stderr if stderr else sys.stdout)
    return Console(file=stream, stderr=stderr, highlight=False, soft_wrap=True)


def _echo_json(data) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A non-UTF-8 file name: \udcXX escapes keep it exact (json.loads + os.fsencode give its bytes).
        text = json.dumps(data, indent=2, ensure_ascii=True, default=str)
    click.echo(text)


class _Group(click.Group):
    """Turns every failure of a subcommand into one line and an exit code (see the module doc)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except ClipsearchError as e:
            _maybe_trace(ctx)
            raise click.ClickException(one_line(e)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            raise click.exceptions.Exit(130) from None
        except BrokenPipeError:
            # `clipsearch query ... --paths | head`: the reader left; not an error of ours.
            sys.stderr.close()
            raise click.exceptions.Exit(0) from None
        except OSError as e:
            # The environment, not clipsearch: a full disk, a permission, a vanished file.
            _maybe_trace(ctx)
            where = f": {printable(str(e.filename))}" if e.filename else ""
            raise click.ClickException(printable(e.strerror or one_line(e)) + where) from None
        except Exception as e:
            _maybe_trace(ctx)
            hint = "" if _verbose(ctx) else " (run again with --verbose to see the traceback)"
            raise click.ClickException(
                f"internal error, this is a bug in clipsearch: {type(e).__name__}: {one_line(e)}{hint}"
            ) from None


def _verbose(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("verbose") or getattr(root.obj, "verbose", False))


def _maybe_trace(ctx: click.Context) -> None:
    if _verbose(ctx):
        traceback.print_exc(file=sys.stderr)


class _State:
    def __init__(self, db: Path | None, verbose: bool):
        self.db = db
        self.verbose = verbose

    def db_path(self) -> Path:
        if self.db is not None:
            return self.db
        from clipsearch.paths import default_library_path

        return default_library_path()

    def open_library(self, create: bool = False):
        from clipsearch.store import Library

        return Library.open(self.db_path(), create=create)


_pass_state = click.make_pass_decorator(_State)


def _set_db(ctx: click.Context, param, value):
    if value is not None:
        ctx.find_object(_State).db = value
    return value


def pass_state(func):
    """Pass the :class:`_State`, and accept ``--db`` after the subcommand as well as before it."""
    func = _pass_state(func)
    return click.option(
        "--db",
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_set_db,
        help="Library database file (as `clipsearch --db FILE COMMAND`).",
    )(func)


def _set_verbose(ctx: click.Context, param, value: bool) -> None:
    state = ctx.find_object(_State)
    if value and state is not None and not state.verbose:  # `query --verbose` as `--verbose query`
        state.verbose = True
        _setup_logging(True)


_verbose_option = click.option(
    "--verbose",
    "-v",
    is_flag=True,
    expose_value=False,
    callback=_set_verbose,
    help="Say on stderr which way the query went (daemon, torch-free text tower or model) and why.",
)


class _BadValue(click.ClickException):
    """A bad value of an option that only the command can judge (a filter): one line, and the exit
    status of a usage error, as click gives its own bad values (docs/cli.md's table)."""

    exit_code = 2


class _Text(click.ParamType):
    """Free text (a query, a class name, a camera): it is embedded and matched against the library's
    own text, so it must be valid UTF-8. Bytes that are not (a terminal set to another encoding)
    are refused as a bad value, instead of failing deep inside."""

    name = "text"

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                self.fail(
                    f"'{shown}' is not UTF-8 text (is the terminal set to another encoding?)", param, ctx
                )
        return value


TEXT = _Text()

_FILTER_KEYS = ("after", "before", "camera", "near", "within_km", "types", "under")


def filter_options(func):
    """The photo filters shared by query, similar, label and duplicates: the command receives them as
    one ``photo_filter`` (a :class:`clipsearch.filters.PhotoFilter`)."""
    import functools

    from clipsearch.filters import DEFAULT_WITHIN_KM, FilterError, PhotoFilter

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        values = {k: kwargs.pop(k) for k in _FILTER_KEYS}
        try:
            kwargs["photo_filter"] = PhotoFilter.parse(**values)
        except FilterError as e:
            raise _BadValue(str(e)) from None
        return func(*args, **kwargs)

    options = [
        click.option(
            "--after", metavar="DATE", help="Only photos taken on or after DATE (YYYY-MM-DD, YYYY-MM, YYYY)."
        ),
        click.option("--before", metavar="DATE", help="Only photos taken before DATE (not on it)."),
        click.option(
            "--camera",
            type=TEXT,
            metavar="TEXT",
            help="Only photos whose camera make or model contains TEXT (any case).",
        ),
        click.option(
            "--near", metavar="LAT,LON", help="Only photos taken near this point (decimal degrees)."
        ),
        click.option(
            "--within",
            "within_km",
            type=float,
            metavar="KM",
            help=f"How far from --near, in km (default: {DEFAULT_WITHIN_KM:g}).",
        ),
        click.option(
            "--type", "types", metavar="TYPES", help="Only these file types, e.g. jpg,png,heic,raw."
        ),
        click.option(
            "--in", "under", type=click.Path(path_type=Path), help="Only photos inside this folder."
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="CLIPSEARCH_DB",
    help="Library database file (default: library.db in the clipsearch home, $CLIPSEARCH_HOME). "
    "Keep it inside the photo folder to store paths relative to it.",
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Say which way each step went (e.g. which encoder answered a query, and why) on stderr, "
    "and show the full traceback when something fails.",
)
@click.version_option(__version__, prog_name="clipsearch")
@click.pass_context
def cli(ctx: click.Context, db: Path | None, verbose: bool) -> None:
    """Semantic search over your photos with CLIP: index a folder, then search it with words or images."""
    ctx.obj = _State(db, verbose)
    _setup_logging(verbose)


def _setup_logging(verbose: bool) -> None:
    """The library logs each choice and fallback (``logging``); they reach stderr here: every one
    with ``--verbose``, else only warnings (``Note: ...``)."""
    import logging

    handler = logging.StreamHandler(_PrintableStream(sys.stderr))
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if verbose else "Note: %(message)s"))
    root = logging.getLogger("clipsearch")
    for old in [h for h in root.handlers if getattr(h, "_clipsearch_cli", False)]:
        root.removeHandler(old)  # a second invocation in one process (tests) replaces the first
    handler._clipsearch_cli = True
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    root.propagate = False


def _top_option(func):
    return click.option(
        "--top", "-n", type=click.IntRange(min=1), default=20, show_default=True, help="How many results."
    )(func)


def _output_options(func):
    options = [
        click.option(
            "--json", "as_json", is_flag=True, help="Print a JSON array of results with their metadata."
        ),
        click.option("--paths", "as_paths", is_flag=True, help="Print one path per line (for pipes)."),
        click.option(
            "--table", "as_table", is_flag=True, help="Print the table even into a pipe (e.g. for less -S)."
        ),
        click.option(
            "--null", "-0", "null", is_flag=True, help="Print paths separated by NUL bytes (for xargs -0)."
        ),
        click.option(
            "--html",
            "html_out",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Write a results page.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _check_output_options(as_json: bool, as_paths: bool, null: bool, as_table: bool = False) -> None:
    if sum((as_json, as_paths, null, as_table)) > 1:
        raise click.UsageError("--json, --paths, --null and --table are alternatives: pick one")


# --------------------------------------------------------------------------------------------------
# Models


def _load_bundle(source: str, quiet: bool = False, device: str = "cpu", library=None):
    """Load a model on ``device`` (``auto`` picks one), with a download progress bar on stderr when it
    has to be fetched. With ``library``, the bundle's id is the one that library knows the model under
    (an older library may have recorded it under its weights-only id: see ``clipsearch.identity``)."""
    from rich.markup import escape
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from clipsearch.checkpoints import load_bundle
    from clipsearch.devices import resolve_device

    device = resolve_device(device)

    progress = Progress(
        TextColumn(f"downloading {escape(printable(str(source)))}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=_console(stderr=True),
        transient=True,
        disable=quiet,
    )
    task = None

    def on_bytes(done: int, total: int | None) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task("download", total=total)
        progress.update(task, completed=done, total=total)

    try:
        return load_bundle(source, device=device, progress=on_bytes, library=library)
    except OSError as e:
        where = f" ({printable(str(e.filename))})" if e.filename else ""
        raise ModelLoadError(f"cannot read the model {source}: {e.strerror or e}{where}") from e
    finally:
        if task is not None:
            progress.stop()


def _model_loader(device: str):
    """How the query pipeline loads a model here: with a download bar, on ``device``."""
    return lambda source, library: _load_bundle(source, device=device, library=library)


def _open_bundle(source: str, quiet: bool = False, device: str = "cpu", library=None):
    """The model as :func:`clipsearch.checkpoints.open_bundle` gives it: built in torch only when a
    step needs it (an ONNX export answers otherwise), loaded through :func:`_load_bundle` (progress
    bar, errors in one line) when it is."""
    from clipsearch.checkpoints import open_bundle

    return open_bundle(
        source,
        device,
        library=library,
        load=lambda on: _load_bundle(source, quiet=quiet, device=on, library=library),
    )


def _source_for_record(source: str) -> str:
    """How to find the model again later: a path model is recorded as an absolute path."""
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() else source


def _device_option(help_text: str):
    from clipsearch.devices import DEVICES

    return click.option(
        "--device", type=click.Choice(DEVICES), default="auto", show_default=True, help=help_text
    )


def _open_existing(state: _State):
    """Open the library for a read command, failing with one line when there is none."""
    return state.open_library(create=False)


# --------------------------------------------------------------------------------------------------
# index


class _IndexProgress:
    """A rich progress bar (images/s, ETA) fed by the indexer's progress events."""

    def __init__(self, enabled: bool):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.found = 0
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]indexing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=_console(stderr=True),
            disable=not enabled,
        )
        self.task = None

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "scan":
            self.found = int(event.get("found", 0))
        elif kind == "start" and event.get("total"):
            self.progress.start()
            self.task = self.progress.add_task("index", total=int(event.get("total", 0)), rate="")
        elif kind == "advance" and self.task is not None:
            self.progress.advance(self.task, int(event.get("n", 1)))
            speed = self.progress.tasks[0].speed
            self.progress.update(self.task, rate=f"{speed:.1f} images/s" if speed else "")
        elif kind == "done":
            self.stop()

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None


def _report_json(report, model_name: str) -> dict:
    return {
        "model_id": report.model_id,
        "model_name": model_name,
        "new": report.new,
        "updated": report.updated,
        "moved": report.moved,
        "duplicates": report.duplicates,
        "removed": report.removed,
        "unchanged": report.unchanged,
        "failed": [{"path": str(p), "reason": r} for p, r in report.failed],
        "kept": [{"path": str(k.path), "photos": k.photos, "reason": k.reason} for k in report.kept],
        "seconds": round(report.seconds, 3),
        "backend": report.backend or None,
        "backend_note": report.backend_note or None,
        "metadata": report.metadata,
    }


def _render_report(report, model_name: str, library_path: Path) -> None:
    from rich.table import Table
    from rich.text import Text

    out = _console()
    # A line of its own, not the table's title: a title wraps at the table's width, mid-path.
    out.print(Text(f"Indexed with {model_name} in {report.seconds:.1f} s", style="italic"), soft_wrap=True)
    table = Table()
    for name in ("new", "updated", "moved", "duplicates", "removed", "unchanged", "failed"):
        table.add_column(name, justify="right")
    table.add_row(
        *(
            str(v)
            for v in (
                report.new,
                report.updated,
                report.moved,
                report.duplicates,
                report.removed,
                report.unchanged,
                len(report.failed),
            )
        )
    )
    out.print(table)
    if report.backend:
        out.print(f"Image backend: {report.backend}", markup=False, style="dim")
    if report.backend_note:
        out.print(f"[yellow]Note:[/yellow] {report.backend_note}")
    if report.metadata:
        out.print(
            f"Read the dates, cameras and places of {report.metadata} photo(s) indexed before clipsearch "
            "kept them (no photo was embedded again).",
            markup=False,
            style="dim",
        )
    if report.failed:
        out.print(f"[yellow]Skipped {len(report.failed)} file(s):[/yellow]")
        for path, reason in report.failed[:MAX_FAILURES_SHOWN]:
            out.print(f"  {reason}: {path}", markup=False)
        if len(report.failed) > MAX_FAILURES_SHOWN:
            out.print(f"  ... and {len(report.failed) - MAX_FAILURES_SHOWN} more: see `clipsearch status`")
    for line in _kept_lines(report):
        out.print(line, markup=False, style="yellow")
    out.print(f"Library: {library_path}", markup=False)


def _kept_lines(report) -> list[str]:
    """One line per folder whose vanished photos the run kept (see indexer.removal_hold)."""
    return [
        f"Kept {k.photos} photo(s) under {k.path} that were not found: {k.reason}; "
        f"run `clipsearch index --prune {k.path}` to remove them"
        for k in report.kept
    ]


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model",
    metavar="SOURCE",
    help=f"Model: a registered name, a weights file or a model folder "
    f"(default: the library's model, else {DEFAULT_MODEL}).",
)
@click.option(
    "--exclude", multiple=True, metavar="GLOB", help="Skip files and folders matching GLOB (repeatable)."
)
@click.option(
    "--include-hidden", is_flag=True, help="Also index hidden files and folders (names starting with '.')."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per model call."
)
@click.option(
    "--workers", type=click.IntRange(min=1), help="Threads that read and decode images (default: up to 4)."
)
@click.option(
    "--index-kind",
    type=click.Choice(("auto", *choices.INDEX_KINDS)),
    default="auto",
    show_default=True,
    help="Vector index to build now: exact 'flat', approximate 'ivf' (exact scans of a few cells), 'ivfpq' "
    "(compact codes, exact re-rank: fast without cluster structure) or 'hnsw' (a graph, slow to build), or "
    "'auto' (flat below 50,000 photos, else ivf, or ivfpq where that reads less at the same recall; an "
    "existing index keeps its kind).",
)
@click.option(
    "--backend",
    type=click.Choice(("auto", *choices.IMAGE_BACKENDS)),
    default="auto",
    show_default=True,
    help="Image inference backend: 'auto' picks the fastest one measured faithful (cosine >= 0.995 "
    "to fp32) on this machine, once per model; or force one.",
)
@click.option(
    "--prune",
    is_flag=True,
    help="Also remove the photos of a scanned folder that is missing, empty, on another drive than "
    "last time, or mostly gone (kept without it, in case a drive is not mounted).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_device_option("Where the model runs: a CUDA GPU or Apple's MPS when there is one (auto), or as named.")
@pass_state
def index(
    state: _State,
    paths,
    model,
    exclude,
    include_hidden,
    batch_size,
    workers,
    index_kind,
    backend,
    prune,
    as_json,
    device,
):
    """Add the photos under PATH... to the library, or bring it up to date.

    Unchanged files are skipped; moved and duplicate files reuse their embeddings; files deleted
    from the scanned folders are removed. A folder that is missing, empty or on another drive than
    last time (a drive not mounted), or a run that would remove most of a folder's photos, keeps
    them: --prune removes them. Unreadable files are skipped, kept and listed at the end.
    """
    from clipsearch.indexer import index_paths
    from clipsearch.vectors import VectorIndex

    with state.open_library(create=True) as library, _discarded_when_left_empty(library):
        unknown = [p for p in paths if not os.path.lexists(p) and not library.image_ids_under(p)]
        if unknown:  # before loading (maybe downloading) a model; a missing folder with photos is kept
            raise ClipsearchError(f"no such file or folder: {unknown[0]}")
        if model is None:
            known = library.default_model_id()
            model = library.model_source(known) if known is not None else DEFAULT_MODEL
        if _would_download(model) and all(os.path.lexists(p) for p in paths):
            # A download of hundreds of MB for a folder with nothing to index is a bad first
            # impression: look first (only then, so a normal run walks the folders once).
            from clipsearch.walk import walk

            if not walk(list(paths), exclude=exclude, include_hidden=include_hidden).files:
                raise _no_images(paths)
        bundle = _open_bundle(model, quiet=as_json, device=device, library=library)
        progress = _IndexProgress(enabled=not as_json)
        try:
            report = index_paths(
                library,
                bundle,
                list(paths),
                exclude=exclude,
                include_hidden=include_hidden,
                batch_size=batch_size,
                workers=workers,
                progress=progress,
                source=_source_for_record(model),
                backend=backend,
                prune=prune,
            )
        finally:
            progress.stop()
        if progress.found:
            # Bring the FAISS index in step now, so the first query does not pay for it.
            VectorIndex.for_library(library, bundle.model_id, kind=index_kind)
            _settle_or_export(bundle, model, backend, as_json)
            # An approximate index built before the text tower was exported (just now, unless in
            # the background) is retuned with the model's text probes (vectors.py: modality gap).
            VectorIndex.for_library(library, bundle.model_id, retune=True)
        if progress.found or (report.removed and not report.kept):
            if as_json:
                _echo_json(_report_json(report, library.model_name(report.model_id)))
            else:
                _render_report(report, library.model_name(report.model_id), library.path)
        if progress.found == 0 and report.kept:  # nothing there at all: a drive not mounted, most likely
            if as_json:
                _echo_json(_report_json(report, library.model_name(report.model_id)))
            raise ClipsearchError(" ".join(_kept_lines(report)))
        if progress.found == 0 and not report.removed:
            raise _no_images(paths, report.failed)


@contextlib.contextmanager
def _discarded_when_left_empty(library):
    """A library this run created is deleted again if the run fails with no photo in it."""
    try:
        yield
    except BaseException:
        library.discard_if_empty()
        raise


def _would_download(source: str) -> bool:
    """Whether loading ``source`` would download it first (a registered name not fetched yet)."""
    from clipsearch.pretrained import cached_pretrained, list_pretrained

    return source in list_pretrained() and source not in cached_pretrained()


def _no_images(paths, failed=()) -> ClipsearchError:
    where = ", ".join(str(p) for p in paths)
    if failed:  # files named like photos that could not be read: say why, not "none found"
        path, reason = failed[0]
        more = f" (and {len(failed) - 1} more, listed by `clipsearch status`)" if len(failed) > 1 else ""
        return ClipsearchError(f"nothing indexed under {where}: {path}: {reason}{more}")
    return ClipsearchError(
        f"no images found under {where}: looked for JPEG, PNG, WebP, GIF, TIFF, BMP, HEIC "
        "and AVIF files (hidden ones only with --include-hidden)"
    )


# --------------------------------------------------------------------------------------------------
# query


@cli.command()
@click.argument("text", required=False, type=TEXT)
@click.option("--image", type=click.Path(path_type=Path), help="Query by example: photos like this image.")
@click.option("--add", multiple=True, type=TEXT, metavar="TEXT", help="Add a text to the query (repeatable).")
@click.option(
    "--minus", multiple=True, type=TEXT, metavar="TEXT", help="Subtract a text from the query (repeatable)."
)
@click.option(
    "--add-image", multiple=True, type=click.Path(path_type=Path), help="Add an image (repeatable)."
)
@click.option(
    "--minus-image", multiple=True, type=click.Path(path_type=Path), help="Subtract an image (repeatable)."
)
@click.option(
    "--minus-weight",
    type=float,
    default=1.0,
    show_default=True,
    help="Weight of each --minus/--minus-image part (try 0.5 for a gentler push away).",
)
@_top_option
@click.option(
    "--threshold", type=click.FloatRange(-1.0, 1.0), help="Only results with a cosine score at least this."
)
@filter_options
@_output_options
@click.option("--model", metavar="SOURCE", help="Model to query with (default: the library's).")
@click.option(
    "--index-kind",
    type=click.Choice(("auto", *choices.INDEX_KINDS)),
    default="auto",
    show_default=True,
    help="Vector index kind.",
)
@_device_option(
    "Where the model runs when one is loaded (image parts, --model). auto: a text query uses the torch-free "
    "CPU path (faster than starting a GPU), else the GPU when there is one."
)
@_verbose_option
@pass_state
def query(
    state: _State,
    text,
    image,
    add,
    minus,
    add_image,
    minus_image,
    minus_weight,
    top,
    threshold,
    photo_filter,
    as_json,
    as_paths,
    as_table,
    null,
    html_out,
    model,
    index_kind,
    device,
):
    """Find the photos that best match TEXT (and/or --image), best first.

    Combine parts: `clipsearch query beach --minus people`, or `--image a.jpg --add "at night"`.
    Scores are cosine similarities between the query and each photo. Into a pipe, each result is
    a line `score<TAB>path`.
    """
    # numpy's OpenBLAS starts a thread per core when imported (a query's numpy work is a few 512-d
    # vectors); an explicit setting of the user's wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from clipsearch.search import Query, Searcher

    _check_output_options(as_json, as_paths, null, as_table)
    if text is None and image is None and not add and not add_image:
        raise click.UsageError("give a TEXT, --image PATH, --add TEXT or --add-image PATH")
    from clipsearch.walk import why_not_a_file

    for p in [image, *add_image, *minus_image]:
        why = why_not_a_file(p) if p is not None else None
        if why is not None:
            raise ClipsearchError(f"query image {p}: {why}")
    q = Query.build(text, image, add, minus, add_image, minus_image, minus_weight=minus_weight)
    with Searcher(state.db_path(), device=device, load_model=_model_loader(device)) as searcher:
        hits = searcher.run(q, top, photo_filter, threshold, index_kind, model=model).hits
    _note_cut_texts(state, q)
    _show_hits(
        state, hits, q.describe(), photo_filter, threshold, as_json, as_paths, null, as_table, html_out
    )


def _hit_json(rank: int, hit, record) -> dict:
    """One result of ``query``/``similar --json``: the hit and what the library knows of the photo."""
    from clipsearch.metadata import camera_name

    return {
        "rank": rank,
        "path": str(hit.path),
        "score": round(hit.score, 6),
        "image_id": hit.image_id,
        "taken_at": record.taken_at if record else None,
        "camera": camera_name(record.camera_make, record.camera_model) if record else None,
        "width": record.width if record else None,
        "height": record.height if record else None,
        "lat": record.lat if record else None,
        "lon": record.lon if record else None,
    }


def _is_stdout(path) -> bool:
    """Whether ``path`` is this process's standard output (``/dev/stdout``, or the file or pipe it goes to)."""
    try:
        a, b = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _show_hits(
    state, hits, description: str, photo_filter, threshold, as_json, as_paths, null, as_table, html_out
):
    """Render results as the options ask: an HTML page, JSON, paths, TSV into a pipe, or a table."""
    if html_out is not None:
        from clipsearch.report import write_html

        written = write_html(hits, html_out, title=f"clipsearch: {description}", query_desc=description)
        _console(stderr=True).print(f"Wrote {len(hits)} result(s) to {written}", markup=False)
        if _is_stdout(html_out):
            return  # the page is the output (`--html /dev/stdout`): no table or lines after it
    if as_json:
        records = {}
        if hits:
            with _open_existing(state) as library:
                records = library.images_by_id([h.image_id for h in hits])
        _echo_json([_hit_json(n, h, records.get(h.image_id)) for n, h in enumerate(hits, start=1)])
    elif as_paths or null:
        if not hits:  # stdout stays empty (zero results, zero paths); the reason goes to stderr
            _say_why_nothing(description, photo_filter, threshold, to_stderr=True)
        end = b"\0" if null else b"\n"
        for h in hits:
            click.echo(os.fsencode(h.path) + end, nl=False)  # the exact bytes, for xargs and friends
    elif html_out is None or hits:
        if not hits:
            _say_why_nothing(
                description, photo_filter, threshold, to_stderr=not as_table and not sys.stdout.isatty()
            )
        elif not as_table and not sys.stdout.isatty():
            for h in hits:  # score<TAB>path, the path's exact bytes
                click.echo(f"{h.score:.4f}\t".encode() + os.fsencode(h.path) + b"\n", nl=False)
        else:
            _render_hits(hits, description)


def _say_why_nothing(description: str, photo_filter, threshold, to_stderr: bool) -> None:
    out = _console(stderr=to_stderr)  # into a pipe, stdout stays empty: zero results, zero lines
    reasons = []
    if photo_filter is not None and not photo_filter.is_empty():
        reasons.append(f"the filters ({photo_filter.describe()})")
    if threshold is not None:
        reasons.append(f"--threshold {threshold:g} (lower it, or leave it out to see the best scores)")
    why = f": nothing passed {' and '.join(reasons)}" if reasons else ""
    out.print(f"No photos match {description}{why}.", markup=False)


@cli.command()
@click.argument("photo")
@_top_option
@click.option(
    "--threshold", type=click.FloatRange(-1.0, 1.0), help="Only results with a cosine score at least this."
)
@filter_options
@_output_options
@_verbose_option
@pass_state
def similar(state: _State, photo, top, threshold, photo_filter, as_json, as_paths, as_table, null, html_out):
    """Find the photos most like PHOTO (a file, or a library id from `query --json`), best first.

    An indexed photo is searched with its stored embedding (no model is loaded: instant), so it
    comes first itself, at score 1.0. A file the library does not know is encoded with the
    library's model.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as for query: a few vectors of numpy work
    from clipsearch.search import Searcher

    _check_output_options(as_json, as_paths, null, as_table)
    with Searcher(state.db_path(), load_model=_model_loader("cpu")) as searcher:
        hits = searcher.similar(photo, top, photo_filter, threshold).hits
    _show_hits(
        state, hits, f"like {photo}", photo_filter, threshold, as_json, as_paths, null, as_table, html_out
    )


@cli.command()
@click.option(
    "--threshold",
    type=click.FloatRange(-1.0, 1.0),
    default=None,
    help="Cosine similarity at which two photos count as copies (default: 0.95; 0.98 for copies only, "
    "0.92 to gather bursts).",
)
@filter_options
@click.option(
    "--json", "as_json", is_flag=True, help='Print a JSON array of {"paths": [...], "similarity": S}.'
)
@click.option(
    "--html",
    "html_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a page to review the groups.",
)
@pass_state
def duplicates(state: _State, threshold, photo_filter, as_json, html_out):
    """Find copies among the indexed photos: identical files and near-duplicates (resized,
    recompressed, re-encoded, lightly cropped), grouped, the best copy first.

    Best: the most pixels, then the original format (RAW, lossless, JPEG, other lossy), then the
    least compressed. Nothing is deleted or moved: this only reports. Into a pipe, each photo is a
    line `group<TAB>similarity<TAB>path`.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from clipsearch.duplicates import DEFAULT_THRESHOLD, find_duplicates

    with _open_existing(state) as library:
        model_id = library.require_default_model()
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        groups = find_duplicates(library, model_id, threshold, photo_filter)
    if html_out is not None:
        from clipsearch.report import write_duplicates_html

        written = write_duplicates_html(groups, html_out)
        _console(stderr=True).print(f"Wrote {len(groups)} group(s) to {written}", markup=False)
        if _is_stdout(html_out):
            return  # the page is the output
    if as_json:
        _echo_json([{"paths": [str(p.path) for p in g.photos], "similarity": g.similarity} for g in groups])
    elif not sys.stdout.isatty() and not groups:
        _console(stderr=True).print(_no_duplicates(threshold, photo_filter), markup=False)
    elif not sys.stdout.isatty():
        for n, g in enumerate(groups, start=1):
            for p in g.photos:
                click.echo(f"{n}\t{g.similarity:.4f}\t".encode() + os.fsencode(p.path) + b"\n", nl=False)
    elif html_out is None or groups:
        _render_duplicates(groups, threshold, photo_filter)


def _no_duplicates(threshold: float, photo_filter) -> str:
    among = ""
    if photo_filter is not None and not photo_filter.is_empty():
        among = f" among the photos that pass the filters ({photo_filter.describe()})"
    return f"No duplicates at similarity {threshold:g} or above{among}."


def _render_duplicates(groups, threshold: float, photo_filter) -> None:
    from rich.text import Text

    out = _console()
    if not groups:
        out.print(_no_duplicates(threshold, photo_filter), markup=False)
        return
    copies = sum(len(g.photos) - 1 for g in groups)
    out.print(
        f"{len(groups)} group(s) of copies, {copies} extra cop{'ies' if copies != 1 else 'y'} (best first):"
    )
    for n, g in enumerate(groups, start=1):
        kind = "identical files" if g.identical else f"similarity {g.similarity:.4f}"
        out.print(Text(f"\nGroup {n}: {len(g.photos)} copies, {kind}", style="bold"))
        for k, p in enumerate(g.photos):
            size = f"{p.width}x{p.height}" if p.width and p.height else "?"
            mark = "best " if k == 0 else "     "
            facts = f"{size:>11}  {p.file_type or '?':<5} {p.size / 1024:>9,.0f} kB  "
            out.print(Text(f"  {mark}{facts}") + Text(str(p.path), no_wrap=True), soft_wrap=True)


def _note_cut_texts(state: _State, q) -> None:
    """Say when a query text is longer than the model reads (77 tokens for CLIP): only its start counted."""
    from clipsearch.search import cut_texts

    if not any(p.kind == "text" and len(p.value) > 60 for p in q.parts):
        return  # too short to be cut, whatever the model: no tokenizer needed
    from clipsearch import fastquery

    with _open_existing(state) as library:
        model_id = library.require_default_model()
    try:
        tokenizer = fastquery.encoder(model_id).tokenizer
    except (fastquery.TextEncoderMissing, ImportError, OSError):
        return  # no export to count with (the query loaded the model and is done): nothing to say
    for text in cut_texts(q, tokenizer):
        _console(stderr=True).print(
            f"Note: the query text is longer than the model reads ({tokenizer.context_length - 2} tokens); "
            f"only its start counted: {text[:60]!r}...",
            markup=False,
            style="yellow",
        )


def _settle_or_export(bundle, source: str, backend: str, quiet: bool) -> None:
    """After an index run: a model's one-time work (backend verdict, ONNX exports) when it is still
    to do, in the background unless CLIPSEARCH_BACKGROUND=0 (clipsearch.settle); else just make
    sure the text tower is exported, so the first text query need not load torch."""
    from clipsearch import settle

    try:
        due = (
            backend == "auto"
            and getattr(bundle, "preprocess_cfg", None) is not None
            and settle.needed(bundle)
        )
    except (AttributeError, StopIteration, TypeError):  # not a CLIP module with parameters
        due = False
    if due:
        if not settle.background_allowed() and not quiet:
            _console(stderr=True).print(
                "Measuring the inference backends for this model (once; up to a minute)...", style="dim"
            )
        settle.after_index(bundle, _source_for_record(source))
        return
    from clipsearch.encoders import export_text_encoder

    export_text_encoder(bundle)


def _render_hits(hits, description: str) -> None:
    """Results for a person: aligned columns, each path whole on its line (a table would fold a long
    path inside its cell, and a folded path cannot be copied or clicked)."""
    from rich.text import Text

    out = _console()
    if not hits:
        out.print(f"No photos match {description}.", markup=False)
        return
    out.print(Text(description, style="bold"))
    width = len(str(len(hits)))
    out.print(Text(f"{'#':>{width}}   score  path", style="dim"))
    for n, h in enumerate(hits, start=1):
        out.print(Text(f"{n:>{width}}  {h.score:>6.4f}  ") + Text(str(h.path)), soft_wrap=True)


# --------------------------------------------------------------------------------------------------
# serve


@cli.command()
@pass_state
def serve(state: _State):
    """Keep the library's text queries warm: a local daemon `clipsearch query` uses while it runs.

    It loads the text model and the vector index once and answers text queries (and `similar` of an
    indexed photo) with the library's model in milliseconds, over a private unix socket in the
    clipsearch home (no network port).
    Queries run by themselves, as before, when it is not running. It notices a re-index. Stop it
    with Ctrl-C.
    """
    import signal

    from clipsearch.serve import QueryServer

    err = _console(stderr=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    server = QueryServer(state.db_path(), log=lambda line: err.print(printable(line), markup=False))
    previous = signal.signal(signal.SIGTERM, stop)  # `kill` stops it as cleanly as Ctrl-C
    err.print(f"Serving {server.library_path} on {server.socket_path} (Ctrl-C to stop)", markup=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        signal.signal(signal.SIGTERM, previous)
    n = server.answered
    err.print(f"Stopped after {n} {'query' if n == 1 else 'queries'}.", markup=False)


# --------------------------------------------------------------------------------------------------
# web


@cli.command()
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free one)."
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback needs --allow-remote.",
)
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow a non-loopback --host: other machines may connect, with the access token printed.",
)
@pass_state
def web(state: _State, port: int, host: str, open_browser: bool, allow_remote: bool):
    """Browse and search the library in a web browser, served on this machine.

    Search by words or by a dropped picture, open a photo for its details and "more like this",
    browse zero-shot labels, see the library's status. Only photos in the library are served.
    Stop it with Ctrl-C.
    """
    import signal

    from clipsearch.web import make_server

    server = make_server(state.db_path(), host=host, port=port, allow_remote=allow_remote)
    err = _console(stderr=True)
    url = server.url
    if server.access_token is not None:
        url += f"?token={server.access_token}"
        err.print(
            f"[yellow]Warning:[/yellow] listening on {escape_markup(host)}: every machine that can reach "
            "it can see your photos with the token in this address. Share it with care."
        )

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    click.echo(f"Serving {printable(str(server.live.path))} at {url} (Ctrl-C to stop)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        signal.signal(signal.SIGTERM, previous)
    err.print("Stopped.", markup=False)


# --------------------------------------------------------------------------------------------------
# label


def _read_classes(classes: str | None, classes_file: Path | None) -> list[str]:
    if (classes is None) == (classes_file is None):
        raise click.UsageError("give exactly one of --classes a,b,c or --classes-file FILE")
    if classes is not None:
        return [c.strip() for c in classes.split(",") if c.strip()]
    try:
        text = Path(classes_file).read_text(encoding="utf-8")
    except OSError as e:
        raise ClipsearchError(f"cannot read --classes-file {classes_file}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ClipsearchError(f"--classes-file {classes_file} is not UTF-8 text") from e
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@cli.command()
@click.option(
    "--classes", type=TEXT, metavar="A,B,C", help="Comma-separated class names, e.g. 'dog,cat,beach'."
)
@click.option(
    "--classes-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A text file with one class name per line ('#' starts a comment).",
)
@click.option(
    "--template",
    "templates",
    multiple=True,
    type=TEXT,
    metavar="T",
    help="Prompt template with {} for the class (repeatable; default: the CLIP paper's 80 templates).",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    help="Labels kept per photo (default: 1; with --multi-label, every class that passes).",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    help="Keep labels with probability at least this (multi-label default: 0.5).",
)
@click.option(
    "--multi-label",
    is_flag=True,
    help="Decide each class on its own (class vs a generic photo) instead of one softmax over all.",
)
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of {path, label, score, labels}.")
@click.option(
    "--write-xmp",
    is_flag=True,
    help="Write the labels of probability at least --threshold (default 0.5; 0: each photo's top label) "
    "as keywords to XMP sidecars (photo.jpg.xmp: dc:subject and lr:hierarchicalSubject), merged into "
    "what is there.",
)
@click.option("--model", metavar="SOURCE", help="Model to label with (default: the library's).")
@_device_option("Where the text model that builds the classifier runs (auto: a GPU when there is one).")
@pass_state
def label(
    state: _State,
    classes,
    classes_file,
    templates,
    top_k,
    threshold,
    multi_label,
    photo_filter,
    as_json,
    write_xmp,
    model,
    device,
):
    """Zero-shot label the indexed photos with the given classes, from their stored embeddings.

    Results are stored in the library; labelling again with the same classes replaces them.
    """
    from clipsearch.encoders import ModelEncoder, for_texts
    from clipsearch.zeroshot import DEFAULT_TEMPLATES, check_classes, check_templates, label_images

    names = check_classes(_read_classes(classes, classes_file))
    chosen = check_templates(templates) if templates else list(DEFAULT_TEMPLATES)
    if len(names) == 1 and not multi_label:
        # A softmax over one class gives it probability 1 for every photo: decide it on its own.
        multi_label = True
        if not as_json:
            _console(stderr=True).print(
                f"One class: each photo is '{names[0]}' when it looks more like it than like a generic "
                "photo (as --multi-label does).",
                markup=False,
                style="dim",
            )
    with _open_existing(state) as library:
        if model is not None:  # a model named: in torch, as for query --model
            texts = ModelEncoder(_load_bundle(model, device=device, library=library))
        else:  # the library's model: its torch-free text export when there is one
            texts = for_texts(library, load_model=_model_loader(device), torch_free=device in ("auto", "cpu"))
        results = label_images(
            library,
            texts,
            names,
            templates=chosen,
            top_k=top_k if top_k is not None else (None if multi_label else 1),
            threshold=threshold,
            multi_label=multi_label,
            filters=photo_filter,
        )
    xmp = {}
    if write_xmp:
        from clipsearch.xmp import DEFAULT_MIN_PROBABILITY, write_labels

        xmp, stamps = write_labels(results, DEFAULT_MIN_PROBABILITY if threshold is None else threshold)
        if stamps:  # our own keywords: the next index need not read these photos' headers again
            from clipsearch.store import LibraryWriteError

            with _open_existing(state) as library, contextlib.suppress(LibraryWriteError):  # speed only
                library.note_own_sidecar_writes(stamps)
    if as_json:
        _echo_json(
            [
                {
                    "path": str(r.path),
                    "label": r.label,
                    "score": None if r.score is None else round(r.score, 6),
                    "labels": [{"label": lab, "score": round(s, 6)} for lab, s in r.labels],
                    "image_id": r.image_id,
                    **({"xmp": xmp[r.image_id]} if write_xmp else {}),
                }
                for r in results
            ]
        )
    else:
        _render_labels(results)
    failed = [(r.path, xmp[r.image_id]["error"]) for r in results if write_xmp and xmp[r.image_id]["error"]]
    if not as_json:
        for path, message in failed[:MAX_FAILURES_SHOWN]:
            _console(stderr=True).print(f"XMP not written for {path}: {message}", markup=False)
    if failed:
        raise ClipsearchError(
            f"XMP sidecars not written for {len(failed)} of {len(results)} photos (first: {failed[0][0]}: "
            f"{failed[0][1]}); the labels are stored in the library, the sidecars were left as they were"
        )


def _render_labels(results) -> None:
    """Like :func:`_render_hits`: aligned columns, the path last and whole on its line."""
    from rich.cells import cell_len
    from rich.text import Text

    out = _console()
    if not results:
        out.print("No indexed photos to label.")
        return
    rows = [
        (
            r.label or "-",
            "-" if r.score is None else f"{r.score:.3f}",
            ", ".join(f"{lab} {s:.2f}" for lab, s in r.labels[1:]),
            str(r.path),
        )
        for r in results[:MAX_LABEL_ROWS]
    ]

    def pad(text: str, width: int) -> str:  # by terminal cells: a label may be CJK or an emoji
        return text + " " * (width - cell_len(text))

    lw = max(cell_len("label"), *(cell_len(r[0]) for r in rows))
    ow = max(cell_len("others"), *(cell_len(r[2]) for r in rows))
    out.print(Text(f"{pad('label', lw)}  score  {pad('others', ow)}  path", style="dim"), soft_wrap=True)
    for label, score, others, path in rows:
        out.print(Text(f"{pad(label, lw)}  {score:>5}  {pad(others, ow)}  ") + Text(path), soft_wrap=True)
    if len(results) > MAX_LABEL_ROWS:
        out.print(f"... and {len(results) - MAX_LABEL_ROWS} more photos: --json lists them all")
    counts = Counter(r.label or "(no label)" for r in results)
    summary = ", ".join(f"{label} {n}" for label, n in counts.most_common())
    out.print(f"Labelled {len(results)} photos (top label): {summary}", markup=False)


# --------------------------------------------------------------------------------------------------
# export, status, models, doctor


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--model-id",
    help="Which of the library's models to export, by its name, folder or id (default: the library's model).",
)
@pass_state
def export(state: _State, file: Path, model_id: str | None):
    """Write the library's embeddings to FILE.npz: `paths` (absolute), `embeddings` (float32, L2-normalised),
    `ids` and `model_id`."""
    import numpy as np

    with _open_existing(state) as library:
        if model_id is None:
            model_id = library.require_default_model()
        elif model_id not in library.model_ids():
            rows = library.models()
            wanted = {model_id, _source_for_record(model_id)}
            match = [m.id for m in rows if m.source in wanted]
            if not match:
                names = ", ".join(m.name for m in rows) or "none"
                raise LibraryError(f"no model {model_id!r} in the library; it has: {names}")
            model_id = match[0]
        name = library.model_name(model_id)
        ids, paths, vectors = library.embeddings(model_id)
    target = Path(file).expanduser()
    from clipsearch.atomic import atomic_path

    # A missing folder is a typo: refused, not made. A file object: numpy would append .npz to a name.
    try:
        with atomic_path(target, make_folder=False) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                paths=np.array([str(p) for p in paths], dtype=str),
                embeddings=vectors.astype(np.float32),
                ids=ids,
                model_id=np.array(model_id),
            )
    except ClipsearchError:
        raise
    except OSError as e:  # numpy's write names no file, and the temporary's name is not the user's
        raise LibraryError(f"cannot write {target}: {e.strerror or e}") from e
    _console(stderr=True).print(
        f"Exported {len(ids)} embeddings of {name} ({vectors.shape[1] if vectors.ndim == 2 else 0}-d) to {target}",
        markup=False,
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option(
    "--errors", "n_errors", type=click.IntRange(min=0), default=10, show_default=True, help="Errors listed."
)
@pass_state
def status(state: _State, as_json: bool, n_errors: int):
    """Show the library: where it is, its models, how many photos, and the files that failed."""
    from clipsearch.vectors import describe_index

    with _open_existing(state) as library:
        stats = library.stats()
        errors = library.errors(limit=n_errors)
        default = library.default_model_id()
        indexes = {m.id: describe_index(library, m.id) for m in stats.models}
    if as_json:
        data = dataclasses.asdict(stats)
        data["default_model"] = default
        names = {m.id: m.name for m in stats.models}
        for row in data["models"]:
            row["name"] = names[row["id"]]
            row["index"] = indexes[row["id"]]
        data["default_model_name"] = names.get(default)
        data["recent_errors"] = [dataclasses.asdict(e) for e in errors]
        _echo_json(data)
        return
    from rich.text import Text

    out = _console()
    out.print(f"Library: {stats.path}", markup=False)
    out.print(
        f"Images: {stats.images}   Labels: {stats.labels} in {stats.class_sets} class set(s)   "
        f"Errors: {stats.errors}"
    )
    if stats.models:  # aligned columns, the model last: a folder is printed whole, never folded
        out.print("Models:")
        out.print(Text(f"  {'dim':>5}  {'embedded':>9}  {'last used':<25}  model", style="dim"))
        for m in stats.models:
            name = m.name + (" (default)" if m.id == default else "")
            facts = f"  {m.dim or '?':>5}  {m.embedded:>9,}  {m.last_used or '':<25}  "
            out.print(Text(facts) + Text(name), soft_wrap=True)
        for m in stats.models:
            if indexes[m.id] is not None:
                out.print(f"Index of {m.name}: {_index_summary(indexes[m.id])}", markup=False, soft_wrap=True)
    if errors:
        out.print(f"Files that could not be indexed ({stats.errors}, newest first):")
        for e in errors:
            detail = f" ({e.detail})" if e.detail else ""
            out.print(f"  {e.reason}: {e.path}{detail}", markup=False)


def _index_summary(info: dict) -> str:
    """One line for a model's vector index (:func:`clipsearch.vectors.describe_index`)."""
    tuning = []
    if "nprobe" in info:
        tuning.append(f"scans {info['nprobe']} of {info.get('cells', '?')} cells")
    if "rerank" in info:
        tuning.append(f"re-ranks {info['rerank']} exactly")
    if "ef_search" in info:
        tuning.append(f"efSearch {info['ef_search']}")
    if "tuned_with" in info:
        tuning.append(f"tuned on {'text and images' if info['tuned_with'] == 'text' else 'images'}")
    step = "" if info["in_step"] else ", behind the library until the next index run or search"
    details = f" ({', '.join(tuning)})" if tuning else ""
    return f"{info['kind']}, {info['vectors']:,} vectors, {info['bytes'] / 1e6:,.1f} MB{details}{step}"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the models as JSON.")
def models(as_json: bool):
    """List the registered pretrained models, which are downloaded already, and which are pinned.

    Only pinned models (a revision and the file's full sha256) are downloaded. Any weights file,
    OpenCLIP hub folder, clipsearch model folder or training run folder works as --model too.
    """
    from clipsearch.pretrained import PRETRAINED, cached_state, is_pinned, list_pretrained, pretrained_path

    states = {n: cached_state(n) for n in list_pretrained()}
    rows = [
        {
            "name": n,
            "cached": states[n] is not None,
            "state": states[n],  # verified, damaged, unchecked, or None
            "pinned": is_pinned(PRETRAINED[n]),
            "path": str(pretrained_path(n)) if states[n] is not None else None,
        }
        for n in list_pretrained()
    ]
    if as_json:
        _echo_json(rows)
        return
    from rich.table import Table

    table = Table()
    table.add_column("model")
    table.add_column("cached")
    table.add_column("pinned")
    table.add_column("path", overflow="fold")
    for r in rows:
        pinned = "yes" if r["pinned"] else "no (refused)"
        cached = {
            "verified": "yes",
            "unchecked": "yes (checked when loaded)",
            "damaged": "damaged: delete it",
        }
        table.add_row(r["name"], cached.get(r["state"], ""), pinned, r["path"] or "")
    _console().print(table)


@cli.command()
@click.option("--rebuild", is_flag=True, help="Rebuild every FAISS index from SQLite even if it looks fine.")
@pass_state
def doctor(state: _State, rebuild: bool):
    """Check the library (SQLite integrity, FAISS index in step with SQLite) and repair what it can.

    A FAISS index out of step is brought up to date or rebuilt from SQLite, the source of truth.
    """
    from clipsearch.vectors import VectorIndex

    out = _console()
    with state.open_library(create=False) as library:
        problems = library.integrity_problems()
        if problems:
            for p in problems[:10]:
                out.print(f"  {p}", markup=False)
            raise LibraryError(
                f"SQLite integrity check of {library.path} failed ({len(problems)} problem(s)); "
                "restore a backup or move it away and index again"
            )
        out.print(f"SQLite: {library.path} passes the integrity check", markup=False)
        orphans = library.orphan_rows()
        if orphans and library.readonly:
            raise LibraryError(
                f"{library.path} holds {orphans} embedding(s) or label(s) of photos no longer in it (it was "
                "edited with foreign keys off); run `clipsearch doctor` where the library can be written"
            )
        if orphans:
            removed = library.remove_orphan_rows()
            out.print(
                f"SQLite: removed {removed} embedding(s) and label(s) of photos no longer in the library "
                "(it was edited with foreign keys off)",
                markup=False,
            )
        model_ids = library.model_ids()
        poisoned = {m: library.nonfinite_embedding_ids(m) for m in model_ids}
        poisoned = {m: ids for m, ids in poisoned.items() if ids}
        if poisoned and library.readonly:
            raise LibraryError(
                f"{library.path} holds {sum(map(len, poisoned.values()))} vector(s) of NaN or infinite values "
                "(a damaged model made them); run `clipsearch doctor` where the library can be written"
            )
        for model_id, ids in poisoned.items():
            removed = library.remove_embeddings(model_id, ids)
            out.print(
                f"SQLite: removed {removed} vector(s) of {library.model_name(model_id)} holding NaN or infinite "
                "values (a damaged model made them; every search met them); `clipsearch index` embeds "
                "those photos again",
                markup=False,
            )
        unsaved = []  # models whose index needed a repair that a read-only library cannot keep
        failed = []  # models whose repaired index could not be written
        if not model_ids:
            out.print("FAISS: no models indexed yet, nothing to check")
        for model_id in model_ids:
            name = library.model_name(model_id)
            expected = len(library.embedding_ids(model_id))
            # --rebuild goes through for_library, which reads the generation before the vectors
            index = VectorIndex.for_library(library, model_id, rebuild=rebuild or model_id in poisoned)
            if rebuild:
                action = "rebuilt from SQLite (--rebuild)"
            elif getattr(index, "rebuilt", False):
                action = "was missing or out of step: rebuilt from SQLite"
            elif getattr(index, "updated", False):
                action = "was behind SQLite: brought up to date"
            else:
                action = "in step with SQLite"
            if library.readonly and action != "in step with SQLite":
                unsaved.append(name)
                action += " in memory only (the library is read-only here: nothing was saved)"
            elif getattr(index, "unsaved", None) is not None:  # e.g. <db>.faiss is a file, a full disk
                failed.append(f"{name} ({index.unsaved.strerror or index.unsaved})")
                action += " in memory only (it could not be saved)"
            if len(index) != expected:
                raise LibraryError(
                    f"FAISS index of {name} holds {len(index)} vectors but SQLite has {expected}; "
                    "run `clipsearch doctor --rebuild`"
                )
            out.print(f"FAISS: {name}: {action} ({len(index)} vectors, {index.kind})", markup=False)
    if unsaved:
        raise LibraryError(
            f"{library.path} is read-only here, so the FAISS index of {', '.join(unsaved)} could not be "
            "repaired: queries still work (they rebuild it in memory each time); run `clipsearch doctor` "
            "where the library can be written"
        )
    if failed:
        folder = library.path.with_name(library.path.name + ".faiss")
        raise LibraryError(
            f"the repaired FAISS index of {', '.join(failed)} could not be saved in {folder}: queries still "
            "work (they rebuild it in memory each time); make it a folder you can write to and run "
            "`clipsearch doctor` again"
        )
    out.print("OK")


def main() -> None:
    """The console script's entry point."""
    code = 0
    try:
        cli(prog_name="clipsearch")
    except SystemExit as e:
        code = e.code
    try:
        _flush_or_quiet()
    except SystemExit as e:
        code = e.code
    _leave(code)


def _leave(code) -> None:
    """Exit with ``code`` (as ``SystemExit`` takes it).

    A process that loaded PyTorch skips the interpreter's own teardown, which spends ~0.7 s taking
    torch's modules apart (the end of a first index run went from 0.8 to 0.2 s; ``first_run.md``).
    Nothing is lost by it: every file clipsearch writes is committed or renamed into place, and its
    libraries closed, before the command returns; the ``atexit`` handlers (logging, thread pools,
    temporary folders) still run, and the output is flushed, before ``os._exit``.
    """
    if sys.modules.get("torch") is None:  # not loaded (None: made unimportable, as tests do)
        raise SystemExit(code)
    import atexit

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what SystemExit does with a message
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code or 0)


def _flush_or_quiet() -> None:
    """`clipsearch query ... | head`: output still buffered when the reader left is dropped quietly
    (exit 0), instead of Python's 'Exception ignored ... BrokenPipeError' at exit."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's own final flush goes nowhere
        raise SystemExit(0) from None
