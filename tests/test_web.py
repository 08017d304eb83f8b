"""`clipsearch web` without a browser: the security policy, every page through the Flask app over a
real indexed library, and the real server process over HTTP (raw requests a browser would not send).

The browser tests are in test_web_browser.py."""

from __future__ import annotations

import http.client
import io
import os
import re
import subprocess
import sys
from html import unescape
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image
from web_helpers import (
    CAMERA,
    HOSTILE_NAME,
    LATIN1_BROKEN,
    LATIN1_NAME,
    ServerProcess,
    build_site,
    latin1_photo,
)

from clipsearch.encoders import ModelEncoder
from clipsearch.search import Query, search
from clipsearch.store import Library
from clipsearch.web import WebError, make_server, security
from clipsearch.web.app import MAX_UPLOAD_BYTES, PAGE_SIZE, create_app
from clipsearch.web.live import LiveLibrary
from clipsearch.web.thumbs import ThumbnailCache, render_jpeg

PORT = 8765


# --- the policy, as pure functions -----------------------------------------------------------------


def test_host_policy_accepts_only_loopback_names_and_the_bound_port():
    p = security.HostPolicy("127.0.0.1", PORT)
    for ok in ("localhost:8765", "127.0.0.1:8765", "[::1]:8765", "LOCALHOST:8765"):
        assert p.allows(ok), ok
    for bad in (
        "evil.example:8765",  # DNS rebinding: a foreign name pointed at 127.0.0.1
        "localhost:8766",
        "localhost",  # no port: not what a browser sends for our address
        "localhost.evil.example:8765",
        "127.0.0.1:8765:1",
        "[::1:8765",
        "",
        None,
        "192.168.1.10:8765",
    ):
        assert not p.allows(bad), bad


def test_host_policy_of_a_wildcard_bind_accepts_ip_literals_not_names():
    p = security.HostPolicy("0.0.0.0", PORT)
    assert p.allows("192.168.1.10:8765") and p.allows("[fe80::1]:8765") and p.allows("localhost:8765")
    assert not p.allows("rebound.evil.example:8765")


def test_origin_and_tokens():
    p = security.HostPolicy("127.0.0.1", PORT)
    assert p.allows_origin(None) and p.allows_origin("http://localhost:8765")
    assert not p.allows_origin("http://evil.example") and not p.allows_origin("null")
    assert not p.allows_origin("https://localhost:8765")
    t = security.new_token()
    assert len(t) >= 40 and t != security.new_token()
    assert security.same_token(t, t) and not security.same_token(t[:-1] + "x", t)
    assert not security.same_token(None, t) and not security.same_token("\udcff", t)


def test_loopback_and_wildcard_addresses():
    assert (
        security.is_loopback("127.0.0.1")
        and security.is_loopback("::1")
        and security.is_loopback("localhost")
    )
    assert security.is_loopback("127.0.0.2") and not security.is_loopback("0.0.0.0")
    assert not security.is_loopback("192.168.1.10") and not security.is_loopback("example.org")
    assert (
        security.is_wildcard("0.0.0.0")
        and security.is_wildcard("::")
        and not security.is_wildcard("127.0.0.1")
    )


def test_a_non_loopback_address_needs_the_explicit_flag(tmp_path):
    with pytest.raises(WebError, match="--allow-remote"):
        make_server(tmp_path / "none.db", host="0.0.0.0", port=0)


# --- thumbnails ------------------------------------------------------------------------------------


def test_thumbnails_are_upright_made_once_and_bounded(tmp_path):
    from e2e_helpers import write_photo

    # 200x100 stored, EXIF orientation 6 (turn 90 degrees): upright it is 100 wide, 200 high
    rotated = write_photo(tmp_path / "r.jpg", 1, size=(200, 100), exif_orientation=6)
    img = Image.open(io.BytesIO(render_jpeg(rotated, 64)))
    assert img.size == (32, 64)
    cache = ThumbnailCache(tmp_path / "cache", max_bytes=10_000)
    first = cache.get(rotated, "aa11", 64)
    assert first.stat().st_mode & 0o777 == 0o600  # pictures of the user's photos: theirs only
    mtime = first.stat().st_mtime_ns
    assert cache.get(rotated, "aa11", 64) == first and first.stat().st_mtime_ns >= mtime
    first.write_bytes(b"marker")  # served from the cache, not made again
    assert cache.get(rotated, "aa11", 64).read_bytes() == b"marker"
    cache.total = os.path.getsize(first)
    photos = [write_photo(tmp_path / f"p{i}.png", 10 + i, size=(300, 300)) for i in range(12)]
    for i, p in enumerate(photos):
        cache.get(p, f"h{i:02d}", 160)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*.jpg"))
    assert on_disk <= 10_000 and cache.total == on_disk
    assert cache.file_for("h11", 160).exists()  # the newest stays; the oldest went
    assert not cache.file_for("h00", 160).exists()
    assert cache.get(tmp_path / "missing.jpg", "zz", 64) is None


