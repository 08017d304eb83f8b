"""The HTML results page: self-contained, escaped, thumbnails that decode, placeholders for bad files."""

from __future__ import annotations

import base64
import io
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from e2e_helpers import write_photo
from PIL import Image

from clipsearch.report import render_html, write_html
from clipsearch.search import Hit

EVIL = "<script>alert(1)</script>.jpg"


class _Collector(HTMLParser):
    """Collects the tags, the text and the img sources of a page, as a browser would parse it."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Collector:
    c = _Collector()
    c.feed(page)
    return c


def test_names_and_query_are_escaped(tmp_path):
    photo = write_photo(tmp_path / EVIL, 1)
    page = render_html([Hit(photo, 0.91234, 1)], title="q <b>x</b>", query_desc='"beach" & <img src=x>')
    parsed = _parse(page)
    assert "script" not in parsed.tags  # the file name is text, not a tag
    assert parsed.tags.count("img") == 1  # only the thumbnail; the query's <img> is text
    text = "".join(parsed.text)
    assert EVIL in text
    assert '"beach" & <img src=x>' in text
    assert "q <b>x</b>" in text
    assert "0.9123" in text
    assert "&lt;script&gt;" in page


def test_thumbnails_are_inline_jpegs_at_most_256px(tmp_path):
    big = write_photo(tmp_path / "big.png", 2, size=(800, 400))
    small = write_photo(tmp_path / "small.jpg", 3, size=(100, 60))
    out = write_html([Hit(big, 0.5, 1), Hit(small, 0.4, 2)], tmp_path / "r.html", "t", "q")
    page = out.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert len(parsed.images) == 2
    sizes = []
    for src in parsed.images:
        assert src.startswith("data:image/jpeg;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "JPEG"
        sizes.append(img.size)
    assert sizes[0] == (256, 128)  # longest side 256, aspect kept
    assert sizes[1] == (100, 60)  # never enlarged
    # Self-contained: nothing fetched from anywhere.
    assert not re.search(r'(src|href)="https?:', page)
    assert "Content-Security-Policy" in page


def test_unreadable_images_get_a_placeholder(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    gone = tmp_path / "gone.jpg"
    ok = write_photo(tmp_path / "ok.webp", 4)
    page = render_html([Hit(broken, 0.3, 1), Hit(gone, 0.2, 2), Hit(ok, 0.1, 3)], "t", "q")
    assert page.count("cannot show this image") == 2
    assert len(_parse(page).images) == 1
    assert str(gone) in page


def test_empty_results_and_atomic_write(tmp_path):
    target = tmp_path / "r.html"
    target.write_text("old")
    write_html([], target, "nothing", "q")
    assert "No results." in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file, not mkstemp's 0600


@pytest.mark.parametrize("name", ["50% off_ok.jpg", "quote'\"amp&.png"])
def test_odd_names_round_trip_as_text(tmp_path, name):
    photo = write_photo(tmp_path / name, 5)
    parsed = _parse(render_html([Hit(Path(photo), 1.0, 1)], "t", "q"))
    assert str(photo) in "".join(parsed.text)


def test_non_utf8_names_render(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")
    photo = write_photo(tmp_path / name, 6)
    out = write_html([Hit(photo, 0.5, 1)], tmp_path / "r.html", "t", "q")
    page = out.read_text(encoding="utf-8")
    assert "caf\ufffd.jpg" in page
    assert "caf%E9.jpg" in page  # the link keeps the exact bytes
    assert page.count("data:image/jpeg;base64,") == 1
