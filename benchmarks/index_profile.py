"""Where the CPU seconds of one steady-state ``clipsearch index`` go, and whether both cores are busy.

Runs the real CLI in this process (``clipsearch --db DB index FOLDER --model MODEL``, a new library,
the model's verdict and exports already cached) with each stage of the indexer's pipeline wrapped
to add up the CPU time of the thread that runs it (``time.thread_time``): header check, read +
hash, metadata, decode per format, preprocessing, the image forward pass (the calling thread, plus
ONNX Runtime's own pool thread, from ``/proc``), the SQLite commits, the FAISS update. A sampler
thread reads ``/proc/self/stat`` every ``--tick`` seconds: the timeline of how many cores the
process used, and the CPU time of every thread (including those that have exited by the end).

    CLIPSEARCH_HOME=/tmp/decode-bench/home python benchmarks/index_profile.py \
        --folder /tmp/mixed --model /tmp/decode-bench/model-ViT-B-32-256-seed0

(``benchmarks/rclip_compare.py --folder ... --work /tmp/decode-bench`` makes that model and settles it.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
_lock = threading.Lock()
cpu: dict[str, float] = defaultdict(float)  # stage -> thread CPU seconds
calls: dict[str, int] = defaultdict(int)
wall: dict[str, float] = defaultdict(float)  # stage -> wall seconds (main-thread stages)
python_tids: dict[int, str] = {}  # native thread id -> what it is
_current = threading.local()
ort_tids: set[int] = set()


def _add(stage: str, c: float, w: float) -> None:
    with _lock:
        cpu[stage] += c
        wall[stage] += w
        calls[stage] += 1
        python_tids.setdefault(threading.get_native_id(), threading.current_thread().name)


def wrap(owner, attr: str, stage) -> None:
    """Replace ``owner.attr`` by a version that books its thread's CPU time to ``stage`` (a name, or
    a function of no arguments giving one)."""
    original = getattr(owner, attr)

    def timed(*args, **kwargs):
        c, w = time.thread_time(), time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _add(stage() if callable(stage) else stage, time.thread_time() - c, time.perf_counter() - w)

    setattr(owner, attr, timed)


def _thread_cpu(states: list | None = None) -> dict[int, tuple[str, float]]:
    """Native thread id -> (its name as the OS knows it, CPU seconds so far); appends each thread's
    scheduler state (R: running or waiting for a core, S/D: blocked) to ``states``."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        if states is not None and int(tid) != threading.get_native_id():
            states.append(fields[0])
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def _process_cpu() -> float:
    t = os.times()
    return t.user + t.system


class Sampler(threading.Thread):
    def __init__(self, tick: float):
        super().__init__(daemon=True, name="profile-sampler")
        self.tick = tick
        self.timeline: list[tuple[float, float]] = []  # (monotonic s, process CPU s)
        self.runnable: list[int] = []  # per tick: threads of this process running or ready to run
        self.threads: dict[int, tuple[str, float]] = {}  # last CPU seen per thread
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.timeline.append((time.perf_counter(), _process_cpu()))
            states: list[str] = []
            self.threads.update(_thread_cpu(states))
            for t in threading.enumerate():  # Python's names of its threads (the OS calls them python)
                if t.native_id is not None:
                    python_tids.setdefault(t.native_id, t.name)
            self.runnable.append(states.count("R"))
            self.stop.wait(self.tick)


