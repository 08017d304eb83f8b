"""The Flask application of ``clipsearch web``: pages over a :class:`~clipsearch.web.live.LiveLibrary`.

Routes (every photo addressed by its library id, never by a path from the request):

- ``GET /?q=TEXT&in=FOLDER&page=N``: search (``image=KEY`` for an uploaded picture); ``partial=1``
  returns only the next tiles, for the infinite scroll.
- ``GET /photo/ID``: the large view with metadata; ``GET /similar/ID``: more like this.
- ``POST /upload``: search by an uploaded or dropped picture (CSRF token; size-limited).
- ``GET /labels``, ``GET /labels?label=L``: browse the zero-shot labels; ``GET /status``.
- ``GET /duplicates?threshold=T``: groups of copies to review side by side (nothing is deleted).
- ``GET /thumb/ID``, ``GET /preview/ID``: cached JPEGs; ``GET /image/ID``: the original, streamed.

A file name that is not UTF-8 is shown as everywhere else (:func:`clipsearch.names.printable`: U+FFFD
for each byte that does not decode): every ``{{ value }}`` of a template passes through it before
autoescaping, so no page can hold a character that UTF-8 cannot encode.

Every response carries the headers of :mod:`clipsearch.web.security`; requests with a foreign
``Host`` are refused before routing.
"""

from __future__ import annotations

import logging
import mimetypes
from pathlib import Path, PurePath
from urllib.parse import urlencode

from flask import Flask, Response, abort, g, redirect, render_template, request, send_file, url_for
from werkzeug.routing import IntegerConverter

from clipsearch.errors import ClipsearchError, ImageDecodeError
from clipsearch.names import printable
from clipsearch.web import security
from clipsearch.web.live import LiveLibrary
from clipsearch.web.thumbs import SIZES, ThumbnailCache

log = logging.getLogger(__name__)

PAGE_SIZE = 60  # tiles per page: a few screens; the next page loads as the user scrolls
GROUPS_PER_PAGE = 20  # duplicate groups per page, each a row of its copies
MAX_PAGE = 1000  # deeper than anyone scrolls; bounds the top-k asked of the index
MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # a 50 MP JPEG; anything larger is refused with 413
BROWSER_IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp"}
THUMB_MAX_AGE_S = 7 * 24 * 3600  # an id's content never changes (a changed file gets a new id)
MAX_PHOTO_ID = 2**63 - 1  # SQLite's largest INTEGER: a larger id is no photo (404), not an overflow


