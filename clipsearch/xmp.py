"""Labels as keywords in XMP sidecars, so photo managers (darktable, digiKam, Lightroom) can see them.

Convention: the sidecar of ``photo.jpg`` is ``photo.jpg.xmp`` (darktable's and digiKam's default;
unlike ``photo.xmp`` it cannot clash between ``photo.jpg`` and ``photo.raw`` in one folder).
Keywords go into ``dc:subject`` (an ``rdf:Bag``), where every XMP reader looks for them.

A sidecar that already exists is merged, never replaced: its other metadata and the keywords
someone else put there are kept. The keywords clipsearch added are recorded in its own
``clipsearch:keywords`` bag, so a relabel removes the stale ones it wrote and nothing else. A
sidecar that is not well-formed XML is left untouched and reported.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from clipsearch.atomic import write_bytes
from clipsearch.errors import ClipsearchError

NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "clipsearch": "urn:clipsearch:xmp:1.0",
}
# Prefixes other programs use, so a merged sidecar keeps them (ElementTree would write ns0:, ns1:).
KNOWN_PREFIXES = {
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "xmpMM": "http://ns.adobe.com/xap/1.0/mm/",
    "stEvt": "http://ns.adobe.com/xap/1.0/sType/ResourceEvent#",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    "exif": "http://ns.adobe.com/exif/1.0/",
    "lr": "http://ns.adobe.com/lightroom/1.0/",
    "darktable": "http://darktable.sf.net/",
    "digiKam": "http://www.digikam.org/ns/1.0/",
}
MAX_SIDECAR_BYTES = 4 << 20  # real sidecars are a few kB; refuse to parse anything huge


class XmpError(ClipsearchError):
    """A sidecar exists but cannot be merged (not XML, not XMP, too large, unreadable)."""


def _q(prefix: str, name: str) -> str:
    return f"{{{NS[prefix]}}}{name}"


def sidecar_path(image: str | Path) -> Path:
    """``photo.jpg`` -> ``photo.jpg.xmp``."""
    image = Path(image)
    return image.with_name(image.name + ".xmp")


def _bag_items(parent: ET.Element | None) -> list[str]:
    if parent is None:
        return []
    return [(li.text or "").strip() for li in parent.iter(_q("rdf", "li")) if (li.text or "").strip()]


def _set_bag(description: ET.Element, prefix: str, name: str, items: Sequence[str]) -> None:
    element = description.find(_q(prefix, name))
    if element is None:
        element = ET.SubElement(description, _q(prefix, name))
    for child in list(element):
        element.remove(child)
    element.text = None
    bag = ET.SubElement(element, _q("rdf", "Bag"))
    for item in items:
        ET.SubElement(bag, _q("rdf", "li")).text = item


def _new_tree() -> ET.ElementTree:
    root = ET.Element(_q("x", "xmpmeta"))
    rdf = ET.SubElement(root, _q("rdf", "RDF"))
    ET.SubElement(rdf, _q("rdf", "Description"), {_q("rdf", "about"): ""})
    return ET.ElementTree(root)


def read_keywords(image: str | Path) -> list[str]:
    """The ``dc:subject`` keywords of ``image``'s sidecar (empty when there is none)."""
    side = sidecar_path(image)
    if not side.exists():
        return []
    tree = _parse(side)
    return [k for d in tree.iter(_q("rdf", "Description")) for k in _bag_items(d.find(_q("dc", "subject")))]


def _parse(side: Path) -> ET.ElementTree:
    try:
        if side.stat().st_size > MAX_SIDECAR_BYTES:
            raise XmpError(f"{side}: sidecar larger than {MAX_SIDECAR_BYTES >> 20} MiB, left untouched")
        return ET.parse(side)
    except ET.ParseError as e:
        raise XmpError(f"{side}: not well-formed XML ({e}), left untouched") from e
    except OSError as e:
        raise XmpError(f"{side}: cannot read it ({e.strerror})") from e


def write_keywords(image: str | Path, keywords: Sequence[str]) -> Path | None:
    """Make ``keywords`` the clipsearch keywords of ``image``'s sidecar, merging with what is there.

    Returns the sidecar path, or None when there was no sidecar and there are no keywords (no empty
    file is created). Raises :class:`XmpError` when an existing sidecar cannot be merged.
    """
    for prefix, uri in {**KNOWN_PREFIXES, **NS}.items():
        ET.register_namespace(prefix, uri)
    side = sidecar_path(image)
    if not side.exists() and not any(k.strip() for k in keywords):
        return None
    tree = _parse(side) if side.exists() else _new_tree()
    descriptions = list(tree.iter(_q("rdf", "Description")))
    if not descriptions:
        raise XmpError(f"{side}: no rdf:Description in it (not an XMP sidecar), left untouched")
    holder = next((d for d in descriptions if d.find(_q("dc", "subject")) is not None), descriptions[0])
    ours_before = {k for d in descriptions for k in _bag_items(d.find(_q("clipsearch", "keywords")))}
    subject = _bag_items(holder.find(_q("dc", "subject")))
    theirs = [k for k in subject if k not in ours_before]
    wanted = list(dict.fromkeys(k.strip() for k in keywords if k.strip()))
    merged = theirs + [k for k in wanted if k not in theirs]
    ours_now = [k for k in wanted if k not in theirs]
    _set_bag(holder, "dc", "subject", merged)
    for d in descriptions:  # one record of ours, on the description that holds the subject
        old = d.find(_q("clipsearch", "keywords"))
        if old is not None:
            d.remove(old)
    _set_bag(holder, "clipsearch", "keywords", ours_now)
    ET.indent(tree, space=" ")
    buf = io.BytesIO()
    tree.write(buf, encoding="utf-8", xml_declaration=True)  # ElementTree escapes text
    write_bytes(side, buf.getvalue())
    return side
