"""The CLI end to end, as a user drives it: real photo files, a tiny saved model, click's runner and
real subprocesses. Results are checked against the library's own data and hand computations."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from e2e_helpers import make_photo_folder, make_tiny_model, run_cli, sidecar_keywords, write_photo

from clipsearch.cli import cli
from clipsearch.store import Library

EVIL = "<script>alert(1)</script>.jpg"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("cli-model") / "tiny")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, model_dir):
    """A photo folder with its library inside it, indexed once; tests must not change it."""
    root = tmp_path_factory.mktemp("cli-lib")
    photos = make_photo_folder(root / "photos")
    db = root / "photos" / "library.db"
    result = invoke("--db", db, "index", root / "photos", "--model", model_dir, "--json")
    assert result.exit_code == 0, result.output
    return db, root / "photos", photos, json.loads(result.stdout)


def invoke(*args, input=None):
    # A wide terminal, so rich tables do not fold the paths the tests look for.
    return CliRunner(env={"COLUMNS": "250"}).invoke(
        cli, [str(a) for a in args], input=input, catch_exceptions=False
    )


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def test_index_reports_every_photo(indexed):
    db, folder, photos, report = indexed
    assert report["new"] == len(photos) and report["failed"] == []
    assert report["model_id"].startswith("file:tiny:")
    from clipsearch.backends import BACKENDS

    assert report["backend"] in BACKENDS and report["backend_note"] is None  # auto chose a measured one
    with Library.open(db) as lib:
        ids, paths, vectors = lib.embeddings(report["model_id"])
    assert sorted(paths) == sorted(p.resolve() for p in photos.values())
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_human_index_output_has_a_summary_table(tmp_path, model_dir):
    write_photo(tmp_path / "p" / "a.jpg", 1)
    (tmp_path / "p" / "bad.jpg").write_bytes(b"this is text, not a photo")
    result = ok("--db", tmp_path / "lib.db", "index", tmp_path / "p", "--model", model_dir)
    for word in (
        "new",
        "updated",
        "moved",
        "removed",
        "failed",
        "Skipped 1 file",
        "bad.jpg",
        "Image backend:",
    ):
        assert word in result.stdout
    # a fresh home: auto measured the backends for this model first, and said so (on stderr)
    assert "Measuring the inference backends" in result.stderr
    again = ok("--db", tmp_path / "lib.db", "index", tmp_path / "p")
    assert "Measuring" not in again.stderr and "Image backend:" not in again.stdout  # nothing to embed


def test_reindex_after_adding_moving_and_deleting(tmp_path, model_dir):
    folder = tmp_path / "photos"
    for n in range(4):
        write_photo(folder / f"p{n}.jpg", 30 + n)
    db = tmp_path / "lib.db"
    first = json.loads(ok("--db", db, "index", folder, "--model", model_dir, "--json").stdout)
    assert first["new"] == 4
    again = json.loads(ok("--db", db, "index", folder, "--json").stdout)  # the library's model by default
    assert (again["new"], again["unchanged"]) == (0, 4)

    write_photo(folder / "new.png", 40)
    (folder / "sub").mkdir()
    shutil.move(folder / "p1.jpg", folder / "sub" / "renamed.jpg")
    (folder / "p2.jpg").unlink()
    third = json.loads(ok("--db", db, "index", folder, "--json").stdout)
    assert (third["new"], third["moved"], third["removed"], third["unchanged"]) == (1, 1, 1, 2)
    paths = json.loads(ok("--db", db, "query", "x", "--json", "--top", "50").stdout)
    assert sorted(Path(h["path"]).name for h in paths) == ["new.png", "p0.jpg", "p3.jpg", "renamed.jpg"]


def test_query_json_schema_and_image_query(indexed):
    db, folder, photos, _ = indexed
    hits = json.loads(ok("--db", db, "query", "--image", photos["beach.jpg"], "--json").stdout)
    assert len(hits) == len(photos)
    for n, h in enumerate(hits, start=1):
        assert set(h) >= {"path", "score", "rank", "image_id"}
        assert Path(h["path"]).is_absolute() and h["rank"] == n
    assert Path(hits[0]["path"]) == photos["beach.jpg"].resolve()
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_combined_query_scores_match_exported_embeddings(indexed, tmp_path):
    """`a --minus b` ranks by cosine with normalise(t(a) - t(b)): checked with the exported vectors."""
    import torch

    from clipsearch.checkpoints import load_bundle

    db, folder, photos, report = indexed
    ok("--db", db, "export", tmp_path / "e.npz")
    data = np.load(tmp_path / "e.npz")
    bundle = load_bundle(_model_of(db))
    with torch.no_grad():
        t = bundle.model.encode_text(bundle.tokenizer(["mountain", "snow"]))
    t = t / t.norm(dim=-1, keepdim=True)
    q = (t[0] - t[1]) / (t[0] - t[1]).norm()
    expected = data["embeddings"] @ q.numpy()
    hits = json.loads(ok("--db", db, "query", "mountain", "--minus", "snow", "--json", "--top", "3").stdout)
    best = np.argsort(-expected)[:3]
    assert [h["path"] for h in hits] == [str(data["paths"][i]) for i in best]
    np.testing.assert_allclose([h["score"] for h in hits], expected[best], atol=1e-4)


def _model_of(db: Path) -> str:
    with Library.open(db) as lib:
        return lib.model_source(lib.default_model_id())


def test_add_image_query_and_paths_output(indexed):
    db, folder, photos, _ = indexed
    result = ok("--db", db, "query", "--add-image", photos["city.webp"], "--paths", "--top", "2")
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and Path(lines[0]) == photos["city.webp"].resolve()


def test_in_threshold_and_human_table(indexed):
    db, folder, photos, _ = indexed
    hits = json.loads(ok("--db", db, "query", "x", "--in", folder / "trips", "--json").stdout)
    assert {Path(h["path"]).parent.name for h in hits} == {"trips"}
    assert len(hits) == sum(1 for p in photos.values() if p.parent.name == "trips")
    none = json.loads(ok("--db", db, "query", "x", "--threshold", "0.9999", "--json").stdout)
    assert none == []
    table = ok("--db", db, "query", "--image", photos["forest.png"], "--top", "2", "--table").stdout
    assert "score" in table and "forest.png" in table


def test_in_with_percent_and_underscore_folders(tmp_path, model_dir):
    write_photo(tmp_path / "p" / "50%_off" / "a.jpg", 1)
    write_photo(tmp_path / "p" / "50x_off" / "b.jpg", 2)
    write_photo(tmp_path / "p" / "50%_offset" / "c.jpg", 3)
    db = tmp_path / "lib.db"
    ok("--db", db, "index", tmp_path / "p", "--model", model_dir)
    hits = json.loads(ok("--db", db, "query", "sale", "--in", tmp_path / "p" / "50%_off", "--json").stdout)
    assert [Path(h["path"]).name for h in hits] == ["a.jpg"]


def test_html_page_escapes_file_names(tmp_path, model_dir):
    write_photo(tmp_path / "p" / EVIL, 1)
    write_photo(tmp_path / "p" / "fine.png", 2)
    db = tmp_path / "lib.db"
    ok("--db", db, "index", tmp_path / "p", "--model", model_dir)
    out = tmp_path / "results.html"
    ok("--db", db, "query", "<script>alert(2)</script>", "--html", out)
    page = out.read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in page
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert page.count("data:image/jpeg;base64,") == 2


def test_label_json_relabel_and_multi_label(indexed, tmp_path):
    db, folder, photos, _ = indexed
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("# what we look for\nbeach\nforest\n\ncity\n")
    first = json.loads(
        ok("--db", db, "label", "--classes-file", classes_file, "--top-k", "2", "--json").stdout
    )
    assert len(first) == len(photos)
    for row in first:
        assert set(row) >= {"path", "label", "score", "labels"}
        assert row["label"] in {"beach", "forest", "city"} and row["label"] == row["labels"][0]["label"]
        assert len(row["labels"]) == 2 and row["labels"][0]["score"] >= row["labels"][1]["score"]
        assert Path(row["path"]).is_absolute()

    def stored_labels():
        return json.loads(ok("--db", db, "status", "--json").stdout)["labels"]

    assert stored_labels() == 2 * len(photos)
    # The same classes in another order and another template: replaced, not added.
    ok("--db", db, "label", "--classes", "city,beach,forest", "--template", "a photo of {}.")
    assert stored_labels() == len(photos)
    # Multi-label: each class alone; every label kept is at least the threshold.
    multi = json.loads(
        ok(
            "--db", db, "label", "--classes", "beach,forest", "--multi-label", "--threshold", "0.2", "--json"
        ).stdout
    )
    for row in multi:
        assert all(lab["score"] >= 0.2 for lab in row["labels"])
    human = ok("--db", db, "label", "--classes", "beach,forest").stdout
    assert "label" in human and "beach.jpg" in human
    counts = json.loads(ok("--db", db, "label", "--classes", "beach,forest", "--json").stdout)
    n_beach = sum(r["label"] == "beach" for r in counts)
    assert f"Labelled {len(photos)} photos (top label)" in human
    assert (f"beach {n_beach}" in human) == (n_beach > 0)


def test_label_writes_and_merges_xmp_sidecars(tmp_path, model_dir):
    from clipsearch.xmp import sidecar_path, write_keywords

    a = write_photo(tmp_path / "p" / "a.jpg", 1)
    b = write_photo(tmp_path / "p" / "b.jpg", 2)
    db = tmp_path / "lib.db"
    ok("--db", db, "index", tmp_path / "p", "--model", model_dir)
    # b already has a sidecar from another program: its keywords and other fields must survive.
    sidecar_path(b).write_text(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:xmp="http://ns.adobe.com/xap/1.0/">'
        "<xmp:Rating>4</xmp:Rating><dc:subject><rdf:Bag><rdf:li>holiday &amp; friends</rdf:li></rdf:Bag>"
        "</dc:subject></rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    rows = json.loads(ok("--db", db, "label", "--classes", "cat,dog", "--json", "--write-xmp").stdout)
    by_name = {Path(r["path"]).name: r["label"] for r in rows}
    assert sidecar_keywords(a) == [by_name["a.jpg"]]
    assert sidecar_keywords(b) == ["holiday & friends", by_name["b.jpg"]]
    rating = ET.parse(sidecar_path(b)).find(".//{http://ns.adobe.com/xap/1.0/}Rating")
    assert rating is not None and rating.text == "4"
    assert "<xmp:Rating>4</xmp:Rating>" in sidecar_path(b).read_text()  # its prefix kept too
    # Relabel: our old keyword goes, the user's stays. (One class is decided on its own: threshold 0
    # gives it to every photo.)
    ok("--db", db, "label", "--classes", "<tree>", "--threshold", "0", "--write-xmp")
    assert sidecar_keywords(a) == ["<tree>"]
    assert sidecar_keywords(b) == ["holiday & friends", "<tree>"]
    assert "&lt;tree&gt;" in sidecar_path(a).read_text()
    # No keywords and no sidecar: nothing is created; no keywords left for an existing one: ours go.
    c = write_photo(tmp_path / "p" / "c.jpg", 3)
    assert write_keywords(c, []) is None and not sidecar_path(c).exists()
    write_keywords(b, [])
    assert sidecar_keywords(b) == ["holiday & friends"]
    # A sidecar that is not XML is never clobbered.
    sidecar_path(a).write_text("not xml <")
    result = run_cli("--db", str(db), "label", "--classes", "cat", "--write-xmp")
    assert result.returncode == 1 and "XMP not written" in result.stderr
    assert sidecar_path(a).read_text() == "not xml <"


def test_export_npz_equals_the_stored_embeddings(indexed, tmp_path):
    db, folder, photos, report = indexed
    out = tmp_path / "vectors.npz"
    ok("--db", db, "export", out)
    data = np.load(out)
    with Library.open(db) as lib:
        ids, paths, vectors = lib.embeddings(report["model_id"])
    assert data["embeddings"].dtype == np.float32
    np.testing.assert_array_equal(data["embeddings"], vectors)
    assert data["paths"].tolist() == [str(p) for p in paths]
    assert all(Path(p).is_absolute() for p in data["paths"])
    assert str(data["model_id"]) == report["model_id"]
    np.testing.assert_allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.npz"]  # exact name, no temp left


def test_status_models_and_doctor(indexed, tmp_path):
    db, folder, photos, report = indexed
    status = json.loads(ok("--db", db, "status", "--json").stdout)
    assert status["images"] == len(photos) and status["default_model"] == report["model_id"]
    assert status["models"][0]["embedded"] == len(photos)
    assert "Images:" in ok("--db", db, "status").stdout

    models = json.loads(ok("models", "--json").stdout)
    assert {"name": "ViT-B-32/openai", "cached": False, "state": None, "pinned": True, "path": None} in models
    assert {
        "name": "ViT-B-16/laion2b_s34b_b88k",
        "cached": False,
        "state": None,
        "pinned": False,
        "path": None,
    } in models
    assert "ViT-B-32/openai" in ok("models").stdout

    assert "in step with SQLite" in ok("--db", db, "doctor").stdout
    # A damaged FAISS file is detected and rebuilt from SQLite.
    faiss_dir = db.with_name(db.name + ".faiss")
    for f in faiss_dir.glob("*.index"):
        f.write_bytes(b"garbage")
    repaired = ok("--db", db, "doctor").stdout
    assert "rebuilt from SQLite" in repaired and f"{len(photos)} vectors" in repaired
    assert "in step with SQLite" in ok("--db", db, "doctor").stdout
    assert "--rebuild" in ok("--db", db, "doctor", "--rebuild").stdout


def test_index_kinds_offered_are_the_vector_index_kinds(indexed, model_dir, tmp_path):
    from clipsearch import vectors
    from clipsearch.cli import cli

    for command in ("index", "query"):  # what --help offers is what the vector index builds
        option = next(p for p in cli.commands[command].params if p.name == "index_kind")
        assert option.type.choices == ("auto", *vectors.KINDS), command
    db, folder, photos, report = indexed
    copy = tmp_path / "photos"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("library.db*"))
    ok("--db", copy / "lib.db", "index", copy, "--model", model_dir, "--index-kind", "ivf", "--json")
    assert f"({len(photos)} vectors, ivf)" in ok("--db", copy / "lib.db", "doctor").stdout
    # Built before the run exported the text tower, then retuned with the model's text probes.
    index_file = next((copy / "lib.db.faiss").glob("*.index"))
    assert json.loads(index_file.with_suffix(".json").read_text())["tuned_with"] == "text"
    # --rebuild rebuilds the same kind, and the rebuilt file is what the next open maps
    before = index_file.stat().st_mtime_ns
    rebuilt = ok("--db", copy / "lib.db", "doctor", "--rebuild").stdout
    assert f"rebuilt from SQLite (--rebuild) ({len(photos)} vectors, ivf)" in rebuilt
    assert index_file.stat().st_mtime_ns != before
    assert json.loads(index_file.with_suffix(".json").read_text())["tuned_with"] == "text"
    assert "in step with SQLite" in ok("--db", copy / "lib.db", "doctor").stdout
    fast = json.loads(ok("--db", copy / "lib.db", "query", "a dog", "--json", "--top", "3").stdout)
    exact = json.loads(ok("--db", db, "query", "a dog", "--json", "--top", "3").stdout)
    assert [Path(h["path"]).name for h in fast] == [Path(h["path"]).name for h in exact]  # one cell: exact
    # status shows the index and its tuning, from the sidecar
    shown = json.loads(ok("--db", copy / "lib.db", "status", "--json").stdout)["models"][0]["index"]
    assert shown["kind"] == "ivf" and shown["in_step"] and shown["tuned_with"] == "text"
    assert shown["vectors"] == len(photos) and shown["nprobe"] <= shown["cells"]
    # ivfpq: codes plus the exact vectors beside them; the same answers on a library this small
    ok("--db", copy / "lib.db", "index", copy, "--model", model_dir, "--index-kind", "ivfpq", "--json")
    assert f"({len(photos)} vectors, ivfpq)" in ok("--db", copy / "lib.db", "doctor").stdout
    assert index_file.with_suffix(".vectors").exists()
    assert "Index of " in (line := ok("--db", copy / "lib.db", "status").stdout) and "ivfpq" in line
    fast = json.loads(ok("--db", copy / "lib.db", "query", "a dog", "--json", "--top", "3").stdout)
    assert [Path(h["path"]).name for h in fast] == [Path(h["path"]).name for h in exact]


def test_every_command_has_help():
    for name, command in cli.commands.items():
        assert command.help and len(command.help.strip()) > 20, name
        result = ok(name, "--help")
        assert "Usage:" in result.stdout
        for param in command.params:
            if param.param_type_name == "option" and "--help" not in param.opts:
                assert param.help, f"{name} {param.opts}"
    assert ok("--version").stdout.strip().endswith("0.1.0")


@pytest.mark.parametrize(
    "args", [["--help"], ["query", "--help"], ["--db", "/nonexistent/lib.db", "query", "x"]], ids=str
)
def test_start_up_does_not_import_torch(args):
    """Help, and a query that fails before it needs the model, never pay for torch or faiss."""
    code = (
        "import sys\nfrom clipsearch.cli import cli\n"
        f"try:\n    cli({args!r}, standalone_mode=False)\nexcept BaseException:\n    pass\n"
        "heavy = [m for m in ('torch', 'faiss', 'PIL') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="


def test_real_subprocess_index_then_query(tmp_path, model_dir):
    photos = make_photo_folder(tmp_path / "p")
    db = tmp_path / "lib.db"
    first = run_cli("--db", str(db), "index", str(tmp_path / "p"), "--model", str(model_dir), "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["new"] == len(photos)
    second = run_cli("--db", str(db), "query", "--image", str(photos["rotated.jpg"]), "--json", "--top", "1")
    assert second.returncode == 0, second.stderr
    [hit] = json.loads(second.stdout)
    assert Path(hit["path"]) == photos["rotated.jpg"].resolve() and hit["score"] > 0.999


def test_embeddings_agree_with_open_clip_on_the_same_weights_and_photos(tmp_path):
    """Index real photos through the CLI with open_clip-made random weights (a hub folder), then
    embed the same files with open_clip's model and its own preprocessing: cosine >= 0.995 median."""
    import torch
    from PIL import Image, ImageOps
    from safetensors.torch import save_file

    open_clip = pytest.importorskip("open_clip")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    }
    torch.manual_seed(11)
    ref = open_clip.model.CLIP(**cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref.eval()
    hub = tmp_path / "oc-hub"
    hub.mkdir()
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(dict(ref.state_dict()), str(hub / "open_clip_model.safetensors"))

    photos = make_photo_folder(tmp_path / "p")
    for n in range(3):  # a few larger, non-square ones so resizing and cropping matter
        photos[f"big{n}.jpg"] = write_photo(tmp_path / "p" / f"big{n}.jpg", 50 + n, size=(320 + 40 * n, 200))
    db = tmp_path / "lib.db"
    report = json.loads(ok("--db", db, "index", tmp_path / "p", "--model", hub, "--json").stdout)
    assert report["new"] == len(photos)
    with Library.open(db) as lib:
        _, paths, ours = lib.embeddings(report["model_id"])

    preprocess = open_clip.image_transform(64, is_train=False)  # OpenAI's eval transform, as open_clip has it
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except ImportError:
        pass
    with torch.no_grad():
        pixels = torch.stack(
            [preprocess(ImageOps.exif_transpose(Image.open(p)).convert("RGB")) for p in paths]
        )
        theirs = ref.encode_image(pixels)
    theirs = (theirs / theirs.norm(dim=-1, keepdim=True)).numpy()
    cosines = np.sum(ours * theirs, axis=1)
    print(
        f"cosine vs open_clip over {len(cosines)} photos: median {np.median(cosines):.6f}, min {cosines.min():.6f}"
    )
    assert np.median(cosines) >= 0.995, cosines
    assert cosines.min() >= 0.99, dict(zip(map(str, paths), cosines.tolist(), strict=True))


def test_every_command_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text(encoding="utf-8")
    for name in cli.commands:
        assert f"## `{name}" in doc, name


def test_non_utf8_file_names_are_printable_and_exact(tmp_path, model_dir):
    """A name that is not UTF-8 is indexed: people see U+FFFD where the bad byte is, --json keeps
    the exact name (``\\udcXX`` escapes)."""
    import os

    folder = tmp_path / "p"
    raw = os.fsencode(folder) + b"/caf\xe9.jpg"
    write_photo(Path(os.fsdecode(raw)), 1)
    write_photo(folder / "plain.png", 2)
    report = json.loads(
        ok("--db", tmp_path / "lib.db", "index", folder, "--model", model_dir, "--json").stdout
    )
    assert report["new"] == 2 and report["failed"] == []
    human = ok("--db", tmp_path / "lib.db", "query", "a photo").stdout
    assert "caf\ufffd.jpg" in human
    hits = json.loads(ok("--db", tmp_path / "lib.db", "query", "a photo", "--json").stdout)
    assert raw in [os.fsencode(h["path"]) for h in hits]


def test_download_progress_reaches_the_bar(tmp_path, model_dir, monkeypatch):
    """A model that has to be fetched reports bytes through the progress callback to a rich bar."""
    import clipsearch.checkpoints as checkpoints

    real = checkpoints.load_bundle
    seen = []

    def fetching(source, progress=None, **kwargs):
        for done in (0, 512, 1024):
            progress(done, 1024)
            seen.append(done)
        return real(model_dir)

    monkeypatch.setattr(checkpoints, "load_bundle", fetching)
    write_photo(tmp_path / "p" / "a.jpg", 1)
    ok("--db", tmp_path / "lib.db", "index", tmp_path / "p", "--model", "[bold]ViT-B-32/openai")
    assert seen == [0, 512, 1024]


def test_long_label_tables_are_cut_with_a_pointer_to_json(indexed, monkeypatch):
    import clipsearch.cli as cli_module

    db, folder, photos, _ = indexed
    monkeypatch.setattr(cli_module, "MAX_LABEL_ROWS", 2)
    human = ok("--db", db, "label", "--classes", "beach,forest").stdout
    assert f"... and {len(photos) - 2} more photos: --json lists them all" in human
    assert sum(1 for p in photos.values() if str(p.resolve()) in human) == 2


def test_text_queries_after_index_skip_torch_and_agree(tmp_path, model_dir):
    """index exports the text tower; a text query process then never imports torch, and its
    results equal the regular path's (forced here with --model)."""
    import os

    for n in range(5):
        write_photo(tmp_path / "p" / f"{n}.jpg", 60 + n)
    db = tmp_path / "lib.db"
    ok("--db", db, "index", tmp_path / "p", "--model", model_dir)
    args = ["--db", str(db), "query", "a red boat", "--minus", "sea", "--json", "--top", "4"]
    code = (
        "import sys\nfrom clipsearch.cli import cli\n"
        f"try:\n    cli({args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)"
    )
    env = {**os.environ, "CLIPSEARCH_HOME": os.environ["CLIPSEARCH_HOME"]}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    body, torch_line = out.stdout.rsplit("TORCH", 1)
    assert torch_line.strip() == "False"
    fast = json.loads(body)
    slow = json.loads(ok(*args[:2], *args[2:], "--model", model_dir).stdout)
    assert [h["path"] for h in fast] == [h["path"] for h in slow]
    np.testing.assert_allclose([h["score"] for h in fast], [h["score"] for h in slow], atol=1e-5)


def test_query_verbose_says_which_encoder_answered_and_why(tmp_path, model_dir):
    """Each way a query can go is named on stderr with --verbose, and only then, with the model by its
    folder (not its internal id); the text tower is exported again after a query that had to load
    the model for lack of it. `similar` says the same."""
    import shutil

    from clipsearch.paths import cache_dir

    for n in range(4):
        write_photo(tmp_path / "p" / f"{n}.jpg", 80 + n)
    db = tmp_path / "lib.db"
    model_id = json.loads(ok("--db", db, "index", tmp_path / "p", "--model", model_dir, "--json").stdout)[
        "model_id"
    ]
    name = str(Path(model_dir).resolve())  # how the library recorded the model

    def query(*args, command="query"):
        out = run_cli("--db", str(db), command, *args, "--paths")
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.splitlines()) == 4
        assert model_id not in out.stderr  # never the internal id
        return out.stderr

    text = query("a red boat", "--verbose")
    assert "daemon: none serves this library" in text
    assert f"encoder: torch-free text tower of {name}" in text
    assert "in torch" not in text
    assert query("a red boat") == ""  # quiet without --verbose
    assert "encoder: torch-free" in run_cli("--verbose", "--db", str(db), "query", "x", "--paths").stderr

    indexed_image = query("--image", str(tmp_path / "p" / "1.jpg"), "--verbose")
    assert "1.jpg is photo #" in indexed_image and "of the library: its stored vector" in indexed_image
    assert f"encoder: none (every part is a stored vector of {name})" in indexed_image
    outside = tmp_path / "outside.jpg"
    write_photo(outside, 200)
    image = query("--image", str(outside), "--verbose")
    assert "daemon: not asked (the query has image files" in image

    def image_encoder_named(stderr: str) -> bool:
        """Image files go through the tower's ONNX export when the verdict measured here chose ONNX,
        else through the model in torch: either way the log names it, by folder."""
        through_export = "encoder: image files through the onnx-" in stderr and f"export of {name}" in stderr
        return through_export or f"encoder: the model {name} in torch (the query has image files" in stderr

    assert image_encoder_named(image)

    named = query("a boat", "--model", str(model_dir), "--verbose")
    assert "in torch (named with --model)" in named and "daemon: not asked (--model names a model" in named

    indexed = query(str(tmp_path / "p" / "2.jpg"), "--verbose", command="similar")
    assert "similar: photo #" in indexed and "is in the library: its stored vector" in indexed
    assert "daemon: none serves this library" in indexed
    assert f"encoder: none (every part is a stored vector of {name})" in indexed
    unknown = query(str(outside), "--verbose", command="similar")
    assert f"has no vector of {name} in the library: the file is encoded" in unknown
    assert image_encoder_named(unknown)
    assert query(str(outside), command="similar") == ""

    shutil.rmtree(cache_dir(model_id))  # the torch-free export is gone (a cleaned cache)
    missing = query("a red boat", "--verbose")
    assert f"encoder: the model {name} in torch (no torch-free export of {name} yet" in missing
    assert f"encoder: torch-free text tower of {name}" in query("a blue boat", "--verbose")


