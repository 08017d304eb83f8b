"""The GPU check of issue 11 in one command, and its CPU half that CI runs so that it cannot rot.

    python benchmarks/gpu_check.py --device cuda --out gpu_check.md    # one GPU, ~8 minutes on an H200
    python benchmarks/gpu_check.py --device cpu --out cpu_check.md     # the CPU half (tests/test_gpu_check.py)

Everything runs on data it generates (the synthetic shapes of ``trainer.synthetic``, 64 px images that
the model's preprocessing resizes to its input size), so the machine needs no network and no dataset.
The stages, each timed and reported even when another fails:

1. **one step against fp32**: a fresh model, one batch; the loss and the gradient of every parameter
   in fp32 (one micro-batch, no checkpointing) against the trainer's own step (``trainer.train.Stepper``
   with ``--accum-freq`` micro-batches and gradient checkpointing) in fp32, each autocast precision and,
   on CUDA, ``amp`` with the loss scaler (gradients unscaled). Reported: the loss's relative difference,
   the gradients' cosine and relative L2 error; each has a bound it must stay within.
2. **a user's index and searches** (``field``): camera-sized photos in mixed formats (one cut short,
   one with a Latin-1 name) indexed with no ``--device`` into a new home (the first run settles in
   the background), a later index that must use the settled verdict (on a GPU, also ``--device cpu``
   and the GPU again: one verdict each), ``query`` by text and image, ``similar``, ``label``, and
   every library's vectors against the reference pipeline (>= 0.995).
3. **training**: ``clipsearch-train`` for a few hundred steps per precision (CUDA: ViT-B/32, ``amp_bf16``
   and ``amp``; CPU: demo-vit, 4 steps of ``amp_bf16``), with ``--grad-checkpointing`` and
   ``--accum-freq``, and OpenCLIP's trainer (``python -m open_clip_train.main``, when installed) with
   the same flags on the same CSV, same architecture JSON. Each trainer runs in its own process;
   samples/s is the median of the per-step figures each trainer logs (data loading included, the first
   3 steps left out); peak memory is the process's peak GPU allocation (CUDA) or peak RSS (CPU).
4. **evaluation**: ``clipsearch-train eval`` of the trained model (zero-shot on the held-out
   folder-per-class set, image<->text retrieval on the validation CSV) on the device; on CUDA also on the
   CPU, and the two must agree.
5. **index and query**: ``clipsearch index RUN_DIR`` (the training output folder as ``--model``) of the
   generated images with ``--device``, images/s, then ``clipsearch query`` (faiss-gpu when installed).

The results are written as markdown (``--out``, after every stage, so a run cut short still leaves
what it measured) ready to paste into ``benchmarks/gpu.md``; the exit code is 0 only when every stage
passed. ``--budget-s`` (540 on a GPU: a whole run took ~470 s on an H200) skips the stages that would not fit in the time left.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/gpu_check.py` from a checkout not pip-installed
    sys.path.insert(0, str(REPO))
RESULT_TAG = "GPU_CHECK_PROCESS "  # the line a trainer process prints about itself at exit
STAGES = ("step", "field", "train", "eval", "index")  # --stages; the data is always generated


@dataclass(frozen=True)
class Profile:
    """What one half of the check runs."""

    model: str
    n_images: int  # generated captioned images (10% of them validation)
    batch_size: int  # per micro-batch
    accum_freq: int
    epochs: int
    precisions: tuple[str, ...]  # the training runs
    compare: tuple[str, ...]  # autocast precisions compared with fp32 on one step
    lr: float
    workers: int
    zeroshot_per_class: int
    eval_on_cpu_too: bool
    field_model: str  # the field stage: random weights of this architecture,
    field_image_size: int  # at this input size,
    field_photos: int  # indexing this many camera-sized photos in mixed formats


PROFILES = {
    # 6,480 training images / (128 x 2) = 25 steps an epoch, 8 epochs: 200 steps per run.
    "cuda": Profile(
        model="ViT-B-32",
        n_images=7200,
        batch_size=128,
        accum_freq=2,
        epochs=8,
        precisions=("amp_bf16", "amp"),
        compare=("amp_bf16", "amp"),
        lr=5e-4,
        workers=min(8, os.cpu_count() or 1),
        zeroshot_per_class=20,
        eval_on_cpu_too=True,
        field_model="ViT-B-32",  # the issue 15 model: ViT-B/32 at 256 px
        field_image_size=256,
        field_photos=320,
    ),
    # Only keeps the script from rotting (tests/test_gpu_check.py): its figures mean nothing, so it
    # does the least that still runs every stage. 72 training images / (16 x 2) = 2 steps an epoch,
    # 2 epochs (an epoch boundary crossed): 4 steps per run, one autocast precision (as on a GPU)
    # through both trainers; fp32 is the one-step stage's reference.
    "cpu": Profile(
        model="demo-vit",
        n_images=80,
        batch_size=16,
        accum_freq=2,
        epochs=2,
        precisions=("amp_bf16",),
        compare=("amp_bf16",),
        lr=1e-3,
        workers=0,
        zeroshot_per_class=3,
        eval_on_cpu_too=False,
        field_model="demo-vit",
        field_image_size=32,
        field_photos=10,
    ),
}

# Bounds of the one-step comparison against fp32: (loss relative difference, gradient cosine at least,
# gradient relative L2 error at most). Accumulation and checkpointing in fp32 change only the order of
# sums; autocast changes the matmul precision (bf16 keeps 8 bits of mantissa, fp16 11).
BOUNDS = {
    "fp32": (1e-4, 0.99999, 1e-3),
    "amp_bf16": (2e-2, 0.99, 0.15),
    "amp": (5e-3, 0.999, 0.05),
}


@dataclass
class Stage:
    name: str
    ok: bool | None = None  # None: skipped
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)  # markdown
    error: str = ""


class Check:
    """Runs the stages in order, writing the markdown report after each one."""

    def __init__(self, args):
        self.args = args
        self.profile = PROFILES["cuda" if args.device.startswith("cuda") else "cpu"]
        self.t0 = time.monotonic()
        self.stages: list[Stage] = []
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
        self.env_lines = environment(args.device)

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def stage(self, name: str, fn, *, needs_s: float = 0.0) -> Stage:
        s = Stage(name)
        self.stages.append(s)
        if self.remaining() < needs_s:
            s.error = f"skipped: {self.remaining():.0f} s of the --budget-s left, needs about {needs_s:.0f} s"
            say(f"[{name}] {s.error}")
            self.write()
            return s
        say(f"[{name}] started at {time.monotonic() - self.t0:.0f} s")
        t = time.monotonic()
        try:
            s.ok = bool(fn(s))
        except Exception as e:  # a failed stage is reported; the next ones still run
            s.ok = False
            s.error = f"{type(e).__name__}: {e}"
            say(traceback.format_exc())
        s.seconds = time.monotonic() - t
        say(f"[{name}] {'passed' if s.ok else 'FAILED'} in {s.seconds:.0f} s {s.error}")
        self.write()
        return s

    def markdown(self) -> str:
        p, a = self.profile, self.args
        passed = sum(s.ok is True for s in self.stages)
        out = [
            f"## gpu_check on {a.device}: {passed}/{len(self.stages)} stages passed "
            f"({time.monotonic() - self.t0:.0f} s)",
            "",
            f"Command: `python benchmarks/gpu_check.py --device {a.device}`; model {p.model}, "
            f"{p.n_images} generated images, batch {p.batch_size} x --accum-freq {p.accum_freq}, "
            f"--grad-checkpointing, {p.epochs} epochs, --workers {p.workers}.",
            "",
            *self.env_lines,
            "",
            "| stage | result | seconds |",
            "|---|---|---|",
        ]
        for s in self.stages:
            result = "skipped" if s.ok is None else "passed" if s.ok else "**FAILED**"
            out.append(f"| {s.name} | {result} {_cell(s.error)} | {s.seconds:.0f} |")
        for s in self.stages:
            if s.lines:
                out += ["", f"### {s.name}", "", *s.lines]
        return "\n".join(out) + "\n"

    def write(self) -> None:
        if self.args.out:
            Path(self.args.out).write_text(self.markdown(), encoding="utf-8")


def say(text: str) -> None:
    from clipsearch.names import printable  # the field stage's file name that is not UTF-8

    print(printable(text), flush=True)


def _cell(text: str) -> str:
    from clipsearch.names import printable  # a file name that is not UTF-8 shows as U+FFFD

    return printable(text).replace("|", "\\|").replace("\n", " ")[:300]


def environment(device: str) -> list[str]:
    import torch

    lines = [f"- machine: {platform.node() or '?'}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
             f"torch {torch.__version__}"]  # fmt: skip
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        lines.append(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    try:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        lines.append(f"- faiss {faiss.__version__}: {gpus} GPU(s) visible to faiss")
    except ImportError:
        lines.append("- faiss: not installed")
    try:
        from importlib.metadata import version

        lines.append(f"- open_clip_torch {version('open_clip_torch')} (its trainer: open_clip_train.main)")
    except Exception:
        lines.append("- open_clip_torch: not installed (the OpenCLIP columns are skipped)")
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:  # no git on the machine
        commit = ""
    lines.append(f"- clipsearch commit {commit or '?'}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return lines


# ---------------------------------------------------------------------------------------------------
# Stage 0: data


def make_data(check: Check, s: Stage) -> bool:
    from trainer.synthetic import generate

    p = check.profile
    check.data = generate(check.work / "data", n=p.n_images, seed=0, zeroshot_per_class=p.zeroshot_per_class)
    n_train = sum(1 for _ in open(check.data.train_csv, encoding="utf-8")) - 1
    check.steps = n_train // (p.batch_size * p.accum_freq) * p.epochs
    s.lines.append(f"{p.n_images} images ({n_train} for training: {check.steps} steps per run), "
                   f"zero-shot set of {len(check.data.classnames)} classes x {p.zeroshot_per_class}.")  # fmt: skip
    return check.steps > 0


# ---------------------------------------------------------------------------------------------------
# Stage 1: one step against fp32


def one_batch(data, preprocess_cfg, tokenizer, n: int):
    """The first ``n`` training pairs, through the evaluation transform (no randomness)."""
    import torch

    from clipsearch.imageio import open_image
    from clipsearch.transform import image_transform
    from trainer.data import Batch, read_csv

    pairs = read_csv(data.train_csv)[:n]
    transform = image_transform(preprocess_cfg, train=False)
    images = torch.stack([transform(open_image(path)) for path, _ in pairs])  # [n, 3, H, W]
    return Batch(images, tokenizer([c for _, c in pairs]), {})


def step_gradients(model, batches, precision: str, device, accum_freq: int, checkpointing: bool):
    """``(loss, flat fp32 gradient on the CPU)`` of one trainer step (:class:`trainer.train.Stepper`)."""
    import torch

    from clipsearch.loss import ClipLoss
    from trainer.data import Batch
    from trainer.placement import Placement
    from trainer.train import Stepper

    placement = Placement(device, precision)
    model.set_grad_checkpointing(checkpointing)
    if accum_freq > 1:  # the same samples, cut into micro-batches
        images = torch.cat([b.images for b in batches])
        texts = torch.cat([b.texts for b in batches])
        batches = [
            Batch(i, t, {}) for i, t in zip(images.chunk(accum_freq), texts.chunk(accum_freq), strict=True)
        ]
    stepper = Stepper(model, ClipLoss(), placement, accum_freq)
    scale = 2.0**16  # torch.amp.GradScaler's first scale; halved on overflow, as the scaler does
    while True:
        model.zero_grad(set_to_none=True)
        scaler = torch.amp.GradScaler(device.type, init_scale=scale) if placement.needs_loss_scaler else None
        loss = stepper.loss_and_backward(batches, lambda x, s=scaler: (s.scale(x) if s else x).backward())
        unscale = 1.0 / scaler.get_scale() if scaler is not None else 1.0
        grad = torch.cat(
            [p.grad.float().flatten() * unscale for p in model.parameters() if p.grad is not None]
        )
        if scaler is None or bool(torch.isfinite(grad).all()) or scale <= 1.0:
            return loss.float().item(), grad.cpu()
        scale /= 2


def compare_step(check: Check, s: Stage) -> bool:
    import torch

    from clipsearch.configs import get_config
    from clipsearch.model import build_model
    from clipsearch.tokenizer import Tokenizer
    from clipsearch.transform import PreprocessConfig
    from trainer.placement import resolve_device

    p = check.profile
    device = resolve_device(check.args.device)
    # Strict fp32 reference: no TF32 in the matmuls and convolutions of this process.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = get_config(p.model)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    pp = PreprocessConfig.from_dict({"image_size": cfg["vision_cfg"]["image_size"]})
    tok = Tokenizer(context_length=cfg["text_cfg"].get("context_length", 77))
    batch = one_batch(check.data, pp, tok, p.batch_size * p.accum_freq)
    ref_loss, ref = step_gradients(model, [batch], "fp32", device, 1, False)
    s.lines += [f"{p.model}, one batch of {len(batch)}; reference: fp32, one micro-batch, no checkpointing "
                f"(loss {ref_loss:.5f}). Each row: the trainer's step with --accum-freq {p.accum_freq} and "
                "--grad-checkpointing.", "",
                "| precision | loss | loss rel. diff | grad cosine | grad rel. L2 error | bounds | within |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
    ok = True
    for precision in ("fp32", *p.compare):
        loss, grad = step_gradients(model, [batch], precision, device, p.accum_freq, True)
        loss_rel = abs(loss - ref_loss) / abs(ref_loss)
        # In float64: a float32 dot product over ViT-B/32's 88M gradients read 1.02 on a GPU machine.
        grad, ref64 = grad.double(), ref.double()
        cos = torch.nn.functional.cosine_similarity(grad, ref64, dim=0).item()
        rel = ((grad - ref64).norm() / ref64.norm()).item()
        b_loss, b_cos, b_rel = BOUNDS[precision]
        within = loss_rel <= b_loss and cos >= b_cos and rel <= b_rel and math.isfinite(loss)
        ok &= within
        s.lines.append(f"| {precision} | {loss:.5f} | {loss_rel:.2e} | {cos:.6f} | {rel:.2e} | "
                       f"<= {b_loss:g}, >= {b_cos:g}, <= {b_rel:g} | {'yes' if within else '**no**'} |")  # fmt: skip
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return ok


# ---------------------------------------------------------------------------------------------------
# Stage 2: training, ours and OpenCLIP's


def child_env(extra: dict | None = None) -> dict:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_process(
    cmd: list[str], *, cwd=None, timeout: float, log: Path, env: dict | None = None
) -> tuple[int, str, dict]:
    """Run a process, its output into ``log``; returns (exit code, output, what it said about itself).
    ``env``: variables set for it on top of this process's."""
    say("  $ " + " ".join(cmd))
    try:
        done = subprocess.run(cmd, cwd=cwd, env=child_env(env), capture_output=True, errors="replace",
                              timeout=max(1.0, timeout))  # fmt: skip
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        rc = -9
        text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        text += f"\n(killed after {timeout:.0f} s)"
    log.write_text(text, encoding="utf-8")
    info = {}
    for line in text.splitlines():
        if line.startswith(RESULT_TAG):
            info = json.loads(line[len(RESULT_TAG) :])
    return rc, text, info


