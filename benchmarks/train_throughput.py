"""Training throughput: clipsearch-train against OpenCLIP's own trainer (``open_clip_train.main``), on a CPU.

Both trainers run at the same time, side by side, as subprocesses started by
``benchmarks/train_quality.py``'s launchers: same architecture JSON, same flags (OpenCLIP's names),
same CSV of real image-caption pairs (the emoji set of ``benchmarks/real_data.py emoji``, or the first
``--rows`` rows of it in a seeded order), the same number of threads and loader workers. Running them
together is the point: the machine is shared, and load from other processes then hits both alike.

Per trainer and repeat: the headline ``samples/s, shared window`` counts the steps each trainer
logged while both were training (from the moment both had logged a first step to the moment the
first of them logged its last one, the logs polled every 0.5 s), so start-up, the first batch and a
tail run alone on a freed machine count for neither. Also: the median over steps of each trainer's
own per-step figure (batch size / time from the end of the previous step to the end of this one,
waiting for data included; OpenCLIP's ``Batch (t)`` log line, our ``metrics.jsonl``), the first step
left out; and the wall and CPU time (user + system, loader workers included) of the whole process,
start-up and saving included. The repeats alternate which trainer starts first. The summary is the
median over repeats of each figure and of the per-repeat ratio of shared-window samples/s.

    python benchmarks/real_data.py emoji /tmp/emo /tmp/emoji-set      # once
    python benchmarks/train_throughput.py /tmp/emoji-set --rows 3840 --repeats 4
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import train_quality as tq  # the two trainers' launchers and log readers (benchmarks/ is on sys.path)


def subset(data: Path, rows: int | None, seed: int, out: Path) -> int:
    """Write ``out/train.csv``: ``rows`` rows of the set's train.csv in a seeded order (all if None),
    with absolute image paths so both trainers read it from any folder. Returns the number of rows."""
    with open(data / "train.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    if rows is not None:
        random.Random(seed).shuffle(table)
        table = table[:rows]
    with open(out / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        for r in table:
            w.writerow([str(data / r["filepath"]), r["title"]])
    return len(table)


def run_pair(args, work: Path, ours_first: bool) -> dict:
    """Both trainers on the same flags at the same time; each one's figures."""
    work.mkdir(parents=True)
    cfg_dir = work / "configs"
    cfg_dir.mkdir()
    from clipsearch.configs import get_config

    (cfg_dir / f"{args.model}.json").write_text(__import__("json").dumps(get_config(args.model)))
    starts = [("clipsearch-train", lambda: tq.start_ours(args, args.seed, work)),
              ("open_clip_train", lambda: tq.start_open_clip(args, args.seed, work, cfg_dir))]  # fmt: skip
    if not ours_first:
        starts.reverse()
    t0 = time.perf_counter()
    procs = {name: start() for name, start in starts}
    logs = {"clipsearch-train": lambda: len(tq.rates_ours(work)) if (work / "ours" / "metrics.jsonl").exists() else 0,
            "open_clip_train": lambda: len(tq.rates_open_clip(work)) if (work / "openclip" / "out.log").exists() else 0}  # fmt: skip
    result, trace = {}, []  # trace: (seconds, steps logged by each trainer)
    waiting = {p.pid: name for name, p in procs.items()}
    while waiting:
        trace.append((time.perf_counter() - t0, {name: count() for name, count in logs.items()}))
        pid, status, usage = os.wait4(-1, os.WNOHANG)  # a child's rusage includes its loader workers
        if pid == 0:
            time.sleep(POLL_S)
            continue
        if pid not in waiting:
            continue
        name = waiting.pop(pid)
        procs[name].returncode = os.waitstatus_to_exitcode(status)
        if procs[name].returncode != 0:
            log = work / ("ours.log" if name == "clipsearch-train" else "openclip.log")
            raise SystemExit(f"{name} failed:\n{log.read_text()[-3000:]}")
        result[name] = {"wall_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime}
    result["clipsearch-train"]["rates"] = tq.rates_ours(work)
    result["open_clip_train"]["rates"] = tq.rates_open_clip(work)
    shared = shared_window(trace, {name: len(r["rates"]) for name, r in result.items()})
    for name, r in result.items():
        r["shared"] = shared[name] * args.batch_size
    for r in result.values():
        r["steps"] = len(r["rates"])
        r["samples/s"] = statistics.median(r["rates"][1:])
    return result


POLL_S = 0.5  # how often the logs are read for the shared window


def shared_window(trace, total: dict) -> dict:
    """Steps per second of each trainer over the window in which both were training.

    The window opens when both have logged their first step (start-up and the loader's first batch
    are behind them) and closes when the first of them logs its last step (the other then has the
    machine to itself). ``trace``: polled ``(seconds, {name: steps logged})``.
    """
    start = next(i for i, (_, n) in enumerate(trace) if all(v >= 1 for v in n.values()))
    end = next(i for i, (_, n) in enumerate(trace) if any(n[k] >= total[k] for k in n))
    (t0, n0), (t1, n1) = trace[start], trace[end]
    if t1 <= t0:
        raise SystemExit("the two trainers did not train at the same time; use more --rows")
    return {k: (n1[k] - n0[k]) / (t1 - t0) for k in n0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="the output of `benchmarks/real_data.py emoji`")
    p.add_argument("--rows", type=int, default=3840, help="train on this many rows of train.csv (all: 0)")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--model", default="demo-vit")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per trainer (OMP_NUM_THREADS)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.data = args.data.resolve()
    args.log_every_n_steps = 1
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        tmp = Path(tmp)
        n = subset(args.data, args.rows or None, args.seed, tmp)
        args.data = tmp  # both trainers read tmp/train.csv
        print(f"{args.model}, {n} rows of {p.parse_args().data}/train.csv, {args.epochs} epoch(s), batch "
              f"{args.batch_size}, {args.workers} loader worker(s) and {args.threads} thread(s) each, "
              f"fp32, CPU: {os.cpu_count()} cores; python {sys.version.split()[0]}")  # fmt: skip
        print("| repeat | load before | trainer | steps | samples/s, shared window | samples/s, median step "
              "| wall s | CPU s | ratio (shared) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        runs = []
        for k in range(args.repeats):
            load = os.getloadavg()[0]
            r = run_pair(args, tmp / f"run{k}", ours_first=k % 2 == 0)
            runs.append(r)
            ratio = r["clipsearch-train"]["shared"] / r["open_clip_train"]["shared"]
            for name, m in r.items():
                tail = f"{ratio:.2f}" if name == "clipsearch-train" else ""
                print(f"| {k} | {load:.1f} | {name} | {m['steps']} | {m['shared']:.1f} | {m['samples/s']:.1f} | "
                      f"{m['wall_s']:.0f} | {m['cpu_s']:.0f} | {tail} |", flush=True)  # fmt: skip
        print(f"1-minute load average at the end: {os.getloadavg()[0]:.1f}")
        for name in runs[0]:
            keys = ("shared", "samples/s", "wall_s", "cpu_s")
            med = {k: statistics.median(r[name][k] for r in runs) for k in keys}
            print(
                f"| median | | {name} | | {med['shared']:.1f} | {med['samples/s']:.1f} | {med['wall_s']:.0f} "
                f"| {med['cpu_s']:.0f} | |"
            )
        ratios = [r["clipsearch-train"]["shared"] / r["open_clip_train"]["shared"] for r in runs]
        print(f"median ratio of shared-window samples/s (clipsearch-train / open_clip_train): {statistics.median(ratios):.2f} "
              f"(per repeat: {' '.join(f'{x:.2f}' for x in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