# --- the app over a real library -------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return build_site(tmp_path_factory.mktemp("web_site"))


@pytest.fixture(scope="module")
def app_client(site):
    saved = os.environ.get("CLIPSEARCH_HOME")
    os.environ["CLIPSEARCH_HOME"] = str(site.home)  # the text encoder export lives there
    try:
        live = LiveLibrary(site.db)
        live.warm_up()
    finally:
        if saved is not None:
            os.environ["CLIPSEARCH_HOME"] = saved
    thumbs = ThumbnailCache(site.root / "thumbs")
    app = create_app(live, thumbs, host="127.0.0.1", port=PORT, uploads_dir=site.home / "uploads")
    app.testing = True
    client = app.test_client()
    client.live = live
    yield client
    live.close()


def get(client, url, **kw):
    return client.get(url, base_url=f"http://localhost:{PORT}", **kw)


def tile_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<a href="/photo/(\d+)"', html)]


def csrf(client) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', get(client, "/").get_data(as_text=True)).group(1)


def test_search_page_ranks_as_the_library_does(site, app_client):
    html = get(app_client, "/?q=a+red+photo").get_data(as_text=True)
    with Library.open(site.db) as lib:
        from clipsearch.checkpoints import load_bundle

        expected = search(
            lib, ModelEncoder(load_bundle(str(site.model))), Query.build("a red photo"), top=PAGE_SIZE
        )
    assert tile_ids(html) == [h.image_id for h in expected]  # same order as the torch model gives
    scores = [float(s) for s in re.findall(r'class="score">([-0-9.]+)<', html)]
    assert scores == pytest.approx([round(h.score, 3) for h in expected], abs=2e-3)
    assert 'value="a red photo"' in html  # linkable: the query is in the URL and in the box


def test_paging_covers_every_photo_once(site, app_client):
    with Library.open(site.db) as lib:
        total = lib.stats().images
    assert total > PAGE_SIZE
    first = get(app_client, "/?q=blue").get_data(as_text=True)
    assert 'href="/?q=blue&amp;page=2"' in first
    second = get(app_client, "/?q=blue&page=2&partial=1").get_data(as_text=True)
    assert "<header>" not in second  # the infinite scroll's fragment: tiles only
    ids = tile_ids(first) + tile_ids(second)
    assert len(ids) == total and len(set(ids)) == total
    assert "data-next" not in second


def test_date_and_camera_filters_in_the_url(site, app_client):
    with Library.open(site.db) as lib:
        camera_id = next(r.id for r in lib.images() if r.path.name == "camera.jpg")
    for args in ("camera=eos+r5", "after=2023-07-01&before=2023-08-01", "camera=canon&after=2023"):
        html = get(app_client, f"/?q=blue&{args}").get_data(as_text=True)
        assert tile_ids(html) == [camera_id], args  # the one photo that says so, found by the search
        assert "data-next" not in html
    html = get(app_client, "/?q=blue&camera=canon&page=1").get_data(as_text=True)
    assert '<input type="hidden" name="camera" value="canon">' in html  # a new search keeps the filter
    assert 'name="camera" value="canon"' in html.split('class="filters"')[1]
    assert tile_ids(get(app_client, "/?q=blue&before=2000").get_data(as_text=True)) == []
    bad = get(app_client, "/?q=blue&after=yesterday")
    assert bad.status_code == 400 and "give a date as YYYY-MM-DD" in unescape(bad.get_data(as_text=True))
    assert get(app_client, "/?q=blue&near=1,2&within=far").status_code == 400


def test_folder_filter_in_the_url(site, app_client):
    folder = site.photos / "trips"
    html = get(app_client, "/", query_string={"q": "green", "in": str(folder)}).get_data(as_text=True)
    ids = tile_ids(html)
    with Library.open(site.db) as lib:
        assert set(ids) == lib.image_ids_under(folder) and ids
    bad = get(app_client, "/?q=green&in=relative/folder")
    assert bad.status_code == 400 and "absolute folder" in bad.get_data(as_text=True)


