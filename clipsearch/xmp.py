"""Labels as keywords in XMP sidecars, where photo managers read them, losing nothing of what is there.

Convention: the sidecar of ``photo.jpg`` is ``photo.jpg.xmp`` (darktable's and digiKam's default;
unlike ``photo.xmp`` it cannot clash between ``photo.jpg`` and ``photo.raw`` in one folder). Where
Lightroom, Capture One or ACDSee already keep ``photo.xmp`` for a photo (and no ``photo.jpg.xmp``
exists), that file is edited instead: see :func:`sidecar_path`.
Keywords go into ``dc:subject`` (every XMP reader: digiKam, darktable, Lightroom, Immich, exiftool's
``Subject``) and into ``lr:hierarchicalSubject`` (where darktable, digiKam and Lightroom keep their
tag trees, exiftool's ``HierarchicalSubject``), as top-level tags.

A sidecar that exists is *edited in place*, never re-serialised: the file is parsed with expat to
find the byte ranges of the elements, and only the list items clipsearch adds or removes change.
Everything else stays byte for byte: the ``<?xpacket?>`` wrapper, comments, element order, other
namespaces and their prefixes, ``rdf:Seq`` vs ``rdf:Bag``, ``xml:lang``, indentation. A list that
does not exist yet is added to the ``rdf:Description`` that holds the other keywords (or the first),
declaring its namespace there when no prefix for it is in scope. The keywords clipsearch added are
recorded in its own bags (``clipsearch:keywords`` for ``dc:subject``, ``clipsearch:hierarchicalKeywords``
for ``lr:hierarchicalSubject``), so a relabel removes the stale ones it wrote and never one a person
or another program put there. A file whose content would not change is not rewritten. The new file
replaces the old through :mod:`clipsearch.atomic` (its mode kept, a symlinked sidecar written through).

A sidecar that is not well-formed XML, not UTF-8, has no ``rdf:Description``, or holds a keyword
property that is not a list, is left untouched and reported (:class:`XmpError`); so is one that is
not a regular file (a FIFO, a device, a folder), found without ever blocking on it.
"""

from __future__ import annotations

import errno
import os
import xml.parsers.expat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from clipsearch.atomic import write_bytes
from clipsearch.errors import ClipsearchError

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
LR = "http://ns.adobe.com/lightroom/1.0/"
CLIPSEARCH = "urn:clipsearch:xmp:1.0"
X = "adobe:ns:meta/"
PREFERRED_PREFIX = {DC: "dc", LR: "lr", CLIPSEARCH: "clipsearch", RDF: "rdf"}
# (the property people's programs read, the record of what clipsearch added to it)
FIELDS = (
    ((DC, "subject"), (CLIPSEARCH, "keywords")),
    ((LR, "hierarchicalSubject"), (CLIPSEARCH, "hierarchicalKeywords")),
)
_LISTS = ("Bag", "Seq", "Alt")
MAX_SIDECAR_BYTES = 4 << 20  # real sidecars are a few kB; refuse to parse anything huge
DEFAULT_MIN_PROBABILITY = 0.5  # label --write-xmp writes a label only this sure (--threshold overrides)

_NEW_SIDECAR = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    f'<x:xmpmeta xmlns:x="{X}" x:xmptk="clipsearch">\n'
    f' <rdf:RDF xmlns:rdf="{RDF}">\n'
    '  <rdf:Description rdf:about="">\n'
    "  </rdf:Description>\n"
    " </rdf:RDF>\n"
    "</x:xmpmeta>\n"
    '<?xpacket end="w"?>\n'
)


class XmpError(ClipsearchError):
    """A sidecar exists but cannot be merged (not XML, not XMP, too large, unreadable)."""


def sidecar_path(image: str | Path) -> Path:
    """The sidecar ``image``'s keywords go to: ``photo.cr3`` -> ``photo.cr3.xmp`` (darktable, digiKam;
    made when there is none), unless there is no such file but a ``photo.xmp`` (Lightroom, Capture
    One, ACDSee) that is this photo's: then that one, so the labels show in the program that keeps it,
    and the dates and places it holds are not hidden behind a new sidecar (``clipsearch.metadata``
    reads the first of the two it finds).

    ``photo.xmp`` is this photo's when no other file of the folder shares the stem, or, as Lightroom
    pairs them, when this photo is the one RAW file among those that do (``photo.cr3`` beside
    ``photo.jpg``: the RAW's; the JPEG gets ``photo.jpg.xmp``).
    """
    from clipsearch.metadata import sidecar_candidates

    image = Path(image)
    full, by_stem = sidecar_candidates(image)
    if by_stem == full or os.path.lexists(full) or not os.path.lexists(by_stem):
        return full
    return by_stem if _owns_stem_sidecar(image) else full