def test_query_by_indexed_photo_needs_no_model(indexed):
    """A query part that is an indexed photo is its stored vector: no model is loaded for it."""
    from clipsearch.search import Query, QueryPart, Searcher

    db, folder, photos, report = indexed
    with Library.open(db) as lib:
        rows = lib.images()
        stored = lib.embedding(rows[2].id, report["model_id"])
    from clipsearch.errors import LibraryError
    from clipsearch.search import QueryError

    with Searcher(db) as searcher:
        answer = searcher.run(Query([QueryPart.indexed(rows[2].id)]), top=3)
        assert answer.encoder == "stored-vectors"
        assert answer.hits[0].image_id == rows[2].id
        assert answer.hits[0].score == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(np.linalg.norm(stored), 1.0, atol=1e-5)
        with pytest.raises(LibraryError, match="photo #999999 has no embedding"):
            searcher.run(Query([QueryPart.indexed(999999)]))
        with pytest.raises(QueryError, match="by its id"):
            searcher.run(Query([QueryPart("indexed", "a.jpg")]))


def test_status_prints_a_long_model_folder_whole_on_one_line(tmp_path):
    """A model folder longer than the terminal is never folded inside a cell: it ends its line whole."""
    folder = tmp_path / ("models-of-a-very-patient-photographer-" * 3) / "ViT-B-32-fine-tuned-on-holidays"
    with Library.open(tmp_path / "lib.db", create=True) as lib:
        lib.register_model("file:tiny:0123456789abcdef", str(folder), dim=4)
        image_id = lib.add_image(tmp_path / "a.jpg", size=1, mtime_ns=1, content_hash="a")
        lib.put_embedding(image_id, "file:tiny:0123456789abcdef", np.array([1, 0, 0, 0], np.float32))
    out = ok("--db", tmp_path / "lib.db", "status").stdout
    assert len(str(folder)) > 120
    line = next(line for line in out.splitlines() if str(folder) in line)
    assert line.endswith(f"{folder} (default)") and "file:tiny" not in out
    assert line.split()[:2] == ["4", "1"]  # dim, photos embedded