def test_more_like_this_uses_the_stored_vector_and_leaves_the_photo_out(site, app_client):
    with Library.open(site.db) as lib:
        ids, _, vectors = lib.embeddings(lib.default_model_id())
    source = int(ids[3])
    sims = vectors @ vectors[3]
    expected = [int(i) for i in ids[np.argsort(-sims, kind="stable")] if i != source][:PAGE_SIZE]
    html = get(app_client, f"/similar/{source}").get_data(as_text=True)
    got = tile_ids(html)
    assert got[0] == source  # the heading links to the photo itself
    assert set(got[1:]) == set(expected)
    score = dict(zip(ids.tolist(), sims.tolist(), strict=True))
    # ranked by the stored vectors' cosine (ties, e.g. a file and its copy, in either order)
    np.testing.assert_allclose([score[i] for i in got[1:]], [score[i] for i in expected], atol=1e-5)


def test_a_search_that_loads_the_model_does_not_hold_up_the_others(site, monkeypatch):
    """Where a text search needs the model (no torch-free path: a GPU named, say), its seconds of
    loading must not stop "more like this" and the other searches of the same warm library."""
    import threading

    from clipsearch.checkpoints import load_bundle

    monkeypatch.setenv("CLIPSEARCH_HOME", str(site.home))
    live = LiveLibrary(site.db)
    loading, release, answered = threading.Event(), threading.Event(), threading.Event()

    def slow_load(source, library):
        loading.set()
        assert release.wait(60), "the test never let the load finish"
        return load_bundle(source, library=library)

    live.searcher._load_model = slow_load
    live.searcher.torch_free = False  # so this text search needs the model
    out = {}
    text = threading.Thread(target=lambda: out.update(text=live.search_text("a red photo")))
    text.start()
    try:
        assert loading.wait(60)
        with Library.open(site.db) as lib:
            source = int(lib.embeddings(lib.default_model_id())[0][3])

        def more_like_this():
            out["similar"] = live.similar(source)
            answered.set()

        threading.Thread(target=more_like_this, daemon=True).start()
        assert answered.wait(30), "'more like this' waited for another search's model to load"
    finally:
        release.set()
        text.join(60)
    assert out["similar"].photos and source not in [p.id for p in out["similar"].photos]
    assert out["text"].photos
    live.close()


def test_photo_page_and_hostile_name_are_escaped(site, app_client):
    with Library.open(site.db) as lib:
        hostile = next(r for r in lib.images() if r.path.name == HOSTILE_NAME)
    html = get(app_client, f"/photo/{hostile.id}").get_data(as_text=True)
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in html
    assert unescape(re.search(r'<h1 class="filename">(.*?)</h1>', html).group(1)) == HOSTILE_NAME
    assert "More like this" in html and f"/image/{hostile.id}" in html


def test_a_name_that_is_not_utf8_shows_readably_on_every_page(site, app_client):
    """A Latin-1 name (its byte 0xE9 a lone surrogate in Python) shows with U+FFFD in its place, as the
    HTML report shows it; its links work and its file is served byte for byte."""
    path = latin1_photo(site)
    readable = LATIN1_NAME.decode("utf-8", "replace")  # "caf\ufffd.jpg", decoded independently
    with Library.open(site.db) as lib:
        row = next(r for r in lib.images() if r.path == path)
        label = next(r.label for r in lib.labels() if r.image_id == row.id and r.rank == 1)
    tile_name = f'<span class="name">{readable}</span>'

    pages = {
        "search": f"/?q=dog&in={os.fsdecode(site.photos / 'latin1')}",
        "scroll": f"/?q=dog&in={os.fsdecode(site.photos / 'latin1')}&partial=1",
        "photo": f"/photo/{row.id}",
        "similar": f"/similar/{row.id}",
        "duplicates": "/duplicates?threshold=0.9999",
        "status": "/status",  # lists the file beside it that could not be indexed
    }
    html = {}
    for what, url in pages.items():
        response = get(app_client, url)
        assert response.status_code == 200, (what, response.status_code)
        html[what] = response.get_data(as_text=True)
    assert tile_ids(html["search"]) == [row.id] and tile_name in html["search"]
    assert tile_ids(html["scroll"]) == [row.id] and tile_name in html["scroll"]
    assert f'<h1 class="filename">{readable}</h1>' in html["photo"]
    assert f"<title>{readable} - clipsearch</title>" in html["photo"]
    assert f'alt="{readable}"' in html["similar"]
    group = next(g for g in html["duplicates"].split('<section class="dupgroup">') if f"/photo/{row.id}" in g)
    shown = os.fsencode(path).decode("utf-8", "replace")
    assert f'<span class="path">{shown}</span>' in group
    broken = os.fsencode(latin1_photo(site, LATIN1_BROKEN)).decode("utf-8", "replace")
    assert f'<td class="path">{broken}</td>' in html["status"]
    label_pages = [get(app_client, f"/labels?label={label}&page={n}") for n in (1, 2)]
    assert all(r.status_code == 200 for r in label_pages)
    assert any(row.id in tile_ids(r.get_data(as_text=True)) for r in label_pages)

    original = get(app_client, f"/image/{row.id}")
    assert original.status_code == 200 and original.mimetype == "image/jpeg"
    with open(os.fsencode(path), "rb") as f:
        assert original.data == f.read()
    disposition = original.headers["Content-Disposition"]
    disposition.encode("ascii")  # a header is bytes on the wire: nothing a server cannot send
    assert disposition == "inline; filename=caf.jpg; filename*=UTF-8''caf%EF%BF%BD.jpg"  # RFC 6266
    for picture in ("thumb", "preview"):
        response = get(app_client, f"/{picture}/{row.id}")
        assert response.status_code == 200 and response.mimetype == "image/jpeg", picture