def train_flags(check: Check, precision: str) -> list[str]:
    """The flags both trainers get (OpenCLIP's names, the same meaning in both)."""
    p = check.profile
    return ["--train-data", str(check.data.train_csv), "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--csv-separator", ",", "--dataset-type", "csv",
            "--batch-size", str(p.batch_size), "--accum-freq", str(p.accum_freq), "--grad-checkpointing",
            "--precision", precision, "--epochs", str(p.epochs), "--lr", str(p.lr), "--wd", "0.1",
            "--warmup", str(max(1, check.steps // 10)), "--workers", str(p.workers), "--seed", "0",
            "--log-every-n-steps", "1", "--device", check.args.device]  # fmt: skip


def median_after_warmup(values: list[float]) -> float | None:
    values = values[3:] if len(values) > 4 else values
    return statistics.median(values) if values else None


def train_ours(check: Check, precision: str, config_dir: Path, timeout: float) -> dict:
    out = check.work / f"ours-{precision}"
    argv = [*train_flags(check, precision), "--model", check.profile.model, "--output", str(out),
            "--overwrite", "--zeroshot-frequency", "0", "--save-frequency", "1000"]  # fmt: skip
    rc, text, info = run_process([sys.executable, __file__, "_train", "ours", str(config_dir), "--", *argv],
                                 timeout=timeout, log=check.work / f"ours-{precision}.log")  # fmt: skip
    rates = []
    if (out / "metrics.jsonl").exists():
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
        rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    return {**info, "rc": rc, "tail": text[-1500:], "samples_per_s": median_after_warmup(rates),
            "steps": len(rates), "run_dir": out}  # fmt: skip


OPENCLIP_RATE = re.compile(r"Batch \(t\): [\d.]+, ([\d.]+)/s")


def train_openclip(check: Check, precision: str, config_dir: Path, timeout: float) -> dict:
    # --save-frequency 0: OpenCLIP still saves at the last epoch, as ours does.
    argv = [*train_flags(check, precision), "--model", f"cs-{check.profile.model}", "--logs",
            str(check.work / "openclip"), "--name", precision, "--zeroshot-frequency", "0",
            "--save-frequency", "0", "--report-to", ""]  # fmt: skip
    # OpenCLIP's CsvDataset opens the CSV's paths as given: relative to the working directory.
    rc, text, info = run_process([sys.executable, __file__, "_train", "openclip", str(config_dir), "--", *argv],
                                 cwd=check.data.train_csv.parent, timeout=timeout,
                                 log=check.work / f"openclip-{precision}.log")  # fmt: skip
    rates = [float(m.group(1)) for m in OPENCLIP_RATE.finditer(text)]
    return {**info, "rc": rc, "tail": text[-1500:], "samples_per_s": median_after_warmup(rates),
            "steps": len(rates)}  # fmt: skip


def openclip_available() -> bool:
    try:
        import open_clip_train.main  # noqa: F401
    except Exception as e:  # ImportError, or one of its own dependencies missing
        say(f"  OpenCLIP's trainer cannot be imported ({type(e).__name__}: {e}); its columns are skipped")
        return False
    return True


def compare_training(check: Check, s: Stage) -> bool:
    from clipsearch.configs import get_config

    p = check.profile
    config_dir = check.work / "configs"
    config_dir.mkdir(exist_ok=True)
    # OpenCLIP trains the very architecture JSON ours reads, under a name of its own.
    (config_dir / f"cs-{p.model}.json").write_text(json.dumps(get_config(p.model)), encoding="utf-8")
    with_openclip = openclip_available()
    memory = "peak GPU memory (allocated)" if check.args.device.startswith("cuda") else "peak RSS"
    s.lines += [f"{check.steps} steps of {p.batch_size * p.accum_freq} samples per run; samples/s: median of "
                "the per-step figures each trainer logs (first 3 left out).", "",
                f"| precision | trainer | samples/s | {memory} | steps logged | wall s | exit |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
    ok = True
    runs = [(pr, "clipsearch-train") for pr in p.precisions]
    if with_openclip:
        runs += [(pr, "open_clip_train") for pr in p.precisions]
    runs.sort(key=lambda r: p.precisions.index(r[0]))
    for precision, who in runs:
        left = check.remaining() - (
            60 if check.stages_wanted & {"eval", "index"} else 0
        )  # keep time for them
        if left < 20:
            s.lines.append(f"| {precision} | {who} | skipped: out of time | | | | |")
            ok = False
            continue
        t = time.monotonic()
        fn = train_ours if who == "clipsearch-train" else train_openclip
        r = fn(check, precision, config_dir, left)
        wall = time.monotonic() - t
        rate = f"{r['samples_per_s']:.1f}" if r["samples_per_s"] else "-"
        peak = f"{r['peak_bytes'] / 2**20:.0f} MiB" if r.get("peak_bytes") else "-"
        s.lines.append(f"| {precision} | {who} | {rate} | {peak} | {r['steps']} | {wall:.0f} | {r['rc']} |")
        if who == "clipsearch-train":
            good = r["rc"] == 0 and r["steps"] == check.steps and (r["run_dir"] / "model").is_dir()
            if good:
                check.run_dirs[precision] = r["run_dir"]
        else:
            good = r["rc"] == 0 and r["steps"] > 0
        if not good:
            ok = False
            s.lines.append(
                f"| | (output of the failed run, last lines) `{_cell(r['tail'][-240:])}` | | | | | |"
            )
        check.write()
    if not with_openclip:
        s.lines += ["", "OpenCLIP's trainer could not be imported here: no reference column."]
    return ok


def own_peak_rss() -> int:
    """This process's own peak RSS in bytes: ``VmHWM`` starts anew at exec, while ``ru_maxrss`` of a
    child started from a big parent begins at the parent's size at the fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def trainer_process(who: str, config_dir: str, argv: list[str]) -> int:
    """Inside a child process: run one trainer, then print what it used (``RESULT_TAG``)."""
    import torch

    t = time.monotonic()
    if who == "ours":
        from trainer.train import main

        rc = main(argv)
    else:
        import open_clip
        from open_clip_train.main import main

        open_clip.add_model_config(config_dir)
        rc = main(argv) or 0
    info = {"wall_s": time.monotonic() - t, "rc": rc}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        info["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        info["peak_bytes"] = own_peak_rss()
    print(RESULT_TAG + json.dumps(info), flush=True)
    return int(rc)


# ---------------------------------------------------------------------------------------------------
# Stage 3: evaluation; stage 4: index and query


def trained_run(check: Check) -> Path:
    if not check.run_dirs:
        raise RuntimeError("no training run finished, nothing to evaluate")
    return next(iter(check.run_dirs.values()))


def evaluate_model(check: Check, s: Stage) -> bool:
    run = trained_run(check)
    devices = [check.args.device] + (["cpu"] if check.profile.eval_on_cpu_too else [])
    results = {}
    for device in devices:
        cmd = [sys.executable, "-m", "trainer.cli", "eval", "--model", str(run / "model"),
               "--zeroshot-data", str(check.data.zeroshot_dir), "--retrieval-data", str(check.data.val_csv),
               "--device", device, "--json"]  # fmt: skip
        rc, text, _ = run_process(cmd, timeout=check.remaining(), log=check.work / f"eval-{device}.log")
        if rc != 0:
            s.error = f"eval --device {device} exited {rc}: {text.strip().splitlines()[-1:] or ''}"
            return False
        results[device] = json.loads(text.strip().splitlines()[-1])
    keys = ["zeroshot_top1", "zeroshot_top5", "image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1",
            "text_to_image_R@5", "val_loss"]  # fmt: skip
    s.lines += [f"The model of {run.name}, `clipsearch-train eval --zeroshot-data ... --retrieval-data ...`.",
                "", "| metric | " + " | ".join(devices) + " |", "|---|" + "---|" * len(devices)]  # fmt: skip
    for k in keys:
        s.lines.append(f"| {k} | " + " | ".join(f"{results[d][k]:.4f}" for d in devices) + " |")
    s.lines.append(
        f"| zero-shot chance | {results[devices[0]]['zeroshot_chance']:.4f} |" + " |" * (len(devices) - 1)
    )
    if len(devices) == 2:
        # The same model and images: only the arithmetic's order differs (TF32 convolutions on the GPU).
        diff = max(abs(results[devices[0]][k] - results["cpu"][k]) for k in keys)
        s.lines += ["", f"Largest difference between {devices[0]} and cpu: {diff:.4f} (must be <= 0.02)."]
        return diff <= 0.02
    return True


def index_and_query(check: Check, s: Stage) -> bool:
    run = trained_run(check)
    db = check.work / "library.db"
    folder = check.data.root / "images"
    n_images = sum(1 for _ in folder.iterdir())
    base = [sys.executable, "-m", "clipsearch", "--db", str(db)]
    t = time.monotonic()
    rc, text, _ = run_process([*base, "index", str(folder), "--model", str(run), "--device", check.args.device,
                               "--json"], timeout=check.remaining(), log=check.work / "index.log")  # fmt: skip
    index_s = time.monotonic() - t
    if rc != 0:
        s.error = f"index exited {rc}: {text.strip().splitlines()[-1:] or ''}"
        return False
    report = json.loads(text[text.index("{") :])
    t = time.monotonic()
    rc, text, _ = run_process([*base, "--verbose", "query", "a red circle", "-n", "5", "--json", "--device",
                               check.args.device], timeout=check.remaining(), log=check.work / "query.log")  # fmt: skip
    query_s = time.monotonic() - t
    if rc != 0:
        s.error = f"query exited {rc}: {text.strip().splitlines()[-1:] or ''}"
        return False
    hits = json.loads(text[text.index("[") : text.rindex("]") + 1])
    faiss_lines = [
        line.strip() for line in text.splitlines() if "faiss" in line.lower() or "gpu" in line.lower()
    ]
    s.lines += [f"`clipsearch index {folder.name}/ --model RUN_DIR --device {check.args.device}` "
                f"({n_images} images): the indexing itself {report['seconds']:.1f} s, "
                f"**{n_images / max(report['seconds'], 1e-9):.1f} images/s** (backend {report.get('backend')}); "
                f"the whole command, with model load and FAISS build, {index_s:.1f} s "
                f"({n_images / index_s:.1f} images/s); summary: `{_cell(json.dumps(report))}`",
                "", f"`clipsearch query 'a red circle' --device {check.args.device}`: {query_s:.1f} s for the "
                f"command, {len(hits)} hits, top: {', '.join(Path(h['path']).name for h in hits[:5])}."]  # fmt: skip
    if faiss_lines:
        s.lines += ["", "Vector search log: " + "; ".join(f"`{_cell(x)}`" for x in faiss_lines[:4])]
    return len(hits) == 5


# ---------------------------------------------------------------------------------------------------
# Stage 2: the user's path on this machine


def field_model(work: Path, p: Profile) -> Path:
    """A model folder: ``p.field_model`` at ``p.field_image_size`` px with random weights."""
    import torch

    from clipsearch.configs import get_config
    from clipsearch.model import build_model
    from clipsearch.modelfile import save_model
    from clipsearch.tokenizer import Tokenizer
    from clipsearch.transform import PreprocessConfig

    directory = work / f"model-{p.field_model}-{p.field_image_size}"
    torch.manual_seed(0)
    cfg = get_config(p.field_model)
    cfg["vision_cfg"]["image_size"] = p.field_image_size
    save_model(directory, build_model(cfg), PreprocessConfig(p.field_image_size), Tokenizer(), model_cfg=cfg)
    return directory


def reference_features(model_dir: Path, paths: list[Path]):
    """The reference pipeline's L2-normalised features: Pillow's full decode (no libvips, no reduced
    scale), the model's eval transform, the fp32 model on the CPU."""
    from unittest import mock

    import torch

    from clipsearch import pngvips
    from clipsearch.checkpoints import load_bundle
    from clipsearch.imageio import open_image

    bundle = load_bundle(str(model_dir), device="cpu")
    with mock.patch.object(pngvips, "decode", lambda data, im, shrink=1: None):
        pixels = torch.stack([bundle.preprocess(open_image(path)) for path in paths])
    with torch.no_grad():
        features = torch.cat([bundle.model.encode_image(b) for b in pixels.split(32)])
    return torch.nn.functional.normalize(features.double(), dim=-1).numpy()


def _json_of(text: str):
    """The JSON document a command printed on stdout (its --verbose log follows it in ``text``)."""
    start = min(i for i in (text.find("{"), text.find("[")) if i >= 0)
    return json.JSONDecoder().raw_decode(text[start:])[0]


def field_use(check: Check, s: Stage) -> bool:
    """What a user meets here: camera-sized photos in mixed formats (JPEG, PNG with and without alpha,
    WebP, HEIC; one of them cut short mid-copy, one copy under a name that is not UTF-8) indexed with
    no ``--device`` (auto) into a new home, so the first run settles its backend; a later index into
    a new library once it has; then ``query`` by text and by image, ``similar`` and ``label``. The
    stored vectors of both runs are held against the reference pipeline (cosine >= 0.995)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from mixed_formats import make_folder

    from clipsearch.store import Library

    p, work = check.profile, check.work / "field"
    photos = work / "photos"
    t = time.monotonic()
    counts = make_folder(photos, p.field_photos, workers=os.cpu_count() or 1)
    made_s = time.monotonic() - t
    good = sorted(x for x in photos.iterdir() if x.name.startswith("photo_"))
    jpeg = next(x for x in good if x.suffix == ".jpg")
    (photos / "cut.jpg").write_bytes(jpeg.read_bytes()[:3000])  # a copy that stopped after 3 KB
    latin1 = Path(os.fsdecode(os.fsencode(photos) + b"/caf\xe9.jpg"))  # "café.jpg" as Latin-1 bytes
    shutil.copyfile(jpeg, latin1)
    model = field_model(work, p)
    n = len(good) + 1  # the copy under the Latin-1 name is a photo too
    env = {"CLIPSEARCH_HOME": str(work / "home")}
    s.lines += [f"{len(good)} synthetic photos ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}; "
                f"2-4 MP, written in {made_s:.0f} s), a JPEG cut short after 3 KB and a copy named "
                f"`caf\\xe9.jpg` (Latin-1); model {p.field_model} at {p.field_image_size} px, random "
                "weights. Every command as a user types it: no `--device`, a new `CLIPSEARCH_HOME`.", "",
                "| command | exit | seconds | what it said |", "|---|---:|---:|---|"]  # fmt: skip
    ok = True

    def cs(name: str, db: str, *args: str):
        nonlocal ok
        t = time.monotonic()
        rc, text, _ = run_process([sys.executable, "-m", "clipsearch", "--verbose", "--db", str(work / db), *args],
                                  timeout=check.remaining(), log=work / f"{name}.log", env=env)  # fmt: skip
        seconds = time.monotonic() - t
        try:
            out = _json_of(text) if rc == 0 else None
        except (ValueError, json.JSONDecodeError):
            out = None
        device = re.search(r"device: (\S+)", text)
        said = f"device {device.group(1)}; " if device else ""
        if rc != 0 or out is None:
            ok = False
            said += "**failed**: " + " / ".join(text.strip().splitlines()[-2:])
        if "settling" in text and "in the background" in text:
            said += "started a background settle; "
        return out, seconds, rc, said

    reports = {}
    # (what, library, extra index flags, whether it starts the settle that is then waited for)
    runs = [("first index", "first.db", [], True), ("later index", "library.db", [], False)]
    if check.args.device.startswith("cuda"):  # the same machine's CPU next to its GPU: one verdict each
        runs += [("`--device cpu`", "cpu.db", ["--device", "cpu"], True),
                 ("after the CPU's settle", "again.db", [], False)]  # fmt: skip
    for run, db, flags, settles in runs:
        report, seconds, rc, said = cs(
            db.removesuffix(".db") + "-index",
            db,
            "index",
            str(photos),
            "--model",
            str(model),
            *flags,
            "--json",
        )
        if report is not None:
            failed = [Path(f["path"]).name for f in report.get("failed", [])]
            said += (f"{report['new']} new, failed {failed}, backend {report['backend']}, indexing "
                     f"{report['seconds']:.1f} s = **{n / max(report['seconds'], 1e-9):.1f} photos/s** "
                     f"({n / seconds:.1f} for the whole command)")  # fmt: skip
            if report["new"] != n or failed != ["cut.jpg"]:
                ok = False
                said += " (**expected** " + f"{n} new and cut.jpg failed)"
            if not settles and "background settle" in said:
                ok = False  # the verdict the settle wrote was not for this device, or was lost
                said += " (**expected** the settled verdict, no second settle)"
            reports[db] = report
        s.lines.append(
            f"| `clipsearch index PHOTOS --model M` ({run}) | {rc} | {seconds:.1f} | {_cell(said)} |"
        )
        if settles and report is not None:
            from clipsearch import settle  # the run settled its backend in the background

            t = time.monotonic()
            os.environ["CLIPSEARCH_HOME"] = env["CLIPSEARCH_HOME"]
            try:
                settled = settle.wait(report["model_id"], timeout=max(1.0, min(180, check.remaining() - 60)))
            finally:
                os.environ.pop("CLIPSEARCH_HOME")
            verdicts = sorted((work / "home" / "backends").glob("*/verdict*.json"))
            chosen = ", ".join(f"{json.loads(v.read_text()).get('chosen')} ({v.name})" for v in verdicts)
            s.lines.append(f"| (the background settle, waited for) | - | {time.monotonic() - t:.1f} | "
                           f"{'done' if settled else '**still running**'}; verdict: {chosen or '-'} |")  # fmt: skip
            ok &= settled
    searches = [
        ("query", "query 'a dog on a beach'", ["query", "a dog on a beach", "-n", "5", "--json"]),
        ("query-image", "query --image PHOTO", ["query", "--image", str(good[1]), "-n", "5", "--json"]),
        ("similar", "similar caf\\xe9.jpg", ["similar", str(latin1), "-n", "3", "--json"]),
        ("label", "label --classes dog,cat,beach", ["label", "--classes", "dog,cat,beach", "--json"]),
    ]
    for name, shown, args in searches:
        out, seconds, rc, said = cs(name, "library.db", *args)
        if out is not None:
            said += f"{len(out)} results; first: {Path(out[0]['path']).name if out else '-'}"
            first_expected = {"query-image": good[1].name, "similar": latin1.name}.get(name)
            want = {"query": 5, "query-image": 5, "similar": 3, "label": n}[name]
            if len(out) != want or (first_expected and Path(out[0]["path"]).name != first_expected):
                ok = False
                said += f" (**expected** {want} results" + (
                    f", {first_expected} first)" if first_expected else ")"
                )
        s.lines.append(f"| `clipsearch {_cell(shown)}` | {rc} | {seconds:.1f} | {_cell(said)} |")
    # The stored vectors against the reference pipeline, on up to 64 of the photos and the Latin-1 copy.
    sample = good[:: max(1, len(good) // 64)][:64] + [latin1]
    t = time.monotonic()
    reference = dict(zip(sample, reference_features(model, sample), strict=True))
    s.lines += ["", f"Stored vectors against the reference pipeline (Pillow's full decode, fp32 on the CPU; "
                f"{len(sample)} photos, reference in {time.monotonic() - t:.0f} s):", ""]  # fmt: skip
    for db, report in reports.items():
        with Library.open(work / db, readonly=True) as lib:
            ids, paths, vectors = lib.embeddings(report["model_id"])
        stored = dict(zip(map(Path, paths), vectors, strict=True))
        cos = [float(stored[x] @ reference[x]) for x in sample if x in stored]
        worst = min(cos) if cos else float("nan")
        good_enough = len(cos) == len(sample) and worst >= 0.995
        ok &= good_enough
        s.lines.append(f"- {db} ({report['backend']}): worst cosine **{worst:.5f}**, median "
                       f"{statistics.median(cos) if cos else float('nan'):.5f} over {len(cos)} of {len(sample)} "
                       f"photos{'' if good_enough else ' (**must be >= 0.995 on every photo**)'}")  # fmt: skip
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_train"]:  # a trainer child process (see trainer_process)
        return trainer_process(argv[1], argv[2], argv[4:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N (the GPU half) or cpu (the CPU half)")
    ap.add_argument("--out", default=None, help="markdown results, rewritten after every stage")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip stages that would not fit (default: 540 on a GPU, 3600 on the CPU)")  # fmt: skip
    ap.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated stages to run, of {','.join(STAGES)} (default: all; eval and "
                         "index need the train stage's amp_bf16 model)")  # fmt: skip
    ap.add_argument(
        "--precisions", default=None, help="comma-separated training precisions (default: the profile's)"
    )
    args = ap.parse_args(argv)
    stages = set(args.stages.split(","))
    if not stages <= set(STAGES):
        ap.error(f"--stages: unknown {', '.join(sorted(stages - set(STAGES)))} (known: {', '.join(STAGES)})")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        say(
            "gpu_check: --device cuda, but PyTorch sees no CUDA GPU here; run with --device cpu for the CPU half"
        )
        return 2
    if args.budget_s is None:
        args.budget_s = 540.0 if args.device.startswith("cuda") else 3600.0
    check = Check(args)
    if args.precisions:
        check.profile = replace(check.profile, precisions=tuple(args.precisions.split(",")))
    check.run_dirs = {}
    check.stages_wanted = stages
    say(f"gpu_check: {args.device}, work folder {check.work}")
    try:
        data = check.stage("generate data", lambda s: make_data(check, s))
        plan = [("step", "one step against fp32", compare_step, 10),
                ("field", "a user's index and searches", field_use, 60),
                ("train", "training, side by side", compare_training, 60),
                ("eval", "zero-shot and retrieval evaluation", evaluate_model, 10),
                ("index", "index and query", index_and_query, 10)]  # fmt: skip
        for key, name, fn, needs_s in plan if data.ok else ():
            if key in stages:
                check.stage(name, lambda s, fn=fn: fn(check, s), needs_s=needs_s)
    finally:
        say("\n" + check.markdown())
        if not args.keep and not args.work:
            shutil.rmtree(check.work, ignore_errors=True)
    return 0 if all(s.ok for s in check.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
