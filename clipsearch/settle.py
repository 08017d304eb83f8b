"""A model's one-time work on a machine, done after its first index run instead of before it.

The first ``clipsearch index`` with a model indexes on a backend settled on its own photos
(:class:`clipsearch.backends.SettlingEncoder`: torch fp32, then torch int8 once checked faithful),
so the user never waits for what only later runs profit from:

- the image tower's ONNX export and its int8 quantisation, and the measurement of every backend
  on calibration images (:func:`clipsearch.backends.choose_backend`, which writes the verdict that
  later runs read);
- the text tower's export for torch-free queries (:func:`clipsearch.fastquery.ensure_text_encoder`).

:func:`settle` does both in this process. :func:`start_in_background` runs it in a detached child
(``python -m clipsearch.settle SOURCE --device D``, D where the index run embedded: its verdict is
that device's) at the lowest CPU priority, as ``git gc --auto`` does, so the
command that started it returns at once; its log is ``settle.log`` in the model's cache folder. One
settle per model at a time (an ``flock`` on ``settle.lock`` there; a second one exits at once).
Setting ``CLIPSEARCH_BACKGROUND=0`` makes the CLI settle in the foreground instead, as git's
``gc.autoDetach=false`` does: for a script, container build or batch job whose processes end with
the command, so that everything is done when ``index`` returns (the tests set it too).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import subprocess
import sys
from collections.abc import Callable

from clipsearch.paths import cache_dir

log = logging.getLogger(__name__)

LOCK_FILE = "settle.lock"
LOG_FILE = "settle.log"
ENV_BACKGROUND = "CLIPSEARCH_BACKGROUND"


def background_allowed() -> bool:
    """Whether one-time work may go to a background process (``CLIPSEARCH_BACKGROUND`` is not 0)."""
    return os.environ.get(ENV_BACKGROUND, "1").strip().lower() not in ("0", "no", "false", "off")


def needed(bundle) -> bool:
    """Whether ``bundle``'s model still lacks its backend verdict on this machine."""
    from clipsearch import backends

    return backends.needs_measuring(bundle)


