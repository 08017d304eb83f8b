"""Untrusted input through the CLIs: pickled models that would run code are refused before they
can, tar shards whose member paths escape are skipped and counted by ``clipsearch-train``, the HTML
page shows hostile file names and queries as text, and quotes, ``%``, ``_`` and ``\\`` in queries,
labels and ``--in`` folders are taken literally (no SQL wildcard or injection)."""

from __future__ import annotations

import html.parser
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import pytest
from e2e_helpers import write_photo
from test_reliability import invoke, one_line_error, tiny_model_dir

# Folder names that a LIKE pattern or string-built SQL would get wrong, each with a decoy sibling
# that a wildcard would also match.
LITERAL_DIRS = {
    "a_b": "axb",
    "100%": "100 percent",
    "back\\slash": "backslash",
    "o'brien": "o''brien",
    'say "cheese"': "say cheese",
}
SCRIPT_PATH = ("<script>alert(1)<", "script>.jpg")  # together: <script>alert(1)</script>.jpg


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    photos = root / "photos"
    seed = 0
    for pair in LITERAL_DIRS.items():
        for name in pair:
            seed += 1
            write_photo(photos / name / f"photo{seed}.jpg", seed)
    script = write_photo(photos / SCRIPT_PATH[0] / SCRIPT_PATH[1], 99)
    assert str(script).endswith("<script>alert(1)</script>.jpg")
    db = root / "lib.db"
    result = invoke("index", "--model", tiny_model_dir(tmp_path_factory), photos, "--json", db=db)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["new"] == 2 * len(LITERAL_DIRS) + 1
    return db, photos, script


# --------------------------------------------------------------------------------------------------
# Models that would execute code


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _malicious_files(tmp_path: Path) -> list[tuple[Path, Path]]:
    import torch

    made = []
    for name, writer in (("bomb.pt", "torch"), ("pytorch_model.bin", "pickle")):
        marker = tmp_path / f"pwned-{name}"
        path = tmp_path / name
        payload = {"state_dict": {"w": torch.zeros(2)}, "x": _Payload(marker)}
        if writer == "torch":
            torch.save(payload, path)
        else:
            path.write_bytes(pickle.dumps(payload, protocol=2))
        made.append((path, marker))
    return made


def test_the_payload_is_live(tmp_path):
    """The files below really run code when unpickled (so the refusal tests mean something)."""
    import torch

    (path, marker), (legacy, legacy_marker) = _malicious_files(tmp_path)
    torch.load(path, weights_only=False)
    pickle.loads(legacy.read_bytes())
    assert marker.exists() and legacy_marker.exists()


def test_pickled_models_are_refused_by_the_cli_without_running(tmp_path, library):
    db, photos, _ = library
    for path, marker in _malicious_files(tmp_path):
        for args in (("index", "--model", path, photos), ("query", "x", "--model", path)):
            line = one_line_error(invoke(*args, db=db))
            assert path.name in line or "pickle" in line.lower() or "model" in line.lower(), line
            assert not marker.exists(), f"{args} ran the pickled code"
        inside = tmp_path / f"dir-{path.stem}"
        inside.mkdir()
        (inside / path.name).write_bytes(path.read_bytes())
        one_line_error(invoke("query", "x", "--model", inside, db=db))  # as a model folder
        assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Training shards whose members try to escape


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (24, 24), (seed * 30 % 256, 80, 160)).save(buf, format="PNG")
    return buf.getvalue()