def _owns_stem_sidecar(image: Path) -> bool:
    import glob

    from clipsearch.raw import RAW_EXTENSIONS

    try:
        others = [
            p
            for p in image.parent.glob(glob.escape(image.stem) + ".*")
            if p.name != image.name and p.suffix.lower() != ".xmp" and p.stem == image.stem
        ]
    except OSError:  # an unreadable folder: the sidecar clipsearch names itself
        return False
    if not others:
        return True
    is_raw = image.suffix.lower() in RAW_EXTENSIONS
    return is_raw and not any(p.suffix.lower() in RAW_EXTENSIONS for p in others)


# --- where things are in the file -------------------------------------------------------------------


@dataclass
class _Element:
    uri: str
    local: str
    qname: str  # as written, with its prefix
    start: int  # byte offset of "<"
    start_end: int  # just after the start tag's ">"
    end: int = -1  # just after the end tag (== start_end for <x/>)
    end_start: int = -1  # offset of "</" (== start_end for <x/>)
    self_closing: bool = False
    parent: _Element | None = None
    children: list[_Element] = field(default_factory=list)
    text: str = ""
    scope: dict[str, str] = field(default_factory=dict)  # prefix -> uri in scope here

    def child(self, uri: str, local: str) -> _Element | None:
        return next((c for c in self.children if (c.uri, c.local) == (uri, local)), None)

    @property
    def prefix(self) -> str:
        return self.qname.split(":", 1)[0] if ":" in self.qname else ""


def _start_tag_end(data: bytes, start: int) -> tuple[int, bool]:
    """Just after the ``>`` closing the start tag at ``start``, and whether it was ``/>``."""
    quote = None
    i = start + 1
    while i < len(data):
        ch = data[i : i + 1]
        if quote:
            if ch == quote:
                quote = None
        elif ch in (b'"', b"'"):
            quote = ch
        elif ch == b">":
            return i + 1, data[i - 1 : i] == b"/"
        i += 1
    raise XmpError("a start tag never ends")


def _scan(data: bytes, name: Path) -> list[_Element]:
    """Every element of ``data`` with its byte ranges (expat, namespace-aware)."""
    parser = xml.parsers.expat.ParserCreate(namespace_separator=" ")
    elements: list[_Element] = []
    stack: list[_Element] = []
    pending: dict[str, str] = {}

    def on_ns(prefix, uri):
        pending[prefix or ""] = uri

    def on_start(qualified, attrs):
        uri, _, local = qualified.rpartition(" ")
        start = parser.CurrentByteIndex
        start_end, closing = _start_tag_end(data, start)
        raw = data[start + 1 : start_end].split(None, 1)[0].rstrip(b"/>").decode("utf-8")
        scope = dict(stack[-1].scope) if stack else {}
        scope.update(pending)
        pending.clear()
        element = _Element(uri, local, raw, start, start_end, self_closing=closing, scope=scope)
        element.parent = stack[-1] if stack else None
        if element.parent is not None:
            element.parent.children.append(element)
        elements.append(element)
        stack.append(element)

    def on_end(_qualified):
        element = stack.pop()
        if element.self_closing:
            element.end_start = element.end = element.start_end
        else:
            element.end_start = parser.CurrentByteIndex
            element.end = data.index(b">", element.end_start) + 1

    def on_text(text):
        if stack:
            stack[-1].text += text

    parser.StartNamespaceDeclHandler = on_ns
    parser.StartElementHandler = on_start
    parser.EndElementHandler = on_end
    parser.CharacterDataHandler = on_text
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as e:
        raise XmpError(f"{name}: not well-formed XML ({e}), left untouched") from e
    return elements


def _items(prop: _Element | None) -> list[_Element]:
    """The ``rdf:li`` items of a list property (empty when absent)."""
    if prop is None:
        return []
    container = next((c for c in prop.children if c.uri == RDF and c.local in _LISTS), None)
    return [] if container is None else [c for c in container.children if (c.uri, c.local) == (RDF, "li")]


def _texts(prop: _Element | None) -> list[str]:
    return [li.text.strip() for li in _items(prop) if li.text.strip()]


# --- editing -----------------------------------------------------------------------------------------


