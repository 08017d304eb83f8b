"""clipsearch against rclip, side by side on the same photos, with the same model weights.

rclip (https://github.com/yurijmikhalevich/rclip) is the closest peer: a CLI that indexes a folder
with ONNX Runtime on the CPU and answers text queries without PyTorch. It downloads its model
(ViT-B-32-256, datacomp) from Hugging Face; there is no network here, so this script builds a
ViT-B-32 at 256 px with random weights, exports its towers to ONNX in the layout rclip reads from
``$RCLIP_DATADIR`` (``visual.onnx`` and ``textual.onnx`` with an ``input`` tensor, and the CLIP BPE
vocabulary), and gives clipsearch the very same weights as a model folder. The work per image is then
identical model-wise; what differs is each tool's pipeline (decoding, preprocessing, inference
backend, storage).

rclip must be installed in its own environment (its pins differ from ours)::

    python -m venv /tmp/rclipenv && /tmp/rclipenv/bin/pip install rclip==3.3.0
    python benchmarks/rclip_compare.py --rclip /tmp/rclipenv/bin/rclip --photos 64 --runs 3

Measured, each a fresh process timed from here (wall time, CPU time and peak RSS from ``wait4``),
the two tools alternating and taking turns to go first, median of ``--runs`` and the ratio of each
round (under a varying load the per-round ratios are the steadier figure):

- **index**: a fresh library of ``--photos`` 12 MP JPEGs (``rclip -f -n`` cannot index only, so rclip
  runs ``rclip -f QUERY`` in the folder, which indexes it and answers one query; the query-only time
  measured below is subtracted to give its indexing time). clipsearch runs ``clipsearch index``; its
  one-time backend measurement for the model is done beforehand (reported separately), as rclip's
  one-time model download is.
- **query**: a new text on the indexed library, whole process (``rclip -n -f``; ``clipsearch query
  --paths``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import machine, set_home  # noqa: E402  (sibling benchmarks)
from index_speed import make_photos  # noqa: E402

RCLIP_MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"  # where rclip 3.x looks under $RCLIP_DATADIR


def model_dir_256(work: Path, seed: int = 0) -> Path:
    """A clipsearch model folder: ViT-B/32 (GELU) at 256 px, random weights (made once)."""
    directory = work / f"model-ViT-B-32-256-seed{seed}"
    if not (directory / "clipsearch_model.json").is_file():
        import torch

        from clipsearch.checkpoints import save_model
        from clipsearch.configs import get_config
        from clipsearch.model import build_model
        from clipsearch.tokenizer import Tokenizer
        from clipsearch.transform import PreprocessConfig

        torch.manual_seed(seed)
        cfg = get_config("ViT-B-32")
        cfg["vision_cfg"]["image_size"] = 256
        save_model(directory, build_model(cfg), PreprocessConfig(256), Tokenizer(), model_cfg=cfg)
    return directory


def rclip_models(work: Path, model_dir: Path) -> Path:
    """``visual.onnx``, ``textual.onnx`` and the BPE vocabulary in rclip's layout (made once)."""
    root = work / "rclip-models"
    sub = root / RCLIP_MODEL_SUBDIR
    if (sub / "textual.onnx").is_file():
        return root
    import torch

    from clipsearch.backends import export_onnx
    from clipsearch.checkpoints import load_bundle

    model = load_bundle(str(model_dir)).model.float().eval()

    class TextTower(torch.nn.Module):
        """``encode_text`` without the end-of-text cut: rclip feeds all 77 positions, and a traced
        cut would freeze the example's length."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens):  # [B, 77] -> [B, D]
            self.model._eot_cut = False
            return self.model.encode_text(tokens)

    text_tower = TextTower(model).eval()

    sub.mkdir(parents=True, exist_ok=True)
    axes = {"input": {0: "batch"}, "output": {0: "batch"}}
    export_onnx(
        model.visual, (torch.zeros(1, 3, 256, 256),), sub / "visual.onnx", ["input"], ["output"], axes
    )
    tokens = torch.zeros(1, 77, dtype=torch.long)
    tokens[0, :3] = torch.tensor([49406, 320, 49407])
    export_onnx(text_tower, (tokens,), sub / "textual.onnx", ["input"], ["output"], axes)
    (root / "tokenizer").mkdir(exist_ok=True)
    vocab = Path(__file__).resolve().parents[1] / "clipsearch" / "data" / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(vocab) as f:  # a readable gzip, not a truncated copy
        f.read(1)
    shutil.copy(vocab, root / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz")
    return root


def timed(cmd: list[str], env: dict, cwd: Path | None = None) -> tuple[float, float, str, float]:
    """(wall s, CPU s, stdout, peak RSS MB) of one fresh process; raises with its stderr if it fails."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: CPU and peak RSS
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, stdout, usage.ru_maxrss / 1024


def fresh_rclip_datadir(work: Path, models: Path, run: int) -> Path:
    """An rclip data folder with the models linked in and no database yet."""
    d = work / f"rclip-data-{run}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for entry in models.iterdir():
        os.symlink(entry, d / entry.name)
    return d


