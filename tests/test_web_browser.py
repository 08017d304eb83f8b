"""`clipsearch web` in a real headless browser: the real server process, Debian's chromium driven
by playwright. Search, open a photo, "more like this", browse a label, search by a dropped picture,
a hostile file name shown as text, a name that is not UTF-8; screenshots are kept as artefacts in test-artifacts/web/ (git
ignores it; $CLIPSEARCH_TEST_ARTIFACTS moves it).

Needs chromium (`apt-get install chromium`) and the playwright package (no browser download: it
drives /usr/bin/chromium). Skipped when they are missing, failed when $CI is set."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from urllib.parse import urlencode

import pytest
from web_helpers import HOSTILE_NAME, LATIN1_NAME, ServerProcess, build_site

CHROMIUM = os.environ.get("CLIPSEARCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


def _need(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing, and CI must run the browser tests")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("the playwright package (pip install playwright)")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        _need(f"chromium ({CHROMIUM}; apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    site = build_site(tmp_path_factory.mktemp("browser_site"))
    server = ServerProcess(site)
    yield site, server
    err = server.stop()
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def shots():
    folder = (
        Path(os.environ.get("CLIPSEARCH_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
        / "web"
    )
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on(
        "console",
        lambda m: pg.errors.append(m.text) if m.type == "error" and "status of" not in m.text else None,
    )
    pg.on("response", lambda r: pg.errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    pg.on("dialog", lambda d: (pg.errors.append(f"dialog: {d.message}"), d.dismiss()))
    yield pg
    context.close()


def _loaded_thumbnails(pg) -> int:
    return pg.evaluate(
        "() => Array.from(document.querySelectorAll('.tile img')).filter(i => i.complete && i.naturalWidth > 0).length"
    )


def test_search_open_a_photo_more_like_this(served, page, shots):
    site, server = served
    page.goto(server.url)
    page.fill("input[name=q]", "a blue photo")
    page.press("input[name=q]", "Enter")
    page.wait_for_selector(".tile img")
    assert "q=a+blue+photo" in page.url  # the search is a link
    page.wait_for_function("() => document.querySelectorAll('.tile img').length >= 12")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.tile img')).slice(0, 12).every(i => i.complete)"
    )
    assert _loaded_thumbnails(page) >= 12
    first_tiles = page.locator(".tile").count()
    page.screenshot(path=str(shots / "search.png"))

    # infinite scroll: the second page arrives when the end of the grid comes into view
    page.locator("a[data-next]").scroll_into_view_if_needed()
    page.wait_for_function(f"() => document.querySelectorAll('.tile').length > {first_tiles}")
    assert page.locator(".tile").count() > first_tiles

    page.goto(server.url + "?q=a+blue+photo")
    name = page.locator(".tile .name").first.inner_text()
    page.locator(".tile a").first.click()
    page.wait_for_selector("article.photo")
    assert page.locator("h1.filename").inner_text() == name
    page.wait_for_function("() => document.querySelector('.large img').naturalWidth > 0")
    page.screenshot(path=str(shots / "photo.png"))

    page.click("#more-like-this")
    page.wait_for_selector(".tile img")
    assert "/similar/" in page.url and name in page.locator("h1").inner_text()
    assert page.locator(".grid .tile").count() > 5
    page.screenshot(path=str(shots / "more-like-this.png"))
    assert page.errors == []


def test_browse_a_label(served, page, shots):
    site, server = served
    page.goto(server.url)
    page.click("nav >> text=Labels")
    page.wait_for_selector(".chips a")
    page.screenshot(path=str(shots / "labels.png"))
    chip = page.locator(".chips li").first
    label = chip.locator("a").inner_text()
    count = int(chip.locator(".count").inner_text())
    chip.locator("a").click()
    page.wait_for_selector("h1")
    assert label in page.locator("h1").inner_text()
    assert page.locator(".tile").count() == min(count, 60)
    page.screenshot(path=str(shots / "label.png"))
    assert page.errors == []


def test_hostile_file_name_is_shown_as_text(served, page, shots):
    site, server = served
    page.goto(server.url + "?q=red&page=1")
    # find the hostile photo's tile by its visible name: as text, not as markup
    pages = 0
    while page.locator(".tile .name", has_text=HOSTILE_NAME).count() == 0:
        page.locator("a[data-next]").scroll_into_view_if_needed()
        pages += 1
        page.wait_for_function(f"() => document.querySelectorAll('.tile').length > {60 * pages}")
    tile = page.locator(".tile .name", has_text=HOSTILE_NAME).first
    assert tile.inner_text() == HOSTILE_NAME
    assert page.locator("img[src=x]").count() == 0  # never became an element
    page.goto(server.url.rstrip("/") + tile.locator("xpath=../..").locator("a").first.get_attribute("href"))
    assert page.locator("h1.filename").inner_text() == HOSTILE_NAME
    page.screenshot(path=str(shots / "hostile-name.png"))
    assert page.errors == []  # no alert(1) dialog, no script error


def test_a_name_that_is_not_utf8_is_shown_and_served(served, page, shots):
    site, server = served
    readable = LATIN1_NAME.decode("utf-8", "replace")  # the byte that is not UTF-8 as U+FFFD
    page.goto(server.url + "?" + urlencode({"q": "a photo", "in": str(site.photos / "latin1")}))
    assert page.locator(".tile .name").count() == 1
    assert page.locator(".tile .name").inner_text() == readable
    page.locator(".tile a").click()
    page.wait_for_selector("article.photo")
    assert page.locator("h1.filename").inner_text() == readable
    page.wait_for_function("() => document.querySelector('.large img').naturalWidth > 0")  # /image/ID
    page.screenshot(path=str(shots / "latin1-name.png"))
    assert page.errors == []


def test_drop_a_picture_to_search(served, page, shots):
    site, server = served
    picture = next((site.photos / "more").glob("*.jpg"))
    page.goto(server.url)
    page.set_input_files("form.upload input[type=file]", str(picture))  # the script submits on change
    page.wait_for_selector(".tile img", timeout=180_000)  # the first picture query loads the model
    assert "image=" in page.url and "Photos like your picture" in page.locator("h1").inner_text()
    assert page.locator(".tile .name").first.inner_text() == picture.name
    page.screenshot(path=str(shots / "by-picture.png"))

    # the same by dragging a file onto the page: a real drop event carrying a File
    other = sorted((site.photos / "more").glob("*.jpg"))[7]
    page.goto(server.url)
    drop = page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/jpeg" }));
            return dt;
        }""",
        [base64.b64encode(other.read_bytes()).decode(), other.name],
    )
    page.dispatch_event("main", "dragenter", {"dataTransfer": drop})
    assert page.locator("#drop-overlay").is_visible()
    page.dispatch_event("main", "drop", {"dataTransfer": drop})
    page.wait_for_selector(".tile img", timeout=180_000)
    assert page.locator(".tile .name").first.inner_text() == other.name
    assert page.errors == []