def _line_indent(data: bytes, offset: int) -> str:
    """The whitespace between the last line break before ``offset`` and ``offset``."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    head = data[line_start:offset]
    return head.decode("utf-8") if head.strip() == b"" else ""


def _li(prefix: str, text: str) -> str:
    return f"<{prefix}:li>{escape(text)}</{prefix}:li>"


class _Edit:
    """Byte-range replacements on the original file, applied from the end."""

    def __init__(self, data: bytes):
        self.data = data
        self.changes: list[tuple[int, int, str]] = []

    def replace(self, start: int, end: int, text: str) -> None:
        self.changes.append((start, end, text))

    def remove_element(self, element: _Element) -> None:
        """Drop ``element`` and the blank run of its line before it."""
        start = element.start
        line_start = self.data.rfind(b"\n", 0, start)
        if line_start >= 0 and self.data[line_start + 1 : start].strip() == b"":
            start = line_start
        self.replace(start, element.end, "")

    def result(self) -> bytes:
        out = self.data
        for start, end, text in sorted(self.changes, key=lambda c: (c[0], c[1]), reverse=True):
            out = out[:start] + text.encode("utf-8") + out[end:]
        return out


def _prefix_for(uri: str, description: _Element, declare: dict[str, str]) -> str:
    """A prefix bound to ``uri`` at ``description``; declares one there when none is in scope."""
    for prefix, bound in {**description.scope, **declare}.items():
        if bound == uri and prefix:
            return prefix
    taken = set(description.scope) | set(declare)
    base = PREFERRED_PREFIX.get(uri, "ns")
    prefix, n = base, 1
    while prefix in taken:
        prefix, n = f"{base}{n}", n + 1
    declare[prefix] = uri
    return prefix


def _new_list(prop_qname: str, rdf: str, items: Sequence[str], indent: str) -> str:
    lines = [f"{indent}<{prop_qname}>", f"{indent} <{rdf}:Bag>"]
    lines += [f"{indent}  {_li(rdf, k)}" for k in items]
    lines += [f"{indent} </{rdf}:Bag>", f"{indent}</{prop_qname}>"]
    return "\n".join(lines)


def _append_items(edit: _Edit, prop: _Element, items: Sequence[str]) -> None:
    container = next((c for c in prop.children if c.uri == RDF and c.local in _LISTS), None)
    if container is None:
        raise XmpError(f"{prop.qname} is not a list (rdf:Bag/Seq), left untouched")
    rdf = container.prefix
    existing = [c for c in container.children if (c.uri, c.local) == (RDF, "li")]
    if existing:
        last = existing[-1]
        indent = _line_indent(edit.data, last.start)
        sep = "\n" + indent if indent or edit.data[: last.start].endswith(b"\n") else ""
        edit.replace(last.end, last.end, "".join(sep + _li(rdf, k) for k in items))
    elif container.self_closing:
        indent = _line_indent(edit.data, container.start)
        body = "".join(f"\n{indent} {_li(rdf, k)}" for k in items)
        edit.replace(
            container.start, container.end, f"<{container.qname}>{body}\n{indent}</{container.qname}>"
        )
    else:
        indent = _line_indent(edit.data, container.start)
        body = "".join(f"\n{indent} {_li(rdf, k)}" for k in items)
        edit.replace(container.start_end, container.start_end, body)


def merge_keywords(data: bytes, keywords: Sequence[str], name: Path = Path("<sidecar>")) -> bytes:
    """``data`` (an XMP packet, UTF-8) with ``keywords`` as clipsearch's keywords, all else kept."""
    elements = _scan(data, name)
    descriptions = [e for e in elements if (e.uri, e.local) == (RDF, "Description")]
    if not descriptions:
        raise XmpError(f"{name}: no rdf:Description in it (not an XMP sidecar), left untouched")

    def find(uri: str, local: str) -> _Element | None:
        return next((c for d in descriptions if (c := d.child(uri, local)) is not None), None)

    holder = next(
        (d for d in descriptions if d.child(DC, "subject") or d.child(LR, "hierarchicalSubject")),
        descriptions[0],
    )
    wanted = list(dict.fromkeys(k.strip() for k in keywords if k.strip()))
    edit = _Edit(data)
    declare: dict[str, str] = {}
    new_props: list[tuple[str, str, list[str]]] = []  # (uri, local, items) to add to `holder`
    for (uri, local), (rec_uri, rec_local) in FIELDS:
        prop, record = find(uri, local), find(rec_uri, rec_local)
        ours_before = set(_texts(record))
        present = _texts(prop)
        theirs = [k for k in present if k not in ours_before]
        if local == "hierarchicalSubject":  # a tag already in someone's tree ("Places|lake") is there
            theirs += [k.rsplit("|", 1)[-1] for k in theirs if "|" in k]
        ours_now = [k for k in wanted if k not in theirs]
        for li in _items(prop):
            if li.text.strip() in ours_before and li.text.strip() not in wanted:
                edit.remove_element(li)
        missing = [k for k in ours_now if k not in present]
        if missing and prop is not None:
            _append_items(edit, prop, missing)
        elif missing:
            new_props.append((uri, local, missing))
        if _texts(record) != ours_now:
            if record is not None:
                edit.remove_element(record)
            if ours_now:
                new_props.append((rec_uri, rec_local, ours_now))
    if new_props:
        _add_properties(edit, holder, new_props, declare)
    return edit.result()


