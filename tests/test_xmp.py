"""XMP write-back checked with a real XMP reader (exiftool): the keywords land where photo programs
read them, and a darktable/digiKam sidecar keeps everything else it had, byte for byte."""

from __future__ import annotations

import difflib
import json
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from e2e_helpers import run_cli, sidecar_keywords, write_photo
from test_reliability import invoke, tiny_model_dir

from clipsearch.xmp import XmpError, merge_keywords, sidecar_path, write_keywords

FIXTURE = Path(__file__).parent / "data" / "darktable.jpg.xmp"  # written by hand in darktable's layout
OURS = {"XMP-clipsearch:Keywords", "XMP-clipsearch:HierarchicalKeywords"}
CHANGED = {"XMP-dc:Subject", "XMP-lr:HierarchicalSubject"} | OURS


@pytest.fixture(scope="module")
def exiftool():
    path = shutil.which("exiftool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("exiftool is required in CI (Debian package libimage-exiftool-perl)")
        pytest.skip("exiftool not installed (apt-get install libimage-exiftool-perl)")
    return path


def read_xmp(exiftool: str, path: Path) -> dict:
    """Every XMP tag exiftool finds in ``path`` (lists as lists, structures expanded)."""
    out = subprocess.run(
        [exiftool, "-j", "-G1", "-a", "-struct", "-XMP:all", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    tags = json.loads(out.stdout)[0]
    tags.pop("SourceFile")
    return {k: (v if isinstance(v, list) else [v]) if k in CHANGED else v for k, v in tags.items()}


def _only_added(before: bytes, after: bytes) -> list[str]:
    """The lines of ``before`` that ``after`` lost or changed (the diff's '-' lines)."""
    diff = difflib.ndiff(before.decode().splitlines(), after.decode().splitlines())
    return [line[2:] for line in diff if line.startswith("- ")]


def test_a_darktable_sidecar_keeps_everything_and_gains_the_keywords_in_both_fields(tmp_path, exiftool):
    side = tmp_path / "IMG_4711.jpg.xmp"
    shutil.copy(FIXTURE, side)
    before_bytes = side.read_bytes()
    before = read_xmp(exiftool, side)
    write_keywords(tmp_path / "IMG_4711.jpg", ["dog", "lake"])
    after = read_xmp(exiftool, side)
    # Every tag exiftool reads is as it was, except the two keyword lists, which gained ours.
    assert {k: v for k, v in after.items() if k not in CHANGED} == {
        k: v for k, v in before.items() if k not in CHANGED
    }
    assert after["XMP-dc:Subject"] == ["lake", "Familie", "dog"]  # "lake" was there: not twice
    # "lake" is already a leaf of someone's tag tree: no second, top-level "lake" tag.
    assert after["XMP-lr:HierarchicalSubject"] == ["Places|Bavaria|lake", "People|Familie", "dog"]
    assert after["XMP-digiKam:TagsList"] == before["XMP-digiKam:TagsList"]
    assert (
        after["XMP-darktable:History"] == before["XMP-darktable:History"]
        and len(after["XMP-darktable:History"]) == 3
    )
    assert after["XMP-dc:Title-de-DE"] == "Sommer am See"  # xml:lang alternatives kept
    # Byte level: nothing was lost or reformatted; only the start tag that gained our namespace changed.
    after_bytes = side.read_bytes()
    assert _only_added(before_bytes, after_bytes) == ['   darktable:iop_order_version="4">']
    assert after_bytes.startswith(b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>')
    assert after_bytes.rstrip().endswith(b'<?xpacket end="w"?>')
    assert b"<!-- edited in darktable, tagged in digiKam: keep me -->" in after_bytes
    assert b"<rdf:Seq>\n     <rdf:li>Anna Becker" in after_bytes  # a Seq stays a Seq

    # A relabel takes back only what clipsearch wrote; the people's keywords stay.
    write_keywords(tmp_path / "IMG_4711.jpg", ["cat"])
    again = read_xmp(exiftool, side)
    assert again["XMP-dc:Subject"] == ["lake", "Familie", "cat"]
    assert again["XMP-lr:HierarchicalSubject"] == ["Places|Bavaria|lake", "People|Familie", "cat"]
    write_keywords(tmp_path / "IMG_4711.jpg", [])
    gone = read_xmp(exiftool, side)
    assert gone["XMP-dc:Subject"] == before["XMP-dc:Subject"] and not OURS & set(gone)
    assert {k: v for k, v in gone.items()} == before


def test_unchanged_keywords_do_not_rewrite_the_file(tmp_path):
    side = tmp_path / "a.jpg.xmp"
    shutil.copy(FIXTURE, side)
    write_keywords(tmp_path / "a.jpg", ["dog"])
    first = os.stat(side)
    write_keywords(tmp_path / "a.jpg", ["dog"])
    assert os.stat(side).st_ino == first.st_ino and os.stat(side).st_mtime_ns == first.st_mtime_ns


def test_a_new_sidecar_is_a_full_xmp_packet(tmp_path, exiftool):
    image = tmp_path / "new.jpg"
    write_keywords(image, ["beach", "a & b <c>"])
    tags = read_xmp(exiftool, sidecar_path(image))
    assert tags["XMP-dc:Subject"] == ["beach", "a & b <c>"]
    assert tags["XMP-lr:HierarchicalSubject"] == ["beach", "a & b <c>"]
    data = sidecar_path(image).read_bytes()
    assert data.startswith(b"<?xpacket begin=") and b'<?xpacket end="w"?>' in data
    assert write_keywords(tmp_path / "none.jpg", []) is None and not (tmp_path / "none.jpg.xmp").exists()


def test_a_compact_digikam_style_description_and_unusual_prefixes(tmp_path, exiftool):
    side = tmp_path / "b.jpg.xmp"
    side.write_text(
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/"'
        ' xmlns:purl="http://purl.org/dc/elements/1.1/" xmp:Rating="2"/>\n'
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    )
    write_keywords(tmp_path / "b.jpg", ["tree"])
    tags = read_xmp(exiftool, side)
    assert tags["XMP-xmp:Rating"] == 2 and tags["XMP-dc:Subject"] == ["tree"]
    assert tags["XMP-lr:HierarchicalSubject"] == ["tree"]
    text = side.read_text()
    assert "<purl:subject>" in text  # the prefix the file already binds to Dublin Core is used


def test_a_seq_subject_stays_a_seq(tmp_path, exiftool):
    side = tmp_path / "c.jpg.xmp"
    side.write_text(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/">'
        "<dc:subject><rdf:Seq><rdf:li>first</rdf:li></rdf:Seq></dc:subject>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    write_keywords(tmp_path / "c.jpg", ["second"])
    assert read_xmp(exiftool, side)["XMP-dc:Subject"] == ["first", "second"]
    assert "<dc:subject><rdf:Seq><rdf:li>first</rdf:li><rdf:li>second</rdf:li></rdf:Seq>" in side.read_text()


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"not xml <", "not well-formed"),
        ('<?xml version="1.0" encoding="UTF-16"?><a/>'.encode("utf-16"), "not UTF-8"),
        (b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>", "no rdf:Description"),
    ],
)
def test_a_sidecar_that_cannot_be_merged_is_left_alone(tmp_path, content, reason):
    side = tmp_path / "d.jpg.xmp"
    side.write_bytes(content)
    with pytest.raises(XmpError, match=reason):
        write_keywords(tmp_path / "d.jpg", ["x"])
    assert side.read_bytes() == content


def _within(seconds: float, fn):
    """``fn()``'s outcome, or a failure when it has not returned within ``seconds`` (a hang)."""
    outcome: list = []

    def call():
        try:
            outcome.append(("value", fn()))
        except BaseException as e:  # handed back to the test
            outcome.append(("error", e))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still blocked after {seconds} s"
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_sidecar_that_is_a_fifo_is_reported_without_blocking_and_left_alone(tmp_path):
    from clipsearch.metadata import _sidecar_xmp

    side = tmp_path / "d.jpg.xmp"
    os.mkfifo(side)
    kind, value = _within(10, lambda: write_keywords(tmp_path / "d.jpg", ["x"]))
    assert kind == "error" and isinstance(value, XmpError), value
    assert str(value) == f"{side}: cannot read it (not a regular file)"
    assert stat.S_ISFIFO(os.lstat(side).st_mode)
    # index reads sidecars too: a FIFO is passed over for the next one (photo.xmp), never waited on
    (tmp_path / "d.xmp").write_text(LIGHTROOM_SIDECAR)
    kind, value = _within(10, lambda: _sidecar_xmp(tmp_path / "d.jpg"))
    assert kind == "value" and value["taken_at"].startswith("2024-06-01"), value


def test_a_sidecar_of_a_photo_whose_folder_is_gone_does_not_make_the_folder(tmp_path):
    """A drive that is not mounted: its photos are still in the library, their folder is not there."""
    gone = tmp_path / "drive" / "photos"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_keywords(gone / "a.jpg", ["dog"])
    assert list(tmp_path.iterdir()) == []


def test_merge_is_idempotent_and_undone_by_an_empty_merge():
    data = FIXTURE.read_bytes()
    once = merge_keywords(data, ["dog"])
    assert merge_keywords(once, ["dog"]) == once
    assert merge_keywords(once, []).replace(b'\n   xmlns:clipsearch="urn:clipsearch:xmp:1.0"', b"") == data


# --- through the CLI, as a user meets it ---------------------------------------------------------------


def test_label_write_xmp_on_a_private_symlinked_darktable_sidecar(tmp_path, tmp_path_factory, exiftool):
    photos = tmp_path / "photos"
    write_photo(photos / "IMG_4711.jpg", 1)
    write_photo(photos / "other.jpg", 2)
    synced = tmp_path / "sync"  # the sidecars live in a synced folder, linked beside the photos
    synced.mkdir()
    shutil.copy(FIXTURE, synced / "IMG_4711.jpg.xmp")
    os.chmod(synced / "IMG_4711.jpg.xmp", 0o600)
    (photos / "IMG_4711.jpg.xmp").symlink_to(synced / "IMG_4711.jpg.xmp")
    (photos / "other.jpg.xmp").write_text("garbage <")  # another program's broken file
    before = read_xmp(exiftool, synced / "IMG_4711.jpg.xmp")
    db = tmp_path / "lib.db"
    assert invoke("index", "--model", tiny_model_dir(tmp_path_factory), photos, db=db).exit_code == 0

    result = invoke("label", "--classes", "dog,cat,tree", "--threshold", "0", "--write-xmp", "--json", db=db)
    assert result.exit_code != 0  # one sidecar could not be merged
    rows = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
    assert "not well-formed" in rows["other.jpg"]["xmp"]["error"]
    assert (photos / "other.jpg.xmp").read_text() == "garbage <"
    top = rows["IMG_4711.jpg"]["label"]
    assert rows["IMG_4711.jpg"]["xmp"] == {
        "sidecar": str(photos / "IMG_4711.jpg.xmp"),
        "keywords": [top],
        "error": None,
    }
    assert "XMP sidecars not written for 1 of 2 photos" in result.stderr

    link = photos / "IMG_4711.jpg.xmp"
    assert link.is_symlink() and os.readlink(link) == str(synced / "IMG_4711.jpg.xmp")
    assert stat.S_IMODE(os.stat(synced / "IMG_4711.jpg.xmp").st_mode) == 0o600
    after = read_xmp(exiftool, link)
    assert after["XMP-dc:Subject"] == before["XMP-dc:Subject"] + [top]
    assert after["XMP-lr:HierarchicalSubject"] == before["XMP-lr:HierarchicalSubject"] + [top]
    assert {k: v for k, v in after.items() if k not in CHANGED} == {
        k: v for k, v in before.items() if k not in CHANGED
    }
    assert sorted(p.name for p in synced.iterdir()) == ["IMG_4711.jpg.xmp"]  # no temporaries left


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_label_write_xmp_reports_a_fifo_sidecar_and_does_not_hang(tmp_path, tmp_path_factory):
    """The field test: `label --write-xmp` used to wait forever on a FIFO named like a sidecar."""
    sub = tmp_path / "photos" / "sub"
    write_photo(sub / "deep.jpg", 1)
    write_photo(sub / "other.jpg", 2)
    db = tmp_path / "lib.db"
    assert (
        invoke("index", "--model", tiny_model_dir(tmp_path_factory), tmp_path / "photos", db=db).exit_code
        == 0
    )
    os.mkfifo(sub / "deep.jpg.xmp")  # after indexing, as a program might make it
    args = ("--db", str(db), "label", "--classes", "dog,cat", "--in", str(sub), "--write-xmp")
    proc = run_cli(*args, "--threshold", "0", "--json", timeout=90)  # TimeoutExpired: the hang is back
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    rows = {Path(r["path"]).name: r for r in json.loads(proc.stdout)}
    assert rows["deep.jpg"]["xmp"]["error"] == f"{sub / 'deep.jpg.xmp'}: cannot read it (not a regular file)"
    assert rows["other.jpg"]["xmp"]["error"] is None and sidecar_keywords(sub / "other.jpg")
    assert stat.S_ISFIFO(os.lstat(sub / "deep.jpg.xmp").st_mode)  # left untouched
    assert "XMP sidecars not written for 1 of 2 photos" in proc.stderr


def test_label_write_xmp_writes_only_labels_sure_enough(tmp_path, tmp_path_factory):
    photos = tmp_path / "photos"
    for i in range(3):
        write_photo(photos / f"{i}.jpg", i)
    db = tmp_path / "lib.db"
    assert invoke("index", "--model", tiny_model_dir(tmp_path_factory), photos, db=db).exit_code == 0
    classes = "dog,cat,tree,car,beach,city,food,snow"
    result = invoke("label", "--classes", classes, "--top-k", "8", "--write-xmp", "--json", db=db)
    assert result.exit_code == 0, result.output
    for row in json.loads(result.stdout):
        sure = [lab["label"] for lab in row["labels"] if lab["score"] >= 0.5]  # the default bar
        assert row["xmp"]["keywords"] == sure
        assert sidecar_keywords(row["path"]) == sure
    result = invoke("label", "--classes", classes, "--threshold", "0", "--write-xmp", "--json", db=db)
    for row in json.loads(result.stdout):
        assert row["xmp"]["keywords"] == [row["label"]] and sidecar_keywords(row["path"]) == [row["label"]]


# A sidecar in the layout Lightroom Classic writes beside a RAW file (``photo.xmp``, attributes on
# one rdf:Description, develop settings in crs:), written here by hand.
LIGHTROOM_SIDECAR = """<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Adobe XMP Core 7.0-c000 1.000000, 0000/00/00-00:00:00        ">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:exif="http://ns.adobe.com/exif/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:crs="http://ns.adobe.com/camera-raw-settings/1.0/"
   xmp:Rating="3"
   exif:DateTimeOriginal="2024-06-01T18:30:00"
   exif:GPSLatitude="48,51.5N"
   exif:GPSLongitude="2,17.6E"
   crs:Exposure2012="+0.35">
   <dc:subject>
    <rdf:Bag>
     <rdf:li>Paris</rdf:li>
    </rdf:Bag>
   </dc:subject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""  # noqa: E501


def test_a_lightroom_sidecar_of_a_raw_file_is_edited_where_lightroom_reads_it(tmp_path, exiftool):
    from clipsearch.metadata import _sidecar_xmp

    raw = tmp_path / "IMG_0001.CR3"
    raw.write_bytes(b"not read by the sidecar writer")
    side = tmp_path / "IMG_0001.xmp"
    side.write_text(LIGHTROOM_SIDECAR)
    before, tags_before = side.read_bytes(), read_xmp(exiftool, side)
    assert write_keywords(raw, ["beach", "sunset"]) == side
    assert not (tmp_path / "IMG_0001.CR3.xmp").exists()  # no second sidecar Lightroom would not see
    tags = read_xmp(exiftool, side)
    assert tags["XMP-dc:Subject"] == ["Paris", "beach", "sunset"]
    assert tags["XMP-xmp:Rating"] == 3 and tags["XMP-crs:Exposure2012"] == "+0.35"
    assert {k: v for k, v in tags.items() if k not in CHANGED} == {
        k: v for k, v in tags_before.items() if k not in CHANGED
    }  # nothing Lightroom wrote was lost...
    # ...byte for byte: only the start tag's end moved, for the namespaces declared after it
    assert _only_added(before, side.read_bytes()) == ['   crs:Exposure2012="+0.35">']
    assert b'   crs:Exposure2012="+0.35"\n' in side.read_bytes()
    # the date and place it holds are still what clipsearch reads for the photo
    found = _sidecar_xmp(raw)
    assert found["taken_at"].startswith("2024-06-01") and found["lat"] == pytest.approx(48.858, abs=1e-3)
    write_keywords(raw, [])  # a relabel to nothing takes back only clipsearch's own keywords
    assert read_xmp(exiftool, side)["XMP-dc:Subject"] == ["Paris"]


@pytest.mark.parametrize(
    "files, photo, expected",
    [
        (["p.cr3"], "p.cr3", "p.xmp"),  # the only photo with that stem: Lightroom's sidecar is its own
        (["p.cr3", "p.jpg"], "p.cr3", "p.xmp"),  # Lightroom's RAW+JPEG pair: the RAW's
        (["p.cr3", "p.jpg"], "p.jpg", "p.jpg.xmp"),
        (["p.jpg", "p.png"], "p.jpg", "p.jpg.xmp"),  # whose it is cannot be told: one of our own
        (["p.cr3", "p.nef"], "p.cr3", "p.cr3.xmp"),
        (["p.cr3", "p.backup.jpg"], "p.cr3", "p.xmp"),  # another stem
        (["p.cr3", "p.cr3.xmp"], "p.cr3", "p.cr3.xmp"),  # darktable's own is there: it wins
        (["p.jpg", "[p].jpg"], "[p].jpg", "[p].jpg.xmp"),  # glob characters in a name: no p.xmp for it
    ],
)
def test_which_sidecar_a_photo_gets(tmp_path, files, photo, expected):
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "p.xmp").write_text(LIGHTROOM_SIDECAR)
    assert sidecar_path(tmp_path / photo) == tmp_path / expected
    (tmp_path / "p.xmp").unlink()
    assert sidecar_path(tmp_path / photo) == tmp_path / (photo + ".xmp")  # none: darktable's name


def test_label_write_xmp_does_not_make_the_next_index_read_the_photos_again(tmp_path, tmp_path_factory):
    """The keywords `label --write-xmp` writes change the sidecars' mtimes; the next index used to take
    that for another program's edit and read every labelled photo's headers again (minutes on a big
    library). A sidecar that another program did edit still is read again."""
    photos = tmp_path / "photos"
    for i in range(3):
        write_photo(photos / f"{i}.jpg", i)
    db = tmp_path / "lib.db"
    model = tiny_model_dir(tmp_path_factory)

    def index() -> dict:
        result = invoke("index", "--model", model, photos, "--json", db=db)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    index()
    # one photo's sidecar is edited by another program after indexing, before the labels are written
    edited = photos / "2.jpg.xmp"
    edited.write_text(LIGHTROOM_SIDECAR)
    result = invoke("label", "--classes", "dog,cat", "--threshold", "0", "--write-xmp", db=db)
    assert result.exit_code == 0, result.output
    assert all(sidecar_keywords(photos / f"{i}.jpg") for i in range(3))
    assert index()["metadata"] == 1  # only the sidecar another program changed
    assert index()["metadata"] == 0
