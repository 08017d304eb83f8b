"""Model identity without torch, training run folders, and old libraries' model ids.

The identity of every source kind is computed twice, by ``identify`` (no torch) and by
``load_bundle`` (torch), and must agree; a change of config, preprocessing or tokenizer beside the
same weights must change it; a library written before ids covered the config keeps its embeddings.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from e2e_helpers import REPO, make_photo_folder, make_tiny_model, parse_json, run_cli

from clipsearch import checkpoints, paths
from clipsearch.configs import get_config
from clipsearch.errors import ModelLoadError
from clipsearch.hashing import sha256_file
from clipsearch.identity import identify, library_model_id
from clipsearch.model import build_model
from clipsearch.modelfile import MODEL_JSON, save_model
from clipsearch.tokenizer import Tokenizer
from clipsearch.transform import PreprocessConfig


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(5)
    cfg = get_config("tiny-vit")
    return build_model(cfg).eval(), cfg


def _save(directory, tiny, mean=None, context_length=None):
    model, cfg = tiny
    pp = PreprocessConfig(image_size=cfg["vision_cfg"]["image_size"], **({"mean": mean} if mean else {}))
    length = context_length or cfg["text_cfg"]["context_length"]
    return save_model(directory, model, pp, Tokenizer(length), model_cfg=cfg)


def _sources(tmp_path, tiny):
    """One source of each kind a user can pass, all holding the same weights."""
    model, cfg = tiny
    model_dir = _save(tmp_path / "mymodel", tiny)
    run = tmp_path / "run"
    _save(run / "model", tiny)
    (run / "args.json").write_text("{}")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": dict(cfg, quick_gelu=False),
                "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3},
            }
        )
    )
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(hub / "open_clip_model.safetensors")
    )
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    return {"model-dir": model_dir, "run-dir": run, "hub-dir": hub, "weights-file": weights}


def test_identify_agrees_with_load_bundle_for_every_kind(tmp_path, tiny):
    for kind, source in _sources(tmp_path, tiny).items():
        ident = identify(source)
        bundle = checkpoints.load_bundle(source)
        assert ident.kind == kind
        assert bundle.model_id == ident.model_id, kind
        assert bundle.identity.model_id == ident.model_id
        assert bundle.preprocess_cfg == bundle.identity.preprocess_cfg
        if kind != "weights-file":  # a bare file's config is known only once it was loaded
            assert ident.model_cfg == bundle.config and ident.preprocess_cfg == bundle.preprocess_cfg
    # ... and after one load, a bare weights file is known without torch too.
    again = identify(tmp_path / "w.pt")
    assert again.model_cfg == checkpoints.load_bundle(tmp_path / "w.pt").config
    assert again.preprocess_cfg.image_size == tiny[1]["vision_cfg"]["image_size"]


def test_overrides_are_part_of_a_weights_file_identity(tmp_path, tiny):
    weights = _sources(tmp_path, tiny)["weights-file"]
    plain = checkpoints.load_bundle(weights).model_id
    assert plain == f"file:w.pt:{sha256_file(weights)[:16]}"  # unchanged from earlier versions
    gelu = checkpoints.load_bundle(weights, quick_gelu=False)
    assert gelu.model_id != plain and gelu.model_id == identify(weights, quick_gelu=False).model_id
    named = identify(weights, arch="tiny-vit")
    assert named.model_id not in (plain, gelu.model_id) and named.model_cfg["vision_cfg"]["patch_size"] == 16


def test_identity_covers_config_preprocessing_and_tokenizer(tmp_path, tiny):
    base = identify(_save(tmp_path / "a", tiny)).model_id
    assert identify(_save(tmp_path / "b", tiny)).model_id.split(":")[2] == base.split(":")[2]
    other_mean = identify(_save(tmp_path / "c", tiny, mean=(0.5, 0.5, 0.5))).model_id
    other_length = identify(_save(tmp_path / "d", tiny, context_length=16)).model_id
    assert len({base.split(":")[2], other_mean.split(":")[2], other_length.split(":")[2]}) == 3
    # Same weights file in all four folders: the old weights-only id could not tell them apart.
    assert len({identify(tmp_path / n).legacy_ids[0].split(":")[2] for n in "abcd"}) == 1


def test_identify_never_imports_torch(tmp_path, tiny):
    sources = _sources(tmp_path, tiny)
    checkpoints.load_bundle(sources["weights-file"])  # so its config is on record
    from safetensors.torch import save_file

    # A safetensors weights file never loaded: its header alone says the architecture.
    sources["safetensors-file"] = tmp_path / "fresh.safetensors"
    save_file({k: v.contiguous() for k, v in tiny[0].state_dict().items()}, str(sources["safetensors-file"]))
    code = (
        "import sys, json\n"
        "from clipsearch.identity import identify\n"
        "src = json.loads(sys.argv[1])\n"
        "out = {k: identify(v).model_id for k, v in src.items()}\n"
        "out['registered'] = identify('ViT-B-32/openai').model_id\n"
        "assert identify(src['weights-file']).model_cfg is not None\n"
        "out['safetensors-cfg'] = identify(src['safetensors-file']).model_cfg\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(json.dumps(out))\n"
    )
    env_home = {"CLIPSEARCH_HOME": str(paths.home())}
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps({k: str(v) for k, v in sources.items()})],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**__import__("os").environ, **env_home},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    ids = json.loads(result.stdout)
    assert ids["registered"] == "ViT-B-32/openai"
    for kind, source in sources.items():
        assert ids[kind] == checkpoints.load_bundle(source).model_id
    assert ids["safetensors-cfg"] == checkpoints.load_bundle(sources["safetensors-file"]).config


def test_registered_identity_needs_no_download(tmp_path):
    ident = identify("ViT-B-32/openai")
    assert not ident.weights.is_file() and ident.weights == paths.models_dir() / "openai-ViT-B-32.pt"
    assert ident.preprocess_cfg.image_size == 224 and ident.tokenizer_cfg["context_length"] == 77
    assert ident.model_cfg["quick_gelu"] is True


# --------------------------------------------------------------------------------------------------
# Training run folders


def test_run_folder_loads_its_final_model(tmp_path, tiny):
    run = _sources(tmp_path, tiny)["run-dir"]
    via_run = checkpoints.load_bundle(run)
    direct = checkpoints.load_bundle(run / "model")
    assert via_run.identity.kind == "run-dir" and via_run.model_id.startswith("file:run:")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(via_run.model.encode_image(images), tiny[0].encode_image(images))
        assert torch.equal(via_run.model.encode_image(images), direct.model.encode_image(images))


def test_run_folder_without_a_final_model_says_what_is_there(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "args.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="training run without a final model .*no checkpoint yet"):
        checkpoints.load_bundle(run)
    for step in (100, 2500):
        (run / "checkpoints" / f"step_{step:08d}.safetensors").write_bytes(b"")
        (run / "checkpoints" / f"step_{step:08d}.state.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError) as err:
        checkpoints.load_bundle(run)
    message = str(err.value)
    assert "2 checkpoint(s)" in message and "step 2500" in message and "--resume latest" in message
    assert "\n" not in message


def test_index_and_query_with_a_run_folder(tmp_path):
    """As a user meets it: `clipsearch index --model RUN_DIR` after `clipsearch-train --output RUN_DIR`."""
    run = tmp_path / "run"
    make_tiny_model(run / "model")
    (run / "metrics.jsonl").write_text("")
    photos = tmp_path / "photos"
    make_photo_folder(photos)
    env = {"CLIPSEARCH_HOME": str(tmp_path / "home")}
    result = run_cli("index", str(photos), "--model", str(run), "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert parse_json(result.stdout)["model_id"].startswith("file:run:")
    result = run_cli("query", "a red square", "--json", env=env)
    assert result.returncode == 0, result.stderr
    # Without a final model: one line, non-zero exit, nothing indexed.
    (tmp_path / "run2" / "checkpoints").mkdir(parents=True)
    result = run_cli("index", str(photos), "--model", str(tmp_path / "run2"), env=env)
    assert result.returncode != 0
    assert "training run without a final model" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------
# Libraries written before ids covered config and tokenizer


class _FakeLibrary:
    def __init__(self, models: dict[str, str]):
        self.models = models

    def model_ids(self):
        return list(self.models)

    def model_source(self, model_id):
        return self.models[model_id]


def test_a_library_keeps_the_legacy_id_it_recorded_for_the_same_source(tmp_path, tiny):
    directory = _save(tmp_path / "mymodel", tiny)
    ident = identify(directory)
    legacy = f"file:mymodel:{sha256_file(directory / 'model.safetensors')[:16]}"
    assert ident.legacy_ids == (legacy,) and ident.model_id != legacy
    assert library_model_id(_FakeLibrary({legacy: str(directory)}), ident) == legacy
    # Another folder with the same weights (so the same legacy id) is another model now.
    elsewhere = identify(_save(tmp_path / "copy" / "mymodel", tiny, mean=(0.5, 0.5, 0.5)))
    assert elsewhere.legacy_ids == (legacy,)
    assert library_model_id(_FakeLibrary({legacy: str(directory)}), elsewhere) == elsewhere.model_id
    assert library_model_id(_FakeLibrary({}), ident) == ident.model_id


def test_an_old_library_is_queried_and_updated_without_reembedding(tmp_path):
    """A library indexed under the weights-only id answers queries and re-index skips every photo."""
    model_dir = make_tiny_model(tmp_path / "m")
    photos = tmp_path / "photos"
    make_photo_folder(photos)
    env = {"CLIPSEARCH_HOME": str(tmp_path / "home")}
    assert run_cli("index", str(photos), "--model", str(model_dir), "--json", env=env).returncode == 0
    db = tmp_path / "home" / "library.db"
    new_id = identify(model_dir).model_id
    legacy = identify(model_dir).legacy_ids[0]
    import sqlite3

    with sqlite3.connect(db) as conn:  # what an older clipsearch wrote: the weights-only id
        conn.execute("PRAGMA foreign_keys = OFF")
        for table, column in (("models", "id"), ("embeddings", "model_id"), ("labels", "model_id")):
            conn.execute(f"UPDATE {table} SET {column} = ? WHERE {column} = ?", (legacy, new_id))
    result = run_cli("query", "a blue circle", "--json", env=env)
    assert result.returncode == 0, result.stderr
    result = run_cli("index", str(photos), "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = parse_json(result.stdout)
    assert report["model_id"] == legacy
    assert report["new"] == report["updated"] == 0 and report["unchanged"] == len(list(photos.rglob("*.*")))
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM models")] == [legacy]


def test_model_json_is_part_of_the_folder_identity(tmp_path, tiny):
    directory = _save(tmp_path / "m", tiny)
    before = identify(directory).model_id
    record = json.loads((directory / MODEL_JSON).read_text())
    record["preprocess_cfg"]["interpolation"] = "bilinear"
    (directory / MODEL_JSON).write_text(json.dumps(record))
    assert identify(directory).model_id != before