def _add_properties(edit: _Edit, holder: _Element, props, declare: dict[str, str]) -> None:
    rdf = holder.prefix or _prefix_for(RDF, holder, declare)
    last = holder.children[-1] if holder.children else None
    if last is not None:
        indent = _line_indent(edit.data, last.start)
    else:
        indent = _line_indent(edit.data, holder.start) + " "
    blocks = [
        _new_list(f"{_prefix_for(uri, holder, declare)}:{local}", rdf, items, indent)
        for uri, local, items in props
    ]
    body = "".join("\n" + block for block in blocks)
    decls = "".join(f'\n{indent}xmlns:{p}="{escape(u, {chr(34): "&quot;"})}"' for p, u in declare.items())
    tag_close = holder.start_end - (2 if holder.self_closing else 1)  # where "/>" or ">" begins
    if decls:
        edit.replace(tag_close, tag_close, decls)
    if holder.self_closing:
        outer = _line_indent(edit.data, holder.start)
        edit.replace(tag_close, holder.end, f">{body}\n{outer}</{holder.qname}>")
    elif last is not None:
        edit.replace(last.end, last.end, body)
    else:
        edit.replace(holder.start_end, holder.start_end, body)


# --- the public API ----------------------------------------------------------------------------------


def _read(side: Path) -> bytes:
    from clipsearch.metadata import read_sidecar

    too_large = f"{side}: sidecar larger than {MAX_SIDECAR_BYTES >> 20} MiB, left untouched"
    try:
        data = read_sidecar(side, MAX_SIDECAR_BYTES)
    except OSError as e:  # a FIFO, device or folder in its place is refused before it is opened
        raise XmpError(
            too_large if e.errno == errno.EFBIG else f"{side}: cannot read it ({e.strerror})"
        ) from e
    if len(data) > MAX_SIDECAR_BYTES:  # it grew since the check
        raise XmpError(too_large)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise XmpError(f"{side}: not UTF-8 (UTF-16 or another encoding), left untouched") from e
    return data


def write_keywords(image: str | Path, keywords: Sequence[str]) -> Path | None:
    """Make ``keywords`` clipsearch's keywords in ``image``'s sidecar, merging with what is there.

    Returns the sidecar path, or None when there was no sidecar and there are no keywords (no empty
    file is created). Raises :class:`XmpError` when an existing sidecar cannot be merged, and
    ``OSError`` when it cannot be written.
    """
    side = sidecar_path(image)
    exists = os.path.lexists(side)
    if not exists and not any(k.strip() for k in keywords):
        return None
    if exists and not side.exists():
        raise XmpError(f"{side}: a symlink to nothing, left untouched")
    data = _read(side) if exists else _NEW_SIDECAR.encode("utf-8")
    merged = merge_keywords(data, keywords, side)
    if exists and merged == data:
        return side  # nothing to change: the file (and its mtime) stays as it is
    write_bytes(side, merged, make_folder=False)  # the photo's folder gone (a drive unmounted): not remade
    return side


def write_labels(
    results, min_probability: float
) -> tuple[dict[int, dict], list[tuple[int, int | None, int | None]]]:
    """Write each labelled photo's labels of probability >= ``min_probability`` to its sidecar
    (:func:`write_keywords`). Returns ``({image_id: {"sidecar", "keywords", "error"}}, stamps)``:
    ``stamps`` is ``(image id, sidecar stamp before, after)`` for every sidecar written, for
    :meth:`clipsearch.store.Library.note_own_sidecar_writes`."""
    from clipsearch.metadata import sidecar_stamp
    from clipsearch.names import one_line, printable

    out, stamps = {}, []
    for r in results:
        keywords = [lab for lab, score in r.labels if score >= min_probability]
        entry = {"sidecar": None, "keywords": keywords, "error": None}
        before = sidecar_stamp(r.path)
        try:
            side = write_keywords(r.path, keywords)
            entry["sidecar"] = None if side is None else str(side)
        except XmpError as e:
            entry["error"] = one_line(e)
        except OSError as e:
            entry["error"] = printable(e.strerror or str(e))
        else:
            after = sidecar_stamp(r.path)
            if after != before:
                stamps.append((r.image_id, before, after))
        out[r.image_id] = entry
    return out, stamps