def rclip_count(datadir: Path) -> int:
    """Images in rclip's database (to check that it really indexed them all)."""
    db = next(datadir.glob("*.sqlite3"), None) or next(datadir.glob("*.db"), None)
    if db is None:
        return -1
    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM images").fetchone()[0]


def _median(values):
    return statistics.median(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rclip", required=True, help="the rclip executable (installed in its own venv)")
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--megapixels", type=float, default=12.0)
    ap.add_argument(
        "--folder",
        type=Path,
        help="index this folder instead of generated JPEGs (benchmarks/mixed_formats.py)",
    )
    ap.add_argument(
        "--first-run",
        action="store_true",
        help="every clipsearch run in a new CLIPSEARCH_HOME: the model's first index on a new machine",
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench"))
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    set_home(args.work)
    env = dict(os.environ)
    if args.prepare:
        print(json.dumps(_prepare(args)))
        return
    # The model, rclip's ONNX files and the photos are made in a child process: the timed tools are
    # children of this one, and a child's peak RSS (wait4) starts from its parent's size at the fork,
    # so this process must stay small (torch and a model in it made every figure read 2 GB).
    made = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], "--prepare"], env=env, capture_output=True, text=True
    )
    if made.returncode != 0:
        raise SystemExit(f"preparing the model and photos failed:\n{made.stderr[-2000:]}")
    prepared = json.loads(made.stdout.splitlines()[-1])
    model_dir, models, folder = (Path(prepared[k]) for k in ("model_dir", "models", "folder"))
    n_photos, what = prepared["n_photos"], prepared["what"]
    print(prepared["machine"])
    print(f"clipsearch commit {_commit()}; load average {os.getloadavg()[0]:.1f} at start")
    clip = [sys.executable, "-m", "clipsearch"]
    if not args.first_run:
        # clipsearch's one-time work for a new model, done before the timed runs as rclip's download is
        warm = args.work / "rclip-compare-warm"
        make_photos(warm, 2, 1.0)
        t, _, out, _ = timed(
            [
                *clip,
                "--db",
                str(args.work / "warm.db"),
                "index",
                str(warm),
                "--model",
                str(model_dir),
                "--json",
            ],
            env,
        )
        _wait_settled(json.loads(out)["model_id"], env)
        print(
            f"clipsearch's one-time work for this model (settled before the timed runs): {t:.1f} s + background"
        )

    bench = Bench(args, env, clip, model_dir, models, folder, n_photos)
    rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in ROWS}
    loads = []
    for run in range(args.runs):
        loads.append(os.getloadavg()[0])
        # alternate which tool goes first, so a change of load within a round hits both alike
        steps = [_run_rclip, _run_clipsearch] if run % 2 == 0 else [_run_clipsearch, _run_rclip]
        backend = ""
        for step in steps:
            backend = step(bench, run, rows) or backend
        rc_index = rows["rc_all"][-1][0] - rows["rc_q"][-1][0]
        print(
            f"run {run}: rclip index {rc_index:.1f} s ({rows['rc_all'][-1][0]:.1f} s index+query), "
            f"clipsearch index {rows['cs_idx'][-1][0]:.1f} s ({backend}), "
            f"ratio {rows['cs_idx'][-1][0] / rc_index:.2f}, load {loads[-1]:.1f} -> {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    loads.append(os.getloadavg()[0])
    _summary(args, rows, n_photos, what, loads)


QUERY = "a red boat at sunset"
ROWS = ("rc_all", "rc_q", "cs_idx", "cs_q", "cs_settle")  # (wall s, CPU s, peak RSS MB) per run


@dataclass
class Bench:
    args: argparse.Namespace
    env: dict
    clip: list  # how to run clipsearch
    model_dir: Path
    models: Path  # rclip's model files
    folder: Path
    n_photos: int


def _run_rclip(b: Bench, run: int, rows: dict) -> str:
    """rclip's index+query process in a new data folder, then its query-only process."""
    data = fresh_rclip_datadir(b.args.work, b.models, run)
    renv = {**b.env, "RCLIP_DATADIR": str(data)}
    wall, cpu, _, rss = timed([b.args.rclip, "-f", "-t", "5", QUERY], renv, cwd=b.folder)
    n = rclip_count(data)
    if n != b.n_photos:
        raise SystemExit(f"rclip indexed {n} of {b.n_photos} photos: the comparison would be wrong")
    rows["rc_all"].append((wall, cpu, rss))
    w, c, _, r = timed([b.args.rclip, "-n", "-f", "-t", "5", f"{QUERY} {run}"], renv, cwd=b.folder)
    rows["rc_q"].append((w, c, r))
    return ""


def _run_clipsearch(b: Bench, run: int, rows: dict) -> str:
    """clipsearch's index into a new library, then a new text query on it; returns the backend."""
    db = b.args.work / f"rclip-compare-cs-{run}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(f"{db}.faiss", ignore_errors=True)
    cenv = b.env
    if b.args.first_run:
        home = b.args.work / f"first-run-home-{run}"
        shutil.rmtree(home, ignore_errors=True)
        cenv = {**b.env, "CLIPSEARCH_HOME": str(home)}
    cs = [*b.clip, "--db", str(db)]
    w, c, out, r = timed([*cs, "index", str(b.folder), "--model", str(b.model_dir), "--json"], cenv)
    report = json.loads(out)
    if report["new"] != b.n_photos:
        raise SystemExit(f"clipsearch indexed {report['new']} of {b.n_photos} photos: {report}")
    rows["cs_idx"].append((w, c, r))
    if b.args.first_run:
        start = time.perf_counter()
        _wait_settled(report["model_id"], cenv)  # the background work, timed, before anything else runs
        rows["cs_settle"].append((time.perf_counter() - start, 0.0, 0.0))
    w, c, _, r = timed([*cs, "query", "--paths", "--top", "5", f"{QUERY} {run}"], cenv)
    rows["cs_q"].append((w, c, r))
    return report["backend"]


def _summary(args, rows, n_photos, what, loads) -> None:
    med = {k: tuple(_median([row[i] for row in v]) for i in range(3)) for k, v in rows.items()}
    # rclip cannot index without querying: its index is its index+query process minus its query-only one
    rc = [(a[0] - q[0], a[1] - q[1]) for a, q in zip(rows["rc_all"], rows["rc_q"], strict=True)]
    rc_index, rc_cpu = _median([x[0] for x in rc]), _median([x[1] for x in rc])
    cs_index, cs_cpu = med["cs_idx"][0], med["cs_idx"][1]
    ratios = [c[0] / r[0] for c, r in zip(rows["cs_idx"], rc, strict=True)]
    first = " (first run: new CLIPSEARCH_HOME each time)" if args.first_run else ""
    print(f"\n{what}, ViT-B/32 at 256 px (same weights), median of {args.runs}{first}")
    print(f"load average (1 min) before each round and at the end: {', '.join(f'{x:.1f}' for x in loads)}\n")
    print(
        "| tool | index s | index CPU s | images/s | index peak RSS MB | query s (new text) | query CPU s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| rclip 3.3.0 | {rc_index:.1f} | {rc_cpu:.1f} | {n_photos / rc_index:.2f} | {med['rc_all'][2]:.0f} | "
        f"{med['rc_q'][0]:.2f} | {med['rc_q'][1]:.2f} |"
    )
    print(
        f"| clipsearch | {cs_index:.1f} | {cs_cpu:.1f} | {n_photos / cs_index:.2f} | {med['cs_idx'][2]:.0f} | "
        f"{med['cs_q'][0]:.2f} | {med['cs_q'][1]:.2f} |"
    )
    print(
        f"\nindex wall time, clipsearch / rclip: {cs_index / rc_index:.2f} at the medians; per round "
        f"{', '.join(f'{x:.2f}' for x in ratios)} (median {_median(ratios):.2f}); CPU time {cs_cpu / rc_cpu:.2f}"
    )
    print(f"rclip index+query process {med['rc_all'][0]:.1f} s, of which query ~{med['rc_q'][0]:.2f} s")
    if args.first_run:
        print(
            f"clipsearch's background settle after each first index: median {med['cs_settle'][0]:.1f} s more (niced)"
        )


def _prepare(args) -> dict:
    """The model folder, rclip's files and the photo folder (made once), with the machine's line."""
    model_dir = model_dir_256(args.work)
    models = rclip_models(args.work, model_dir)
    if args.folder is not None:
        folder = args.folder.resolve()
        n_photos = sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        what = (
            f"{n_photos} files of {folder} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(_formats(folder).items()))
            + ")"
        )
    else:
        photos = args.work / f"photos-{args.megapixels:g}mp"
        make_photos(photos, args.photos, args.megapixels)
        folder = args.work / f"rclip-compare-{args.photos}"
        folder.mkdir(exist_ok=True)
        for p in sorted(photos.glob("*.jpg"))[: args.photos]:  # the same files for both tools
            if not (folder / p.name).exists():
                os.link(p, folder / p.name)
        n_photos = args.photos
        what = f"{n_photos} JPEGs of {args.megapixels:g} MP"
    return {
        "model_dir": str(model_dir),
        "models": str(models),
        "folder": str(folder),
        "n_photos": n_photos,
        "what": what,
        "machine": machine(),
    }


def _commit() -> str:
    """The clipsearch commit measured (with a mark when the tree has changes)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "-uno"], capture_output=True, text=True
        )
    except OSError:
        return "?"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _formats(folder: Path) -> dict:
    counts: dict[str, int] = {}
    for p in folder.iterdir():
        if p.is_file() and not p.name.startswith("."):
            key = p.name.split(".", 1)[1] if "." in p.name else "?"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _wait_settled(model_id: str, env: dict) -> None:
    """Wait until the model's background settle (started by the index that just returned) is done:
    ``settle.wait`` in a child, whose ``CLIPSEARCH_HOME`` is the benchmark's."""
    code = "import sys; from clipsearch import settle; settle.wait(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, model_id], env=env, check=True)


if __name__ == "__main__":
    main()