def install() -> None:
    from clipsearch import backends, indexer, transform, vectors

    def fmt() -> str:
        return "decode " + getattr(_current, "fmt", "?")

    original_prepare = indexer._Run._prepare

    def prepare(self, job):
        name = job.path.name.lower()
        _current.fmt = name.split(".", 1)[1] if "." in name else "?"
        c, w = time.thread_time(), time.perf_counter()
        try:
            return original_prepare(self, job)
        finally:
            _add("prepare (whole, worker)", time.thread_time() - c, time.perf_counter() - w)

    indexer._Run._prepare = prepare
    wrap(indexer, "check_header", "header check")
    wrap(indexer, "read_and_hash", "read + hash")
    wrap(indexer, "_read_metadata", "metadata")
    wrap(indexer, "open_image", fmt)
    wrap(transform.EvalTransform, "array", "preprocess (numpy)")
    wrap(backends.OnnxImageEncoder, "__call__", "forward (calling thread)")
    wrap(indexer._Run, "_embed", "embed (incl. forward)")
    wrap(indexer._Run, "_flush", "flush (embed + SQLite)")
    wrap(indexer._Run, "_choose_encoder", "backend load")
    original_choose = indexer._Run._choose_encoder

    def choose(self):
        before = set(_thread_cpu())
        try:
            return original_choose(self)
        finally:
            ort_tids.update(set(_thread_cpu()) - before)  # ONNX Runtime starts its pool in there

    indexer._Run._choose_encoder = choose
    wrap(indexer._Run, "_pipeline", "pipeline (main)")
    wrap(vectors.VectorIndex, "for_library", "FAISS update")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--tick", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--ort-threads", type=int, default=None, help="force ONNX Runtime's intra-op threads")
    args = ap.parse_args()

    started, cpu0 = time.perf_counter(), _process_cpu()
    sampler = Sampler(args.tick)
    sampler.start()
    install()
    if args.ort_threads:
        from clipsearch import backends

        original = backends.ort_session
        backends.ort_session = lambda path, threads=None, **kw: original(path, args.ort_threads, **kw)
    from clipsearch.cli import main as cli_main

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["clipsearch", "--db", f"{tmp}/lib.db", "index", str(args.folder), "--model", str(args.model)]
        argv += ["--json"] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
        sys.argv = argv
        load = os.getloadavg()[0]
        try:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                cli_main()
        except SystemExit as e:
            if e.code not in (0, None):
                raise
    total_wall, total_cpu = time.perf_counter() - started, _process_cpu() - cpu0
    sampler.stop.set()
    sampler.join()
    threads = sampler.threads
    main_tid = threading.main_thread().native_id

    print(f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores")
    print(
        f"whole run (imports, model open, index, FAISS): wall {total_wall:.2f} s, CPU {total_cpu:.2f} s "
        f"({total_cpu / total_wall:.2f} cores busy on average)\n"
    )
    print("| stage | thread CPU s | share of process CPU | calls | wall s |")
    print("|---|---:|---:|---:|---:|")
    for stage in sorted(cpu, key=lambda s: -cpu[s]):
        print(
            f"| {stage} | {cpu[stage]:.2f} | {cpu[stage] / total_cpu:.1%} | {calls[stage]} | {wall[stage]:.2f} |"
        )

    print("\nCPU per OS thread (from /proc), by kind:")
    kinds: dict[str, list[float]] = defaultdict(list)
    for tid, (name, seconds) in threads.items():
        if tid == main_tid:
            kind = "main thread (CLI, SQLite, the forward's calling thread)"
        elif tid == sampler.native_id:
            kind = "this profiler's sampler"
        elif tid in python_tids:
            kind = python_tids[tid].rsplit("_", 1)[0] + " (Python threads)"
        elif tid in ort_tids:
            kind = "native threads started while the backend loaded (ONNX Runtime pool, if any; libvips)"
        else:
            kind = f"native: {name}"
        kinds[kind].append(seconds)
    for kind, values in sorted(kinds.items(), key=lambda kv: -sum(kv[1])):
        print(f"- {kind}: {sum(values):.2f} s in {len(values)} thread(s)")

    # Timeline: cores in use per tick during the pipeline.
    tl = sampler.timeline
    pairs = zip(tl, tl[1:], strict=False)
    busy = [((c1 - c0) / (t1 - t0), t0 - started) for (t0, c0), (t1, c1) in pairs if t1 > t0]
    if busy:
        hist = defaultdict(float)
        for b, _ in busy:
            hist[min(2, round(b * 2) / 2)] += 1
        n = len(busy)
        print(
            "\ncores busy per tick over the whole run: "
            + ", ".join(f"{k:.1f}: {v / n:.0%}" for k, v in sorted(hist.items()))
        )
        # per second
        per_s = defaultdict(list)
        for b, t in busy:
            per_s[int(t)].append(b)
        print("per second: " + " ".join(f"{sum(v) / len(v):.1f}" for _, v in sorted(per_s.items())))
    # What an idle machine would give: at each tick min(cores, threads ready to run) cores are busy.
    cores = os.cpu_count() or 1
    if sampler.runnable:
        n = len(sampler.runnable)
        hist = defaultdict(int)
        for r in sampler.runnable:
            hist[min(r, cores)] += 1
        mean = sum(min(r, cores) for r in sampler.runnable) / n
        print(
            "threads ready to run per tick (capped at the cores): "
            + ", ".join(f"{k}: {v / n:.0%}" for k, v in sorted(hist.items()))
            + f"; mean {mean:.2f} of {cores} cores: the share of the cores an idle machine would keep busy"
        )


if __name__ == "__main__":
    main()