def test_camera_and_date_from_exif_on_tiles_and_photo_page(site, app_client):
    with Library.open(site.db) as lib:
        row = next(r for r in lib.images() if r.path.name == "camera.jpg")
    assert row.camera_model == CAMERA[1]  # the indexer read it (clipsearch.metadata)
    page = get(app_client, f"/photo/{row.id}").get_data(as_text=True)
    assert "<dt>Camera</dt><dd>Canon EOS R5</dd>" in page and "2023-07-14T18:30:00" in page
    html = get(app_client, "/?q=red&page=1").get_data(as_text=True)
    pages = [html] + [get(app_client, f"/?q=red&page={n}").get_data(as_text=True) for n in (2,)]
    tile = next(t for t in "".join(pages).split('<figure class="tile">') if f'href="/photo/{row.id}"' in t)
    assert "&#10;Canon EOS R5" in tile and '<span class="camera">Canon EOS R5</span>' in tile
    assert '<span class="date">2023-07-14</span>' in tile


def test_duplicates_page_groups_the_copy(site, app_client):
    # the random test model finds every photo alike at the default 0.95: ask for near-identity
    html = get(app_client, "/duplicates?threshold=0.9999").get_data(as_text=True)
    with Library.open(site.db) as lib:
        ids = {r.path.name: r.id for r in lib.images()}
    groups = html.split('<section class="dupgroup">')[1:]
    group = next(g for g in groups if f'href="/photo/{ids["p000 copy.jpg"]}"' in g)
    assert "Identical files" in group and set(tile_ids(group)) == {ids["p000.jpg"], ids["p000 copy.jpg"]}
    assert 'name="threshold" min="-1" max="1" step="any" value="0.9999"' in html  # the form keeps it
    assert get(app_client, "/duplicates").status_code == 200  # the default threshold
    assert get(app_client, "/duplicates?threshold=x").status_code == 400


def test_labels_pages(site, app_client):
    with Library.open(site.db) as lib:
        rows = [r for r in lib.labels() if r.rank == 1]
    counts = {}
    for r in rows:
        counts[r.label] = counts.get(r.label, 0) + 1
    html = get(app_client, "/labels").get_data(as_text=True)
    for label, n in counts.items():
        assert f'<a href="/labels?label={label}">{label}</a> <span class="count">{n}</span>' in html
    label, n = max(counts.items(), key=lambda kv: kv[1])
    page = get(app_client, f"/labels?label={label}").get_data(as_text=True)
    best = sorted((r for r in rows if r.label == label), key=lambda r: (-r.score, r.image_id))
    assert tile_ids(page) == [r.image_id for r in best][:PAGE_SIZE]


def test_home_page_counts_the_photos(site, app_client):
    with Library.open(site.db) as lib:
        n = lib.stats().images
    assert f"Search {n:,} photos" in get(app_client, "/").get_data(as_text=True)


def test_status_page(site, app_client):
    html = get(app_client, "/status").get_data(as_text=True)
    with Library.open(site.db) as lib:
        stats = lib.stats()
    assert f'<dd id="photo-count">{stats.images}</dd>' in html
    model = stats.models[0]  # named by its folder, as the CLI names it; never by the internal id
    assert f'<td class="path">{model.name} (default)</td>' in html and model.name != model.id
    assert model.id not in html