def test_status_page(served, page, shots):
    site, server = served
    page.goto(server.url + "status")
    assert int(page.locator("#photo-count").inner_text()) > 60
    page.screenshot(path=str(shots / "status.png"), full_page=True)
    assert page.errors == []


def test_duplicates_review(served, page, shots):
    site, server = served
    page.goto(server.url)
    page.click("nav >> text=Duplicates")
    page.fill("input[name=threshold]", "0.9999")
    page.click("form.threshold button")
    page.wait_for_selector(".dupgroup")
    group = page.locator(".dupgroup", has_text="p000 copy.jpg")
    assert "Identical files" in group.locator("h2").inner_text()
    assert group.locator(".copy").count() == 2
    page.wait_for_function("() => Array.from(document.querySelectorAll('.copy img')).every(i => i.complete)")
    page.screenshot(path=str(shots / "duplicates.png"))
    assert page.errors == []


def test_filters_from_the_form(served, page, shots):
    site, server = served
    page.goto(server.url + "?q=a+red+photo")
    page.click("details.filters summary")
    page.fill("details.filters input[name=camera]", "canon")
    page.fill("details.filters input[name=after]", "2023-01-01")
    page.click("details.filters button")
    page.wait_for_selector(".tile img")
    assert "camera=canon" in page.url and "after=2023-01-01" in page.url
    assert page.locator(".tile").count() == 1
    page.locator(".tile").hover()
    assert page.locator(".tile .camera").inner_text() == "Canon EOS R5"  # shown on hover
    page.screenshot(path=str(shots / "filtered.png"))
    assert page.errors == []