def test_a_model_the_library_lacks_is_named_by_its_folder(indexed, tmp_path, model_dir):
    """--model with a model the library was never indexed with: one line naming both folders."""
    db, folder, photos, report = indexed
    other = make_tiny_model(tmp_path / "other-model", seed=1)
    for command in (["query", "a boat"], ["label", "--classes", "boat,car"]):
        out = run_cli("--db", str(db), *command, "--model", str(other))
        assert out.returncode == 1, (command, out.stderr)
        assert f"no embeddings of model {other.resolve()} (it has: {Path(model_dir).resolve()})" in out.stderr
        assert "file:" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_human_output_names_the_model_by_its_folder_not_its_id(indexed, tmp_path, model_dir):
    """index, export, status and doctor show the folder the model was loaded from; --json keeps the id."""
    db, folder, photos, report = indexed
    model_id, folder_name = report["model_id"], str(model_dir.resolve())
    assert report["model_name"] == folder_name and model_id.startswith("file:tiny:")
    write_photo(tmp_path / "p" / "a.jpg", 3)
    shown = {
        "index": ok("--db", tmp_path / "lib.db", "index", tmp_path / "p", "--model", model_dir).stdout,
        "status": ok("--db", db, "status").stdout,
        "doctor": ok("--db", db, "doctor").stdout,
        "export": invoke("--db", db, "export", tmp_path / "v.npz").stderr,
    }
    assert f"Indexed with {folder_name} in " in shown["index"]
    assert f"{folder_name} (default)" in shown["status"]
    assert f"FAISS: {folder_name}: " in shown["doctor"]
    assert f"embeddings of {folder_name} (" in shown["export"]
    for command, text in shown.items():
        assert "file:" not in text, command
    status = json.loads(ok("--db", db, "status", "--json").stdout)
    assert status["default_model"] == model_id and status["default_model_name"] == folder_name
    assert status["models"][0]["name"] == folder_name
    # export --model-id takes the folder as well as the id; an unknown one lists the folders.
    ok("--db", db, "export", tmp_path / "by-folder.npz", "--model-id", model_dir)
    assert str(np.load(tmp_path / "by-folder.npz")["model_id"]) == model_id
    wrong = invoke("--db", db, "export", tmp_path / "x.npz", "--model-id", "ViT-B-32/openai")
    assert wrong.exit_code != 0 and f"it has: {folder_name}" in wrong.output
    assert "file:" not in wrong.output