def create_app(
    live: LiveLibrary,
    thumbs: ThumbnailCache,
    *,
    host: str,
    port: int,
    uploads_dir: Path,
    access_token: str | None = None,
) -> Flask:
    """The app serving ``live`` as ``http://host:port``; ``access_token`` required when set."""
    app = Flask(__name__)
    app.jinja_options = {**Flask.jinja_options, "finalize": _readable}  # before jinja_env is made
    app.url_map.converters["id"] = _PhotoId
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_UPLOAD_BYTES,
        SEND_FILE_MAX_AGE_DEFAULT=3600,
        TEMPLATES_AUTO_RELOAD=False,
    )
    hosts = security.HostPolicy(host, port)
    csrf_token = security.new_token()

    @app.before_request
    def guard():
        if not hosts.allows(request.headers.get("Host")):
            log.info("refused a request for Host %r", request.headers.get("Host"))
            return _plain("This server answers only its own address (foreign Host refused).", 421)
        if access_token is not None:
            given = request.args.get("token")
            if given is not None and security.same_token(given, access_token):
                args = {k: v for k, v in request.args.items(multi=True) if k != "token"}
                target = request.path + ("?" + urlencode(args) if args else "")
                response = redirect(target, 303)
                response.set_cookie(
                    security.TOKEN_COOKIE, access_token, httponly=True, samesite="Strict", path="/"
                )
                return response
            if not security.same_token(request.cookies.get(security.TOKEN_COOKIE), access_token):
                return _plain("Open the address with ?token=... that `clipsearch web` printed.", 401)
        if request.method not in ("GET", "HEAD"):
            if not hosts.allows_origin(request.headers.get("Origin")):
                return _plain("Cross-site request refused.", 403)
            given = request.headers.get(security.CSRF_HEADER) or request.form.get(security.CSRF_FIELD)
            if not security.same_token(given, csrf_token):
                return _plain("Missing or wrong CSRF token: reload the page and try again.", 403)
        g.csrf_token = csrf_token
        return None

    @app.after_request
    def headers(response: Response):
        for name, value in security.SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.errorhandler(ClipsearchError)
    def library_error(e: ClipsearchError):
        return render_template("error.html", message=str(e)), 400

    @app.errorhandler(404)
    def not_found(e):
        return render_template("error.html", message="Not found: no such page or photo."), 404

    @app.errorhandler(413)
    def too_large(e):
        limit = MAX_UPLOAD_BYTES // (1024 * 1024)
        return render_template("error.html", message=f"That file is too large (limit {limit} MB)."), 413

    # --- searching ------------------------------------------------------------------------------

    @app.get("/")
    def search_page():
        text = request.args.get("q", "").strip()
        upload = request.args.get("image", "").strip()
        filters, filter_args = _filters()
        page_no = _page_number()
        offset = (page_no - 1) * PAGE_SIZE
        page = None
        notice = None
        if upload:
            page = live.search_upload(upload, offset=offset, limit=PAGE_SIZE, filters=filters)
            if page is None:
                notice = "That uploaded picture is no longer remembered: drop it again."
        elif text:
            page = live.search_text(text, offset=offset, limit=PAGE_SIZE, filters=filters)
        params = {k: v for k, v in (("q", text), ("image", upload)) if v} | filter_args
        count = live.photo_count() if page is None else None
        return _results(
            "search.html",
            page,
            params,
            q=text,
            filter_args=filter_args,
            filters_text=filters.describe() if filters is not None else "",
            notice=notice,
            count=count,
        )

    @app.post("/upload")
    def upload():
        file = request.files.get("image")
        if file is None:
            abort(400)
        data = file.read(MAX_UPLOAD_BYTES + 1)
        if not data:
            return render_template("error.html", message="The uploaded file is empty."), 400
        try:
            key = live.remember_upload(data, uploads_dir)
        except ImageDecodeError as e:
            message = (
                f"Cannot read the uploaded picture ({e.reason}): choose a JPEG, PNG, WebP, HEIC... photo."
            )
            return render_template("error.html", message=message), 400
        return redirect(url_for("search_page", image=key), 303)

    @app.get("/similar/<id:image_id>")
    def similar(image_id: int):
        photo = _photo_or_404(image_id)
        page_no = _page_number()
        page = live.similar(image_id, offset=(page_no - 1) * PAGE_SIZE, limit=PAGE_SIZE)
        return _results("similar.html", page, {}, photo=photo)

    # --- labels, status, one photo --------------------------------------------------------------

    @app.get("/labels")
    def labels():
        label = request.args.get("label", "")
        if not label:
            return render_template("labels.html", sets=live.label_sets(), label=None, page=None)
        page_no = _page_number()
        page = live.labelled(label, offset=(page_no - 1) * PAGE_SIZE, limit=PAGE_SIZE)
        return _results("labels.html", page, {"label": label}, label=label, sets=None)

    @app.get("/duplicates")
    def duplicates():
        from clipsearch.duplicates import DEFAULT_THRESHOLD

        try:
            threshold = float(request.args.get("threshold", DEFAULT_THRESHOLD))
        except ValueError:
            abort(400)
        groups = live.duplicates(threshold)
        page_no = _page_number()
        start = (page_no - 1) * GROUPS_PER_PAGE
        shown = groups[start : start + GROUPS_PER_PAGE]
        more = len(groups) > start + GROUPS_PER_PAGE
        params = {"threshold": request.args["threshold"]} if "threshold" in request.args else {}
        next_url = url_for("duplicates", **params, page=page_no + 1) if more else None
        prev_url = url_for("duplicates", **params, page=page_no - 1) if page_no > 1 else None
        return render_template(
            "duplicates.html",
            groups=shown,
            total=len(groups),
            first=start + 1,
            threshold=threshold,
            next_url=next_url,
            prev_url=prev_url,
        )

    @app.get("/status")
    def status():
        return render_template("status.html", status=live.status())

    @app.get("/photo/<id:image_id>")
    def photo(image_id: int):
        p = _photo_or_404(image_id)
        shown = "original" if _mimetype(p.path) in BROWSER_IMAGE_TYPES else "preview"
        return render_template("photo.html", photo=p, labels=live.labels_of(image_id), shown=shown)

    # --- pictures -------------------------------------------------------------------------------

    @app.get("/thumb/<id:image_id>")
    def thumb(image_id: int):
        return _cached(image_id, SIZES["thumb"])

    @app.get("/preview/<id:image_id>")
    def preview(image_id: int):
        return _cached(image_id, SIZES["preview"])

    @app.get("/image/<id:image_id>")
    def original(image_id: int):
        p = _photo_or_404(image_id)
        mimetype = _mimetype(p.path)
        if mimetype not in BROWSER_IMAGE_TYPES:
            mimetype = "application/octet-stream"  # HEIC, TIFF...: downloaded, never interpreted
        try:
            return send_file(
                p.path,
                mimetype=mimetype,
                as_attachment=mimetype == "application/octet-stream",
                download_name=_header_safe(printable(p.name)),  # werkzeug adds filename*= (RFC 6266)
                etag=p.content_hash,
                conditional=True,  # Range requests and 304s; the file is streamed, not read whole
                max_age=0,
            )
        except FileNotFoundError:
            abort(404)

    def _cached(image_id: int, size: int):
        p = _photo_or_404(image_id)
        path = thumbs.get(p.path, p.content_hash, size)
        if path is None:  # unreadable now (moved, deleted, damaged): a neutral tile
            response = app.send_static_file("unavailable.svg")
            response.headers["Cache-Control"] = "no-store"
            return response
        response = send_file(
            path,
            mimetype="image/jpeg",
            etag=f"{p.content_hash}-{size}",
            conditional=True,
            max_age=THUMB_MAX_AGE_S,
            download_name=f"{image_id}-{size}.jpg",
        )
        response.cache_control.private = True
        return response

    # --- helpers --------------------------------------------------------------------------------

    def _photo_or_404(image_id: int):
        p = live.photo(image_id)
        if p is None:
            abort(404)
        return p

    def _results(template: str, page, params: dict, **context):
        """A results page, or with ``partial=1`` only its tiles (the infinite scroll's next page)."""
        next_url = None
        if page is not None and page.more and _page_number() < MAX_PAGE:
            next_url = request.path + "?" + urlencode({**params, "page": _page_number() + 1})
        if request.args.get("partial") == "1":
            return render_template("_tiles.html", page=page, next_url=next_url)
        return render_template(template, page=page, next_url=next_url, **context)

    return app