def test_escaping_tar_members_are_skipped_by_clipsearch_train(tmp_path, capsys):
    from trainer.cli import main

    escape_dir = tmp_path / "outside"
    # The escaping members come first, so the epoch's reader meets every one of them.
    members = [
        ("../outside/evil.png", _png(50)),
        ("../outside/evil.txt", b"escaped"),
        (str(escape_dir / "abs.png"), _png(51)),
        (str(escape_dir / "abs.txt"), b"absolute"),
        ("a/../../outside/x.txt", b"dots"),
    ]
    for i in range(8):
        members += [(f"{i:03d}.png", _png(i)), (f"{i:03d}.txt", f"a shape number {i}".encode())]
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "train-000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "run"
    code = main(
        [
            "train", "--train-data", str(shards / "train-000.tar"), "--dataset-type", "webdataset",
            "--train-num-samples", "8", "--model", "tiny-vit", "--batch-size", "4", "--epochs", "1",
            "--warmup", "1", "--zeroshot-frequency", "0", "--device", "cpu", "--output", str(out),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert not escape_dir.exists() and not (tmp_path / "evil.png").exists()
    assert sorted(p.name for p in shards.iterdir()) == ["train-000.tar"]  # nothing extracted
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1].get("skipped_unsafe_path") == 5, metrics  # each escaping member counted (cumulative)
    assert (out / "model" / "clipsearch_model.json").exists()


# --------------------------------------------------------------------------------------------------
# The HTML page


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.attrs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_shows_hostile_names_and_queries_as_text(tmp_path, library):
    db, _, script = library
    query = "\"<>&' <img src=x onerror=alert(2)>"
    page_file = tmp_path / "results.html"
    result = invoke("query", query, "--top", "100", "--html", page_file, db=db)
    assert result.exit_code == 0, result.output
    page = page_file.read_text(encoding="utf-8")
    parsed = _Page()
    parsed.feed(page)
    assert "script" not in parsed.tags and parsed.tags.count("img") == len(LITERAL_DIRS) * 2 + 1
    assert not any(name.startswith("on") for name in parsed.attrs)  # no event handlers got in
    text = "".join(parsed.text)
    assert str(script) in text  # the name, as text
    assert "<img src=x onerror=alert(2)>" in text and "\"<>&\\'" in text  # the query, as text
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in page


# --------------------------------------------------------------------------------------------------
# Literal matching: quotes, %, _ and \ in queries, labels and --in folders


@pytest.mark.parametrize("folder", sorted(LITERAL_DIRS))
def test_in_folder_names_are_literal(library, folder):
    db, photos, _ = library
    result = invoke("query", "a photo", "--in", photos / folder, "--json", "--top", "100", db=db)
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 1 and Path(hits[0]["path"]).parent == photos / folder, hits
    labels = invoke(
        "label",
        "--classes",
        "dog,cat",
        "--template",
        "a photo of a {}",
        "--in",
        photos / folder,
        "--json",
        db=db,
    )
    assert labels.exit_code == 0, labels.output
    assert [Path(r["path"]).parent for r in json.loads(labels.stdout)] == [photos / folder]


@pytest.mark.parametrize(
    "text", ["it's", '"quoted"', "100%", "a_b", "back\\slash", "'; DROP TABLE images; --", "%_\\'\""]
)
def test_queries_with_sql_characters_work(library, text):
    db, _, _ = library
    result = invoke("query", text, "--json", "--top", "100", db=db)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 2 * len(LITERAL_DIRS) + 1


def test_labels_with_sql_characters_are_stored_literally(library):
    db, _, _ = library
    classes = ["it's", "100%", "a_b", "back\\slash", '"x"']
    result = invoke("label", "--classes", ",".join(classes), "--template", "{}", "--json", db=db)
    assert result.exit_code == 0, result.output
    assert {r["label"] for r in json.loads(result.stdout)} <= set(classes)
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        key = json.dumps(sorted(classes), ensure_ascii=False)  # the class set, as store.py keys it
        rows = conn.execute("SELECT label FROM labels WHERE class_set = ?", (key,)).fetchall()
        stored = {row[0] for row in rows}
        assert len(rows) == 2 * len(LITERAL_DIRS) + 1  # one label per photo, under this exact set
        assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 2 * len(LITERAL_DIRS) + 1
    finally:
        conn.close()
    assert stored and stored <= set(classes)


def test_the_vector_index_is_as_private_as_its_library(tmp_path, tmp_path_factory):
    """The library file is made 0600 (it names every photo); its FAISS index holds the photos' vectors,
    which say what the pictures show: 0600 files in a 0700 folder too. A library its owner shared
    with a group shares its index the same way."""
    import stat

    photos = tmp_path / "photos"
    for i in range(3):
        write_photo(photos / f"{i}.jpg", i)
    model = tiny_model_dir(tmp_path_factory)
    db = tmp_path / "lib.db"
    assert invoke("index", "--model", model, photos, db=db).exit_code == 0
    folder = tmp_path / "lib.db.faiss"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = list(folder.iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files), files
    # a library its owner shares with a group before indexing: its index is made for the group too
    shared = tmp_path / "shared.db"
    shared.touch()
    os.chmod(shared, 0o640)
    old = os.umask(0o027)
    try:
        assert invoke("index", "--model", model, photos, db=shared).exit_code == 0
    finally:
        os.umask(old)
    folder = tmp_path / "shared.db.faiss"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o640 for f in folder.iterdir())