def test_label_prints_long_paths_whole_in_a_narrow_terminal(tmp_path, model_dir):
    deep = tmp_path / "a-rather-long-folder-name-for-holiday-photos" / "and-another-level-below-it"
    write_photo(deep / "a-photo-with-a-long-file-name-from-the-beach.jpg", 1)
    write_photo(deep / "short.jpg", 2)
    db = tmp_path / "lib.db"
    ok("--db", db, "index", deep, "--model", model_dir)
    result = run_cli("--db", str(db), "label", "--classes", "beach,forest,city", env={"COLUMNS": "60"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    long_path = str((deep / "a-photo-with-a-long-file-name-from-the-beach.jpg").resolve())
    assert len(long_path) > 60
    rows = [line for line in lines if line.endswith(".jpg")]
    assert len(rows) == 2 and any(line.endswith("  " + long_path) for line in rows)
    # Aligned: every row's path starts in the same column as the header's "path".
    start = lines[0].index("path")
    assert all(line[start:].startswith(str(deep.resolve())) for line in rows)
    assert lines[0].split() == ["label", "score", "others", "path"]


_LEAVE = """
import atexit, sys
if sys.argv[1] == "torch":
    import torch
from clipsearch.cli import _leave


class Teardown:
    def __del__(self):
        print("teardown ran", file=sys.stderr)


keep = Teardown()  # a module global: only the interpreter's own teardown finalises it
atexit.register(lambda: print("atexit ran", file=sys.stderr))
print("no newline yet", end="")  # still buffered: must reach the reader all the same
_leave(int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])
"""


@pytest.mark.parametrize(
    "torch_loaded, code, rc, message",
    [(True, "0", 0, ""), (True, "3", 3, ""), (True, "bad things", 1, "bad things"), (False, "3", 3, "")],
)
def test_leaving_after_torch_skips_only_the_interpreters_teardown(torch_loaded, code, rc, message):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _LEAVE, "torch" if torch_loaded else "plain", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == rc
    assert done.stdout == "no newline yet"
    assert "atexit ran" in done.stderr and message in done.stderr
    # the shortcut is taken only where torch is loaded (its teardown is what costs ~0.7 s)
    assert ("teardown ran" in done.stderr) is not torch_loaded