class _PhotoId(IntegerConverter):
    """``<id:image_id>``: a photo's id in a URL, a decimal that SQLite can hold; anything else is a 404."""

    def __init__(self, url_map):
        super().__init__(url_map, max=MAX_PHOTO_ID)


def _page_number() -> int:
    try:
        n = int(request.args.get("page", "1"))
    except ValueError:
        abort(400)
    return min(max(n, 1), MAX_PAGE)


FILTER_ARGS = (
    "after",
    "before",
    "camera",
    "near",
    "within",
    "type",
    "in",
)  # as `clipsearch query` names them


def _filters():
    """The filters in the URL -> (:class:`clipsearch.filters.PhotoFilter` or None, the given args)."""
    from clipsearch.filters import FilterError, PhotoFilter

    given = {k: request.args.get(k, "").strip() for k in FILTER_ARGS}
    given = {k: v for k, v in given.items() if v}
    if not given:
        return None, {}
    try:
        within = float(given["within"]) if "within" in given else None
    except ValueError:
        raise FilterError(f"within {given['within']!r}: give a distance in kilometres") from None
    filters = PhotoFilter.parse(
        after=given.get("after"),
        before=given.get("before"),
        camera=given.get("camera"),
        near=given.get("near"),
        within_km=within,
        types=given.get("type"),
        under=_folder(given.get("in", "")),
    )
    return filters, given


def _folder(text: str) -> Path | None:
    """The ``in`` filter: a folder whose photos the search keeps (matched literally in SQLite)."""
    text = text.strip()
    if not text:
        return None
    folder = Path(text).expanduser()
    if not folder.is_absolute():
        raise ClipsearchError(f"folder filter {text!r}: give an absolute folder path")
    return folder


def _mimetype(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _readable(value):
    """A template's ``{{ value }}`` as shown, before autoescaping: strings and paths through
    :func:`printable` (escaped markup stays markup: U+FFFD for a lone surrogate changes no tag)."""
    if isinstance(value, str):
        return value if value.isascii() else type(value)(printable(value))
    if isinstance(value, PurePath):
        return printable(str(value))
    return value


def _header_safe(name: str) -> str:
    """A file name for Content-Disposition: control characters (a newline in a name) replaced."""
    return "".join("_" if ord(c) < 32 or ord(c) == 127 else c for c in name) or "photo"


def _plain(text: str, status: int) -> Response:
    return Response(text + "\n", status=status, mimetype="text/plain")