def _try_lock(model_id: str) -> int | None:
    """The model's settle lock, held (a descriptor), or None when another process holds it."""
    from clipsearch.atomic import open_lock

    directory = cache_dir(model_id)
    directory.mkdir(parents=True, exist_ok=True)
    fd = open_lock(directory / LOCK_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def settle(bundle, *, locked: bool = False, reload: Callable[[], object] | None = None) -> str | None:
    """Measure the backends (exports and quantisation included) and export the text tower, unless
    another process is doing it. Returns the chosen backend's name, None when another process holds
    the lock. ``locked``: the caller already holds it (the background child inherits it).

    ``reload``: nothing else uses ``bundle`` (the background child), and ``reload()`` loads its
    model again. The text tower is then exported first and the model freed and reloaded: a model's
    weights are mapped from its file as they are first read, so the image work brings back only the
    image tower's pages. The model is freed again once the image tower's ONNX export is written,
    before ONNX Runtime measures; ``bundle.model`` is None afterwards. Each step thus starts from
    the least this process can hold (``benchmarks/memory.md``).
    """
    from clipsearch import backends
    from clipsearch.encoders import export_text_encoder

    fd = None
    if not locked:
        fd = _try_lock(bundle.model_id)
        if fd is None:
            log.info("another process is settling %s", bundle.name)
            return None
    try:
        from clipsearch.atomic import remove_stale_temps

        # a settle killed while writing (the OOM killer, a reboot) leaves its temporary exports behind
        for stale in remove_stale_temps(cache_dir(bundle.model_id)):
            log.info("removed %s, left by a settle that did not finish", stale.name)
        if reload is not None:
            export_text_encoder(bundle)  # a failure is a logged warning: queries then load the model
            bundle.model = None
            backends.release_memory()
            bundle.model = reload()

        def done_with_model():  # the image tower is exported: ONNX Runtime needs only the file now
            bundle.model = None

        chosen, results = backends.choose_backend(
            bundle, done_with_model=done_with_model if reload is not None else None
        )
        log.info("backend verdict for %s: %s (%s)", bundle.name, chosen, list(results.values()))
        backends.release_memory()
        if reload is None:
            export_text_encoder(bundle)
        return chosen
    finally:
        if fd is not None:
            os.close(fd)


def start_in_background(source: str, model_id: str, device: str = "cpu") -> subprocess.Popen | None:
    """Start ``python -m clipsearch.settle SOURCE --device DEVICE`` detached, at the lowest priority:
    the verdict it writes is for ``device``, where the index run that asked for it embedded. None
    when another settle of this model runs, or the child could not start (the next index run then
    settles on its photos again and tries once more).

    The lock is taken here and handed to the child (an inherited ``flock`` belongs to the child's
    descriptor too), so from the moment this returns, another settle of the model sees it running.
    """
    fd = _try_lock(model_id)
    if fd is None:
        log.info("%s is already being settled", source)
        return None
    directory = cache_dir(model_id)
    try:
        with open(directory / LOG_FILE, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "clipsearch.settle", source, "--device", device, "--lock-fd", str(fd)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal after index returned spares it
                pass_fds=(fd,),
            )
    except OSError as e:
        log.warning("could not start the background settle for %s: %s", source, e)
        return None
    finally:
        os.close(fd)  # the child's copy keeps the lock
    log.info("settling %s in the background (pid %d, log %s)", source, proc.pid, directory / LOG_FILE)
    return proc


def after_index(bundle, source: str) -> str:
    """What an index run does when ``needed(bundle)``: settle in the background when allowed, else
    here and now. Returns ``"background"``, ``"done"`` or ``"elsewhere"`` (another process has it)."""
    if background_allowed():
        from clipsearch.backends import placement

        started = start_in_background(source, bundle.model_id, placement(bundle)[0])
        return "background" if started is not None else "elsewhere"
    return "done" if settle(bundle) is not None else "elsewhere"


def wait(model_id: str, timeout: float | None = None) -> bool:
    """Block until no process holds ``model_id``'s settle lock; False on timeout. For a script that
    needs everything done before it goes on (``benchmarks/rclip_compare.py --first-run`` times the
    background work this way; the tests wait for it)."""
    import time

    from clipsearch.atomic import open_lock

    directory = cache_dir(model_id)
    directory.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    fd = open_lock(directory / LOCK_FILE)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    return False
                time.sleep(0.2)
    finally:
        os.close(fd)


def lowest_priority() -> None:
    """Run this process, and the children it starts, below the user's own work.

    ``nice 19`` alone is not enough where the kernel groups processes by session (autogroup, on by
    default in most desktop Linux distributions): the nice value then only weighs against the same
    session, and the settle child, started in a session of its own, took a full share of the cores
    from the user's next command. So the session's group is lowered too (``/proc/self/autogroup``,
    which any process may do for its own group), when this process leads its session (the background
    child does): run by hand from a shell, it leaves the shell's session as it is.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.nice(19)
    if os.getsid(0) == os.getpid():
        with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as f:
            f.write("19")


def main(argv: list[str] | None = None) -> int:
    """``python -m clipsearch.settle SOURCE [--device D] [--lock-fd N]``: settle one model at the lowest
    priority, for the device its index run embedded on."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m clipsearch.settle", description=main.__doc__)
    ap.add_argument("source", help="the model, as clipsearch index --model takes it")
    ap.add_argument(
        "--device", default="cpu", help="where the model embeds (cpu, cuda:0...): the verdict is for it"
    )
    ap.add_argument("--lock-fd", type=int, help="the settle lock, already held (from start_in_background)")
    args = ap.parse_args(argv)
    lowest_priority()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from clipsearch.backends import sleeping_openmp_threads
    from clipsearch.checkpoints import load_bundle

    sleeping_openmp_threads()  # before torch loads; the user's own work shares the cores
    # The text tower is exported from the model on the CPU (queries run it there); the image backends
    # are measured on the device.
    bundle = load_bundle(args.source)
    chosen = settle(
        bundle,
        locked=args.lock_fd is not None,
        reload=lambda: load_bundle(args.source, device=args.device).model,
    )
    log.info(
        "settled %s: %s (peak memory of this process %.0f MB)",
        bundle.name,
        chosen or "another process is at it",
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
