"""A self-contained HTML page of search results: thumbnails inlined as JPEG data URIs, scores, paths.

Every file name and query string goes through ``html.escape``, so a photo named
``<script>alert(1)</script>.jpg`` shows as text. An image that cannot be read gets a placeholder
tile instead of stopping the page.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from clipsearch.atomic import write_text
from clipsearch.names import printable

THUMB_SIZE = 256  # px, longest side: sharp on a 4-column grid, ~10-20 kB per photo as JPEG
THUMB_QUALITY = 80

_CSS = """
:root { color-scheme: light dark; --bg: #f6f6f4; --card: #fff; --ink: #222; --muted: #6b6b6b; }
@media (prefers-color-scheme: dark) { :root { --bg: #17181a; --card: #232427; --ink: #eee; --muted: #9a9a9a; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px; font: 14px/1.4 system-ui, sans-serif; background: var(--bg); color: var(--ink); }
header h1 { font-size: 20px; margin: 0 0 4px; }
header p { margin: 0 0 20px; color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 16px; }
figure { margin: 0; background: var(--card); border-radius: 8px; overflow: hidden;
         box-shadow: 0 1px 3px rgba(0,0,0,.12); }
figure a { display: block; aspect-ratio: 1; background: #0001; }
figure img { width: 100%; height: 100%; object-fit: contain; display: block; }
.missing { display: flex; align-items: center; justify-content: center; height: 100%;
           color: var(--muted); font-size: 13px; }
figcaption { padding: 8px 10px; }
.score { font-weight: 600; font-variant-numeric: tabular-nums; }
.rank { color: var(--muted); margin-right: 6px; }
.path { color: var(--muted); font-size: 12px; word-break: break-all; }
"""


def thumbnail_data_uri(path: Path, size: int = THUMB_SIZE) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail of ``path``, or None when it cannot be read."""
    from clipsearch.errors import ImageDecodeError
    from clipsearch.imageio import open_image

    try:
        img = open_image(path, draft_size=size)  # JPEGs decode at 1/2..1/8 scale
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=THUMB_QUALITY, optimize=True)
    except (ImageDecodeError, OSError, ValueError):
        return None  # the page shows a placeholder tile for it
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _escape(text: str, quote: bool = True) -> str:
    """HTML-escaped ``text``; a name that is not UTF-8 (lone surrogates) shows U+FFFD instead of failing."""
    return html.escape(printable(text), quote)


def _page(title: str, css: str, header: str, main: str) -> str:
    """A self-contained page: ``header`` and ``main`` are HTML already escaped."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # Nothing on the page needs the network or scripts: forbid both.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{_escape(title)}</title><style>{css}</style></head>\n<body>"
        f"<header><h1>{_escape(title)}</h1><p>{header}</p></header>\n{main}</body></html>\n"
    )


def render_html(hits: Sequence, title: str, query_desc: str) -> str:
    """The page as a string. ``hits`` have ``path``, ``score`` (and optionally ``label``)."""

    e = _escape
    tiles = []
    for rank, hit in enumerate(hits, start=1):
        path = Path(hit.path)
        uri = thumbnail_data_uri(path)
        href = e(path.as_uri()) if path.is_absolute() else e(str(path))
        if uri is None:
            picture = '<div class="missing">cannot show this image</div>'
        else:
            picture = f'<img src="{uri}" alt="{e(path.name)}" loading="lazy">'
        tiles.append(
            f'<figure><a href="{href}">{picture}</a><figcaption>'
            f'<span class="rank">#{rank}</span><span class="score">{hit.score:.4f}</span>'
            f'<div class="path" title="{e(str(path))}">{e(str(path))}</div></figcaption></figure>'
        )
    count = f"{len(hits)} result{'s' if len(hits) != 1 else ''}"
    body = "\n".join(tiles) if tiles else "<p>No results.</p>"
    return _page(title, _CSS, f"{e(query_desc)} &middot; {count}", f'<main class="grid">\n{body}\n</main>')


def write_html(hits: Sequence, out_path: str | Path, title: str, query_desc: str) -> Path:
    """Write the results page to ``out_path`` atomically (into it when it is a stream such as
    ``/dev/stdout``); returns the path written. A missing folder is refused
    (:class:`clipsearch.atomic.MissingFolderError`), not made."""
    out = Path(out_path).expanduser()
    page = render_html(hits, title, query_desc)
    write_text(out, page, make_folder=False)
    return out


_DUPLICATES_CSS = """
section { margin: 0 0 28px; }
section h2 { font-size: 15px; margin: 0 0 10px; font-weight: 600; }
section h2 .muted { color: var(--muted); font-weight: 400; }
.row { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 16px; }
.best { outline: 3px solid #2e8b57; }
.tag { display: inline-block; font-size: 11px; padding: 1px 6px; border-radius: 4px; background: #2e8b57;
       color: #fff; margin-right: 6px; }
.facts { color: var(--muted); font-size: 12px; }
"""


def render_duplicates_html(groups: Sequence, title: str = "clipsearch: duplicates") -> str:
    """A review page: each group of copies side by side, the best copy first and outlined, with its
    size, format and bytes. ``groups`` are :class:`clipsearch.duplicates.DuplicateGroup`. The page
    only shows: nothing on it deletes or moves a file."""

    e = _escape
    sections = []
    for n, group in enumerate(groups, start=1):
        tiles = []
        for k, photo in enumerate(group.photos):
            path = Path(photo.path)
            uri = thumbnail_data_uri(path)
            picture = (
                '<div class="missing">cannot show this image</div>'
                if uri is None
                else f'<img src="{uri}" alt="{e(path.name)}" loading="lazy">'
            )
            size = f"{photo.width}x{photo.height}" if photo.width and photo.height else "size unknown"
            facts = (
                f"{size} &middot; {e(photo.file_type or 'unknown type')} &middot; {photo.size / 1024:,.0f} kB"
            )
            tag = '<span class="tag">best</span>' if k == 0 else ""
            tiles.append(
                f'<figure class="{"best" if k == 0 else ""}"><a href="{e(path.as_uri())}">{picture}</a>'
                f'<figcaption>{tag}<span class="facts">{facts}</span>'
                f'<div class="path" title="{e(str(path))}">{e(str(path))}</div></figcaption></figure>'
            )
        kind = "identical files" if group.identical else f"similarity {group.similarity:.4f}"
        sections.append(
            f'<section><h2>Group {n} <span class="muted">&middot; {len(group.photos)} copies &middot; '
            f'{kind}</span></h2><div class="row">{"".join(tiles)}</div></section>'
        )
    copies = sum(len(g.photos) - 1 for g in groups)
    summary = f"{len(groups)} group{'s' if len(groups) != 1 else ''}, {copies} extra cop{'ies' if copies != 1 else 'y'}"
    body = "\n".join(sections) if sections else "<p>No duplicates found.</p>"
    header = f"{summary} &middot; the best copy of each group comes first; clipsearch never deletes or moves a file"
    return _page(title, _CSS + _DUPLICATES_CSS, header, f"<main>\n{body}\n</main>")


def write_duplicates_html(groups: Sequence, out_path: str | Path) -> Path:
    """Write the duplicates review page to ``out_path`` like :func:`write_html`; returns the path."""
    out = Path(out_path).expanduser()
    write_text(out, render_duplicates_html(groups), make_folder=False)
    return out