def test_pictures_by_id_with_caching_headers(site, app_client):
    with Library.open(site.db) as lib:
        row = next(r for r in lib.images() if r.path.name == "rotated.jpg")
    thumb = get(app_client, f"/thumb/{row.id}")
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"
    assert "max-age=604800" in thumb.headers["Cache-Control"] and "private" in thumb.headers["Cache-Control"]
    assert Image.open(io.BytesIO(thumb.data)).size == (72, 96)  # stored 96x72 with orientation 6: upright
    again = get(app_client, f"/thumb/{row.id}", headers={"If-None-Match": thumb.headers["ETag"]})
    assert again.status_code == 304
    original = get(app_client, f"/image/{row.id}")
    assert original.data == row.path.read_bytes() and original.mimetype == "image/jpeg"
    ranged = get(app_client, f"/image/{row.id}", headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.data == row.path.read_bytes()[:10]
    assert get(app_client, "/photo/999999").status_code == 404


def test_ids_beyond_sqlite_integers_are_not_found(app_client):
    """An id SQLite cannot hold is no photo: 404 on every route that takes one (not an overflow)."""
    for route in ("photo", "similar", "thumb", "preview", "image"):
        for image_id in (2**63 - 1, 2**63, 2**64, 99999999999999999999999):
            assert get(app_client, f"/{route}/{image_id}").status_code == 404, (route, image_id)


def test_security_headers_and_refusals(site, app_client):
    page = get(app_client, "/")
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'; script-src 'self'")
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["X-Content-Type-Options"] == "nosniff"
    assert "<script>" not in page.get_data(as_text=True)  # no inline script: the CSP allows none
    foreign = app_client.get("/", base_url=f"http://evil.example:{PORT}")
    assert foreign.status_code == 421 and b"foreign Host" in foreign.data
    for url in ("/image/../../etc/passwd", "/thumb/..%2F..%2Fetc%2Fpasswd", "/image/-1", "/image/1.jpg"):
        assert get(app_client, url).status_code == 404, url
    assert get(app_client, "/upload").status_code == 405  # no state change on GET


def test_upload_needs_csrf_is_bounded_and_never_lands_beside_the_photos(site, app_client):
    photo = next((site.photos / "more").glob("*.jpg"))
    data = photo.read_bytes()
    before = sorted(p.name for p in site.photos.rglob("*"))
    no_token = app_client.post(
        "/upload", base_url=f"http://localhost:{PORT}", data={"image": (io.BytesIO(data), "q.jpg")}
    )
    assert no_token.status_code == 403
    token = csrf(app_client)
    cross = app_client.post(
        "/upload",
        base_url=f"http://localhost:{PORT}",
        data={"image": (io.BytesIO(data), "q.jpg"), "csrf": token},
        headers={"Origin": "http://evil.example"},
    )
    assert cross.status_code == 403
    ok = app_client.post(
        "/upload",
        base_url=f"http://localhost:{PORT}",
        data={"image": (io.BytesIO(data), "q.jpg"), "csrf": token},
    )
    assert ok.status_code == 303
    results = get(app_client, ok.headers["Location"]).get_data(as_text=True)
    with Library.open(site.db) as lib:
        same = next(r.id for r in lib.images() if r.path == photo)
    assert tile_ids(results)[0] == same  # the picture itself is the best match
    big = app_client.post(
        "/upload",
        base_url=f"http://localhost:{PORT}",
        data={"image": (io.BytesIO(b"\0" * (MAX_UPLOAD_BYTES + 1)), "big.jpg"), "csrf": token},
    )
    assert big.status_code == 413
    broken = app_client.post(
        "/upload",
        base_url=f"http://localhost:{PORT}",
        data={"image": (io.BytesIO(b"not a picture"), "x.jpg"), "csrf": token},
    )
    text = unescape(broken.get_data(as_text=True))
    assert broken.status_code == 400 and "Cannot read the uploaded picture (not an image)" in text
    assert "upload-" not in text  # the temporary file's name is ours, not the user's business
    assert sorted(p.name for p in site.photos.rglob("*")) == before
    assert list((site.home / "uploads").iterdir()) == []  # decoded, then deleted
    forgotten = get(app_client, "/?image=0123456789abcdef").get_data(as_text=True)
    assert "no longer remembered" in forgotten


# --- the real server process -----------------------------------------------------------------------


def raw_get(url: str, path: str, host: str | None = None) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("GET", path, skip_host=True)  # the path exactly as given: no normalising
    conn.putheader("Host", host or parts.netloc)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_real_server_refuses_traversal_and_foreign_hosts_and_sees_a_new_index(site):
    server = ServerProcess(site)
    try:
        assert server.url.startswith("http://localhost:")
        status, body = raw_get(server.url, "/?q=blue")
        assert status == 200 and b'class="tile"' in body
        for path in (
            "/image/../../../../etc/passwd",
            "/static/../../../../etc/passwd",
            "/static/..%2f..%2f..%2fcli.py",
            "/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        ):
            status, body = raw_get(server.url, path)
            assert status in (400, 404) and b"root:" not in body and b"import" not in body, path
        port = urlsplit(server.url).port
        status, body = raw_get(server.url, "/", host=f"attacker.example:{port}")
        assert status == 421
        # an index run adds photos while the server runs: the next request sees them
        with Library.open(site.db) as lib:
            before = lib.stats().images
        from e2e_helpers import write_photo

        for i in range(12):
            write_photo(site.photos / "later" / f"new{i}.png", 4242 + i)
        indexing = subprocess.Popen(
            [sys.executable, "-m", "clipsearch", "--db", str(site.db), "index", str(site.photos)]
            + ["--backend", "torch-fp32"],
            env={**os.environ, **site.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        answers = []
        while indexing.poll() is None:  # searches and pages keep answering while it writes
            answers.append(raw_get(server.url, f"/?q=blue+{len(answers)}")[0])
            answers.append(raw_get(server.url, "/status")[0])
        out, err = indexing.communicate()
        assert indexing.returncode == 0, err
        assert answers and set(answers) == {200}, answers
        status, body = raw_get(server.url, "/status")
        assert f'<dd id="photo-count">{before + 12}</dd>'.encode() in body
        status, body = raw_get(server.url, f"/?q=blue&in={site.photos}/later")
        assert status == 200 and len(tile_ids(body.decode())) == 12
    finally:
        err = server.stop()
    assert "Traceback" not in err


def test_cli_web_errors_are_one_line(site, tmp_path):
    from e2e_helpers import run_cli

    missing = run_cli("--db", str(tmp_path / "none.db"), "web", "--port", "0", env=site.env)
    assert missing.returncode == 1 and "no library at" in missing.stderr and "Traceback" not in missing.stderr
    remote = run_cli("--db", str(site.db), "web", "--host", "0.0.0.0", "--port", "0", env=site.env)
    assert remote.returncode == 1 and "--allow-remote" in remote.stderr


def test_cli_web_says_why_it_cannot_listen_on_a_host(site):
    """A name that does not resolve, and an address that is not this machine's: one line, exit 1, and
    advice about --host (the port is not the problem)."""
    from e2e_helpers import run_cli

    for host, why in (
        ("no-such-host.invalid", "not a name this machine can resolve"),  # .invalid never resolves
        ("192.0.2.1", "not an address of this machine"),  # TEST-NET-1: documentation only
    ):
        result = run_cli(
            "--db", str(site.db), "web", "--host", host, "--allow-remote", "--port", "0", env=site.env
        )
        assert result.returncode == 1, (host, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"cannot listen on {host}" in lines[0] and why in lines[0], lines
        assert "--port" not in lines[0] and "internal error" not in lines[0] and "--host" in lines[0]


def test_remote_bind_warns_and_requires_the_token(site):
    server = ServerProcess(site, "--host", "0.0.0.0", "--allow-remote")
    try:
        token = re.search(r"token=([\w-]+)", server.url).group(1)
        base = server.url.split("?")[0].replace("0.0.0.0", "127.0.0.1")
        status, body = raw_get(base, "/")
        assert status == 401
        conn_url = urlsplit(base)
        conn = http.client.HTTPConnection(conn_url.hostname, conn_url.port, timeout=30)
        conn.request("GET", f"/?token={token}")
        r = conn.getresponse()
        r.read()
        assert r.status == 303 and "HttpOnly" in r.getheader("Set-Cookie")
        cookie = r.getheader("Set-Cookie").split(";")[0]
        conn.request("GET", "/status", headers={"Cookie": cookie})
        r = conn.getresponse()
        assert r.status == 200 and b"photo-count" in r.read()
        conn.close()
    finally:
        err = server.stop()
    assert "Warning" in err and "token" in err
