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

Measured, each a fresh process timed from here, the two tools alternating, median of ``--runs``:

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
    args = ap.parse_args()

    set_home(args.work)
    env = dict(os.environ)
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
    print(machine())
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

    query = "a red boat at sunset"
    keys = ("rc_all", "rc_q", "cs_idx", "cs_q", "cs_settle")
    rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in keys}
    for run in range(args.runs):
        data = fresh_rclip_datadir(args.work, models, run)
        renv = {**env, "RCLIP_DATADIR": str(data)}
        wall, cpu, _, rss = timed([args.rclip, "-f", "-t", "5", query], renv, cwd=folder)
        n = rclip_count(data)
        if n != n_photos:
            raise SystemExit(f"rclip indexed {n} of {n_photos} photos: the comparison would be wrong")
        rows["rc_all"].append((wall, cpu, rss))
        w, c, _, r = timed([args.rclip, "-n", "-f", "-t", "5", f"{query} {run}"], renv, cwd=folder)
        rows["rc_q"].append((w, c, r))

        db = args.work / f"rclip-compare-cs-{run}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(f"{db}.faiss", ignore_errors=True)
        cenv = env
        if args.first_run:
            home = args.work / f"first-run-home-{run}"
            shutil.rmtree(home, ignore_errors=True)
            cenv = {**env, "CLIPSEARCH_HOME": str(home)}
        cs = [*clip, "--db", str(db)]
        w, c, out, r = timed([*cs, "index", str(folder), "--model", str(model_dir), "--json"], cenv)
        report = json.loads(out)
        if report["new"] != n_photos:
            raise SystemExit(f"clipsearch indexed {report['new']} of {n_photos} photos: {report}")
        rows["cs_idx"].append((w, c, r))
        if args.first_run:
            start = time.perf_counter()
            _wait_settled(report["model_id"], cenv)  # the background work, timed, before anything else runs
            rows["cs_settle"].append((time.perf_counter() - start, 0.0, 0.0))
        w, c, _, r = timed([*cs, "query", "--paths", "--top", "5", f"{query} {run}"], cenv)
        rows["cs_q"].append((w, c, r))
        print(
            f"run {run}: rclip {rows['rc_all'][-1][0]:.1f} s (index+query), clipsearch index {rows['cs_idx'][-1][0]:.1f} s "
            f"({report['backend']}), load {os.getloadavg()[0]:.1f}",
            flush=True,
        )

    med = {k: tuple(_median([row[i] for row in v]) for i in range(3)) for k, v in rows.items()}
    rc_index = med["rc_all"][0] - med["rc_q"][0]
    cs_index = med["cs_idx"][0]
    first = " (first run: new CLIPSEARCH_HOME each time)" if args.first_run else ""
    print(f"\n{what}, ViT-B/32 at 256 px (same weights), median of {args.runs}{first}\n")
    print("| tool | index s | images/s | index peak RSS MB | query s (new text) | query CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| rclip 3.3.0 | {rc_index:.1f} | {n_photos / rc_index:.2f} | {med['rc_all'][2]:.0f} | "
        f"{med['rc_q'][0]:.2f} | {med['rc_q'][1]:.2f} |"
    )
    print(
        f"| clipsearch | {cs_index:.1f} | {n_photos / cs_index:.2f} | {med['cs_idx'][2]:.0f} | "
        f"{med['cs_q'][0]:.2f} | {med['cs_q'][1]:.2f} |"
    )
    print(
        f"\nindex wall time, clipsearch / rclip: {cs_index / rc_index:.2f} (clipsearch {rc_index / cs_index:.2f}x faster)"
    )
    print(f"rclip index+query process {med['rc_all'][0]:.1f} s, of which query ~{med['rc_q'][0]:.2f} s")
    if args.first_run:
        print(
            f"clipsearch's background settle after each first index: median {med['cs_settle'][0]:.1f} s more (niced)"
        )


def _formats(folder: Path) -> dict:
    counts: dict[str, int] = {}
    for p in folder.iterdir():
        if p.is_file() and not p.name.startswith("."):
            key = p.name.split(".", 1)[1] if "." in p.name else "?"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _wait_settled(model_id: str, env: dict) -> None:
    """Wait until the model's background settle (started by the index that just returned) is done.

    ``index`` takes the settle lock before it starts the child, so waiting for the lock is enough.
    """
    code = "import sys; from clipsearch import settle; sys.exit(0 if settle.wait(sys.argv[1], 1800) else 1)"
    subprocess.run([sys.executable, "-c", code, model_id], env=env, check=True)


if __name__ == "__main__":
    main()
