"""Zero-shot class names: synset folders mapped to names (a mapping file, or ImageNet's offline), prompt files."""

import json
import logging
import os
import shutil

import pytest
from PIL import Image

from clipsearch import zeroshot as library_zeroshot
from trainer import evaluate
from trainer import train as train_mod
from trainer.data import DataError
from trainer.synthetic import generate


def _class_folders(root, names, per_class=1):
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (32, 32), (40 * i % 255, 90, 30 * j % 255)).save(root / name / f"{j}.png")
    return root


def test_imagenet_synset_folders_get_imagenets_names_offline(tmp_path):
    root = _class_folders(tmp_path / "val", ["n01443537", "n01440764", "n15075141"])
    data = evaluate.read_class_folders(root)
    assert data.classnames == ["tench", "goldfish", "toilet paper"]  # folders sorted by ID
    assert data.labels == [0, 1, 2] and data.templates is None


def test_a_loc_synset_mapping_file_wins_and_its_name_ends_at_the_first_comma(tmp_path):
    root = _class_folders(tmp_path / "val", ["n01440764", "n01443537"])
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tinca fish, Tinca tinca\nn01443537 goldfish, Carassius auratus\n\n")
    assert evaluate.read_class_folders(root, classnames=mapping).classnames == ["tinca fish", "goldfish"]
    # The same file found beside the folders (classnames.txt) is read without the flag.
    shutil.copy(mapping, root / "classnames.txt")
    assert evaluate.read_class_folders(root).classnames == ["tinca fish", "goldfish"]


@pytest.mark.parametrize(
    "content",
    [
        {"cat_a": "tabby cat", "dog": "puppy"},  # folder -> name
        {"0": ["cat_a", "tabby cat"], "1": ["dog", "puppy"]},  # Keras' imagenet_class_index.json
        ["tabby cat", "puppy"],  # names in sorted folder order
    ],
)
def test_json_mappings(tmp_path, content):
    root = _class_folders(tmp_path / "val", ["dog", "cat_a"])
    (tmp_path / "names.json").write_text(json.dumps(content))
    assert evaluate.read_class_folders(root, classnames=tmp_path / "names.json").classnames == [
        "tabby cat",
        "puppy",
    ]


def test_bad_mapping_files_are_refused_with_what_is_wrong(tmp_path):
    root = _class_folders(tmp_path / "val", ["n01440764", "n01443537"])
    cases = {
        "short.txt": ("n01440764 tench\n", "no name for 1 class folder.*n01443537"),
        "oneword.txt": ("n01440764\n", "line 1: expected 'FOLDER NAME'"),
        "list.json": ('["tench"]', "1 names for 2 class folders"),
        "broken.json": ("{", "not JSON"),
        "odd.json": ('{"a": 1}', "expected"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            evaluate.read_class_folders(root, classnames=tmp_path / name)
    with pytest.raises(DataError, match="cannot read"):
        evaluate.read_class_folders(root, classnames=tmp_path / "absent.txt")


def test_synsets_outside_imagenet_keep_their_ids_with_a_warning(tmp_path, caplog):
    root = _class_folders(tmp_path / "val", ["n01440764", "n99999999"])
    with caplog.at_level(logging.WARNING, logger="trainer.evaluate"):
        assert evaluate.read_class_folders(root).classnames == ["n01440764", "n99999999"]
    assert "--zeroshot-classnames" in caplog.text


def test_prompt_files(tmp_path):
    root = _class_folders(tmp_path / "val", ["a_b", "c"])
    (root / "templates.txt").write_text("a sketch of {}\nnot a template\n")
    assert evaluate.read_class_folders(root).templates == ["a sketch of {}"]
    given = tmp_path / "prompts.txt"
    given.write_text("itap of a {}.\n")
    assert evaluate.read_class_folders(root, templates=given).templates == ["itap of a {}."]  # wins
    given.write_text("no placeholder\n")
    with pytest.raises(DataError, match="no template"):
        evaluate.read_class_folders(root, templates=given)


def test_labelled_csv_labels_are_mapped_too(tmp_path):
    _class_folders(tmp_path, ["img"], per_class=2)
    (tmp_path / "test.csv").write_text("filepath,label\nimg/0.png,n01440764\nimg/1.png,n01443537\n")
    (tmp_path / "map.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    data = evaluate.read_labelled(tmp_path / "test.csv", classnames=tmp_path / "map.txt")
    assert data.classnames == ["tench", "goldfish"] and data.labels == [0, 1]


def test_the_shipped_imagenet_names_are_openais():
    """The shipped file against OpenCLIP's copy of OpenAI's list (an independent source)."""
    rows = [line.split("\t") for line in evaluate.IMAGENET_CLASSNAMES.read_text().splitlines()]
    ids = [r[0] for r in rows]
    assert len(rows) == 1000 and ids == sorted(set(ids)) and all(evaluate.SYNSET.fullmatch(i) for i in ids)
    assert rows[0] == ["n01440764", "tench"] and rows[-1] == ["n15075141", "toilet paper"]
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("open_clip not installed (pip install '.[test]')")
    assert [r[1] for r in rows] == list(IMAGENET_CLASSNAMES)


def test_imagenet_val_during_training_classifies_by_the_names(tmp_path, monkeypatch):
    """OpenCLIP's --imagenet-val on synset folders: the classifier is built from 'tench', 'goldfish'."""
    shapes = generate(tmp_path / "shapes", n=20, seed=1, image_size=32, zeroshot_per_class=1)
    val = _class_folders(tmp_path / "imagenet" / "val", ["n01440764", "n01443537"], per_class=2)
    seen = []
    real = library_zeroshot.build_classifier

    def spy(model, tokenizer, classnames, templates, **kw):
        seen.append((list(classnames), list(templates)))
        return real(model, tokenizer, classnames, templates, **kw)

    monkeypatch.setattr(library_zeroshot, "build_classifier", spy)
    argv = ["--train-data", str(shapes.train_csv), "--model", "demo-vit", "--batch-size", "6",
            "--epochs", "1", "--output", str(tmp_path / "run"), "--device", "cpu",
            "--imagenet-val", str(val)]  # fmt: skip
    assert train_mod.main(argv) == 0
    assert seen[0][0] == ["tench", "goldfish"] and len(seen[0][1]) == 80  # the paper's ImageNet prompts
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("zeroshot_n") == 4 for r in rows)
    (tmp_path / "prompts.txt").write_text("a {} fish\n")
    seen.clear()
    argv[argv.index("--output") + 1] = str(tmp_path / "run2")
    argv += ["--zeroshot-templates", str(tmp_path / "prompts.txt")]
    assert train_mod.main(argv) == 0
    assert seen[0] == (["tench", "goldfish"], ["a {} fish"])
