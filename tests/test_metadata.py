"""Photo metadata and RAW files, read from real files: EXIF written by Pillow, XMP packets and sidecars
as Lightroom/darktable write them, and DNG/CR3/RAF containers built after their layouts
(``photo_samples.py``). Expected values are the ones written, converted by hand."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
from photo_samples import exif_bytes, jpeg_bytes, make_cr3, make_dng, make_raf, write_exif_photo
from PIL import Image

from clipsearch import raw
from clipsearch.errors import ImageDecodeError
from clipsearch.filters import FilterError, PhotoFilter, bounding_box, distance_km, parse_types, parse_when
from clipsearch.imageio import open_image
from clipsearch.metadata import PhotoMetadata, camera_name, parse_xmp, read_metadata


def test_exif_fields_from_jpeg_png_webp(tmp_path):
    fields = dict(
        taken="2023:05:01 10:00:00",
        offset="+02:00",
        make="Canon",
        model="Canon EOS R5",
        lens="RF24-105mm F4 L IS USM",
        gps=(48.8584, 2.2945),
    )
    for name in ("a.jpg", "a.png", "a.webp"):
        meta = read_metadata(write_exif_photo(tmp_path / name, 1, size=(80, 60), **fields))
        assert meta.taken_at == "2023-05-01T10:00:00+02:00"
        assert (meta.make, meta.model, meta.camera) == ("Canon", "Canon EOS R5", "Canon EOS R5")
        assert meta.lens == "RF24-105mm F4 L IS USM"
        assert meta.lat == pytest.approx(48.8584, abs=1e-6) and meta.lon == pytest.approx(2.2945, abs=1e-6)
        assert (meta.width, meta.height) == (80, 60)
        assert meta.file_type == name.split(".")[1].replace("jpg", "jpeg")


def test_south_west_orientation_and_missing_fields(tmp_path):
    meta = read_metadata(
        write_exif_photo(tmp_path / "rio.jpg", 2, size=(80, 60), gps=(-22.9519, -43.2105), orientation=6)
    )
    assert meta.lat == pytest.approx(-22.9519, abs=1e-6) and meta.lon == pytest.approx(-43.2105, abs=1e-6)
    assert (meta.width, meta.height, meta.orientation) == (60, 80, 6)  # upright size
    assert meta.taken_at is None and meta.camera is None
    plain = read_metadata(write_exif_photo(tmp_path / "plain.png", 3))
    assert plain == PhotoMetadata(width=96, height=72, file_type="png")


def test_time_zone_from_the_gps_clock(tmp_path):
    """No OffsetTimeOriginal, but GPS says 08:30 UTC for a 10:30 local photo: +02:00."""
    p = write_exif_photo(
        tmp_path / "g.jpg", 4, taken="2024:07:14 10:30:05", gps_utc=("2024:07:14", (8.0, 30.0, 0.0))
    )
    assert read_metadata(p).taken_at == "2024-07-14T10:30:05+02:00"
    # A clock 20 h off is another day's fix, not a time zone
    p = write_exif_photo(
        tmp_path / "h.jpg", 4, taken="2024:07:14 10:30:05", gps_utc=("2024:07:13", (14.0, 30.0, 0.0))
    )
    assert read_metadata(p).taken_at == "2024-07-14T10:30:05"


def test_null_island_and_unset_clock_are_unknown(tmp_path):
    p = write_exif_photo(tmp_path / "z.jpg", 5, gps=(0.0, 0.0), taken="0000:00:00 00:00:00")
    meta = read_metadata(p)
    assert meta.lat is None and meta.lon is None and meta.taken_at is None


def test_camera_name():
    assert camera_name("NIKON CORPORATION", "NIKON D850") == "NIKON D850"
    assert camera_name("Apple", "iPhone 13") == "Apple iPhone 13"
    assert camera_name(None, "X100V") == "X100V" and camera_name("Sony", None) == "Sony"
    assert camera_name(None, None) is None


XMP = (
    '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
    '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    'xmlns:aux="http://ns.adobe.com/exif/1.0/aux/" exif:DateTimeOriginal="2019-09-10T11:12:13.45+09:00" '
    'tiff:Make="FUJIFILM" aux:Lens="XF23mmF2 R WR">'
    "<tiff:Model>X100V</tiff:Model><exif:GPSLatitude>35,40.5N</exif:GPSLatitude>"
    "<exif:GPSLongitude>139,45,36W</exif:GPSLongitude></rdf:Description></rdf:RDF></x:xmpmeta>"
    '<?xpacket end="w"?>'
)


def test_xmp_packet_attributes_and_elements():
    fields = parse_xmp(XMP.encode())
    assert fields["taken_at"] == "2019-09-10T11:12:13+09:00"
    assert (fields["make"], fields["model"], fields["lens"]) == ("FUJIFILM", "X100V", "XF23mmF2 R WR")
    assert fields["lat"] == pytest.approx(35.675) and fields["lon"] == pytest.approx(
        -(139 + 45 / 60 + 36 / 3600)
    )


def test_xmp_bombs_and_garbage_are_ignored():
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;">]><x>&b;</x>'
    assert parse_xmp(bomb) == {} and parse_xmp(b"<x:xmpmeta not xml") == {} and parse_xmp(None) == {}


def test_xmp_sidecars_fill_what_exif_lacks_and_exif_wins(tmp_path):
    p = write_exif_photo(tmp_path / "DSC01.jpg", 6, make="SONY", model="ILCE-7M3")
    (tmp_path / "DSC01.xmp").write_text(XMP)  # Lightroom's name for it
    meta = read_metadata(p)
    assert (meta.make, meta.model) == ("SONY", "ILCE-7M3")  # EXIF is trusted first
    assert meta.taken_at == "2019-09-10T11:12:13+09:00" and meta.lens == "XF23mmF2 R WR"
    assert meta.lat == pytest.approx(35.675)


def test_embedded_xmp_in_a_jpeg(tmp_path):
    img = Image.fromarray(np.full((20, 30, 3), 120, np.uint8))
    path = tmp_path / "x.jpg"
    img.save(path, xmp=XMP.encode())
    assert read_metadata(path).model == "X100V"


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_file(chunks) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(out)


def test_png_exif_and_xmp_after_the_image_data_are_read_without_decoding(tmp_path):
    """libpng writes eXIf/iTXt after IDAT when a program puts them in its end info; Pillow finds
    them only by decoding every pixel. read_metadata seeks over the image data instead: the same
    fields as Pillow's full load, and still all of them when the pixel data is broken."""
    src = write_exif_photo(
        tmp_path / "src.png", 5, size=(80, 60), taken="2021:03:04 05:06:07", make="Apple", orientation=6
    )
    chunks = _png_chunks(src.read_bytes())
    exif = [c for c in chunks if c[0] == b"eXIf"]
    assert len(exif) == 1  # Pillow wrote it before the image data
    rest = [c for c in chunks if c[0] != b"eXIf"]
    end = next(i for i, c in enumerate(rest) if c[0] == b"IEND")
    packet = zlib.compress(XMP.encode())
    itxt = (b"iTXt", b"XML:com.adobe.xmp\0\x01\x00\0\0" + packet)  # compressed iTXt, as exiftool writes
    late = tmp_path / "late.png"
    late.write_bytes(_png_file([*rest[:end], exif[0], itxt, *rest[end:]]))

    meta = read_metadata(late)
    assert meta.taken_at == "2021-03-04T05:06:07" and meta.make == "Apple"  # EXIF first
    assert meta.model == "X100V" and meta.lens == "XF23mmF2 R WR"  # what only the XMP says
    assert (meta.width, meta.height, meta.orientation) == (60, 80, 6)
    # the reference: Pillow loading the pixels reads the same chunks
    with Image.open(late) as im:
        im.load()
        assert im.getexif()[0x0112] == 6 and b"X100V" in im.info["xmp"]
    assert open_image(late).size == (60, 80)

    # headers only: the image data corrupted, every field is still there
    broken = [(k, bytes(len(b)) if k == b"IDAT" else b) for k, b in _png_chunks(late.read_bytes())]
    (tmp_path / "broken.png").write_bytes(_png_file(broken))
    assert read_metadata(tmp_path / "broken.png") == meta


# --- RAW ------------------------------------------------------------------------------------------


def test_dng_metadata_and_preview(tmp_path):
    p = make_dng(tmp_path / "L1000001.DNG", 7, preview_size=(160, 120), gps=(51.5007, -0.1246))
    meta = read_metadata(p)
    assert meta.file_type == "dng" and meta.camera == "LEICA Q2" and meta.make == "Leica Camera AG"
    assert meta.taken_at == "2021-03-04T05:06:07"
    assert meta.lat == pytest.approx(51.5007, abs=1e-4) and meta.lon == pytest.approx(-0.1246, abs=1e-4)
    assert (meta.width, meta.height) == (96, 64)  # the sensor's size
    im = open_image(p, draft_size=64)
    assert im.mode == "RGB" and im.size == (160, 120)
    reference = Image.open(io.BytesIO(jpeg_bytes(7, (160, 120)))).convert("RGB")
    assert np.array_equal(np.asarray(im), np.asarray(reference))  # exactly the embedded JPEG


def test_dng_orientation_turns_the_preview(tmp_path):
    p = make_dng(tmp_path / "turned.dng", 8, preview_size=(160, 120), orientation=6)
    assert open_image(p, draft_size=64).size == (120, 160)
    meta = read_metadata(p)
    assert (meta.width, meta.height, meta.orientation) == (64, 96, 6)


def test_a_small_preview_is_developed_by_libraw(tmp_path, caplog):
    pytest.importorskip("rawpy", reason="rawpy develops RAW files (a dependency)")
    p = make_dng(tmp_path / "small.dng", 9, preview_size=(32, 24), sensor_size=(96, 64))
    with caplog.at_level("DEBUG", logger="clipsearch.raw"):
        im = open_image(p, draft_size=64)
    assert im.size == (96, 64) and "developing with LibRaw" in caplog.text
    # LibRaw's development of the mosaic resembles the scene it was sampled from
    from e2e_helpers import scene

    developed = np.asarray(im, dtype=np.float64).mean(axis=2).ravel()
    same = np.corrcoef(developed, scene(9, (96, 64)).astype(np.float64).mean(axis=2).ravel())[0, 1]
    other = np.corrcoef(developed, scene(10, (96, 64)).astype(np.float64).mean(axis=2).ravel())[0, 1]
    assert same > 0.6 and same > abs(other) + 0.3  # (colour matrix and gamma change the values)


def test_without_libraw_a_small_preview_still_serves(tmp_path, monkeypatch):
    monkeypatch.setattr(raw, "rawpy_available", lambda: False)
    p = make_dng(tmp_path / "small.dng", 9, preview_size=(32, 24))
    assert open_image(p, draft_size=64).size == (32, 24)


def test_cr3_preview_and_split_exif(tmp_path):
    p = make_cr3(tmp_path / "IMG_0001.CR3", 10, preview_size=(1620, 1080), gps=(40.6892, -74.0445))
    meta = read_metadata(p)
    assert meta.file_type == "cr3" and meta.camera == "Canon EOS R6"
    assert meta.taken_at == "2022-08-09T10:11:12"
    assert meta.lat == pytest.approx(40.6892, abs=1e-4) and meta.lon == pytest.approx(-74.0445, abs=1e-4)
    im = open_image(p, draft_size=224)
    assert min(im.size) >= 224 and im.size[0] / im.size[1] == pytest.approx(1.5, abs=0.01)  # drafted


def test_raf_preview_carries_the_exif(tmp_path):
    p = make_raf(tmp_path / "DSCF0001.RAF", 11)
    meta = read_metadata(p)
    assert (meta.file_type, meta.camera, meta.taken_at) == ("raf", "FUJIFILM X-T4", "2020-02-03T04:05:06")
    assert open_image(p).size == (1920, 1280)


def test_plain_tiff_is_not_raw_and_raw_names_come_from_the_extension(tmp_path):
    tif = write_exif_photo(tmp_path / "scan.tif", 12)
    assert raw.sniff(open(tif, "rb")) is None and read_metadata(tif).file_type == "tiff"
    dng = make_dng(tmp_path / "x.dng", 12).read_bytes()
    nef = tmp_path / "x.nef"
    nef.write_bytes(dng.replace(b"\x12\xc6", b"\x13\xc7"))  # DNGVersion renamed: a TIFF raw by its CFA
    assert read_metadata(nef).file_type == "nef"


@pytest.mark.parametrize("cut", [8, 40, 300, 2000])
def test_truncated_raw_files_fail_cleanly(tmp_path, cut):
    data = make_dng(tmp_path / "whole.dng", 13).read_bytes()
    broken = tmp_path / "broken.dng"
    broken.write_bytes(data[:cut])
    try:
        open_image(broken, draft_size=64)
    except ImageDecodeError as e:
        assert e.reason in ("not an image", "corrupt", "truncated", "unsupported RAW", "unreadable")


def test_an_ifd_loop_ends(tmp_path):
    import struct

    # IFD0 at 8 whose next-IFD pointer is itself
    data = (
        b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x0106, 3, 1, 32803)
    )
    data += struct.pack("<I", 8)
    p = tmp_path / "loop.dng"
    p.write_bytes(data)
    found = raw.sniff(open(p, "rb"))
    assert found is not None and found.previews == []


# --- filters --------------------------------------------------------------------------------------


def test_dates_parse_to_the_start_of_their_period():
    assert parse_when("2024", "--after") == "2024-01-01T00:00:00"
    assert parse_when("2024-06", "--after") == "2024-06-01T00:00:00"
    assert parse_when("2024-06-01T18:30", "--after") == "2024-06-01T18:30:00"
    for bad in ("June", "2024-13-01", "2024-02-30", "24-01-01"):
        with pytest.raises(FilterError):
            parse_when(bad, "--after")


def test_distance_and_box_against_hand_values():
    # Paris (Eiffel Tower) to London (Big Ben): 340.9 km on the mean sphere
    assert distance_km(48.8584, 2.2945, 51.5007, -0.1246) == pytest.approx(340.9, abs=0.5)
    assert distance_km(0, 0, 0, 1) == pytest.approx(2 * math.pi * 6371.0088 / 360, rel=1e-9)
    lat_min, lat_max, lon_min, lon_max = bounding_box(0, 179.99, 10)
    assert lon_min > lon_max  # wraps the antimeridian
    assert bounding_box(89.99, 0, 10)[2:] == (-180.0, 180.0)


def test_types_and_bad_filters():
    assert parse_types("JPG,.jpeg,png") == ("jpeg", "png")
    assert "dng" in parse_types("raw") and "cr3" in parse_types("raw")
    with pytest.raises(FilterError, match="psd"):
        parse_types("psd")
    with pytest.raises(FilterError, match="--within needs --near"):
        PhotoFilter.parse(within_km=3)
    with pytest.raises(FilterError, match="LAT,LON"):
        PhotoFilter.parse(near="paris")
    with pytest.raises(FilterError, match="no photo can match"):
        PhotoFilter.parse(after="2024", before="2023")
    assert PhotoFilter.parse().is_empty() and not PhotoFilter.parse(camera="x").is_empty()
    f = PhotoFilter.parse(after="2020", near="1,2", within_km=3, types="jpg", camera="Canon")
    assert PhotoFilter.from_json(f.to_json()) == f


def test_exif_bytes_helper_round_trips():
    exif = Image.Exif()
    exif.load(exif_bytes(make="A", model="B"))
    assert (exif[0x010F], exif[0x0110]) == ("A", "B")


def test_a_sidecar_edited_after_indexing_is_read_by_the_next_run(tmp_path):
    # A date fixed in another program lands in the sidecar; the photo itself is unchanged, so its
    # size and mtime say nothing: the run notices the sidecar and reads the headers again, no embedding.
    import os

    from test_indexer import FakeBundle

    from clipsearch.indexer import index_paths
    from clipsearch.store import Library

    folder = tmp_path / "photos"
    photo = write_exif_photo(folder / "pic.jpg", 3)  # no date of its own
    write_exif_photo(folder / "other.jpg", 4)
    side = folder / "pic.jpg.xmp"

    def run(lib):
        return index_paths(lib, FakeBundle(), [folder], update_vectors=False)

    def taken(lib):
        return lib.image_at(photo).taken_at

    with Library.open(tmp_path / "lib.db", create=True) as lib:
        assert run(lib).new == 2 and taken(lib) is None
        side.write_text(XMP.replace("2019-09-10T11:12:13.45+09:00", "2019-05-06T07:08:09"))
        report = run(lib)
        assert (report.metadata, report.new, report.updated) == (1, 0, 0) and taken(
            lib
        ) == "2019-05-06T07:08:09"
        assert run(lib).metadata == 0  # nothing changed: nothing read again
        side.write_text(XMP.replace("2019-09-10T11:12:13.45+09:00", "2021-01-02T03:04:05"))
        os.utime(side, ns=(1, side.stat().st_mtime_ns + 1_000_000))  # a later mtime, even on a coarse clock
        assert run(lib).metadata == 1 and taken(lib) == "2021-01-02T03:04:05"
        # indexing the photo on its own finds its sidecar too (no folder walk): nothing is re-read
        assert index_paths(lib, FakeBundle(), [photo], update_vectors=False).metadata == 0


def _sidecar_with(date_property: str) -> str:
    return XMP.replace('exif:DateTimeOriginal="2019-09-10T11:12:13.45+09:00"', date_property)


@pytest.mark.parametrize(
    "camera, sidecar, expected",
    [
        # another moment: the sidecar's correction wins, in a JPEG and in a RAW file
        ("2024:01:15 12:00:00", 'exif:DateTimeOriginal="2023-12-24T18:30:00"', "2023-12-24T18:30:00"),
        # the same wall-clock time without the offset: the file's, which says more
        ("2024:06:01 23:30:00", 'exif:DateTimeOriginal="2024-06-01T23:30:00"', "2024-06-01T23:30:00+09:00"),
        # a date-only DateCreated of the same day: the file's time of day stays
        ("2024:01:15 12:00:00", 'photoshop:DateCreated="2024-01-15"', "2024-01-15T12:00:00"),
        # a date-only DateCreated of another day: the correction
        ("2024:01:15 12:00:00", 'photoshop:DateCreated="2020-02-02"', "2020-02-02T00:00:00"),
    ],
)
@pytest.mark.parametrize("kind", ["jpeg", "dng"])
def test_a_sidecar_corrects_the_capture_time_the_file_holds(tmp_path, camera, sidecar, expected, kind):
    if kind == "jpeg":
        offset = "+09:00" if expected.endswith("+09:00") else None
        photo = write_exif_photo(tmp_path / "p.jpg", 5, taken=camera, offset=offset, make="SONY", model="A7")
    else:
        photo = make_dng(tmp_path / "p.dng", 5, taken=camera)
        expected = expected[:19]  # the RAW sample records no UTC offset: its own time, as it has it
    xmp = _sidecar_with(sidecar).replace(
        "<rdf:Description ", '<rdf:Description xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/" '
    )
    (tmp_path / (photo.name + ".xmp")).write_text(xmp)
    meta = read_metadata(photo)
    assert meta.taken_at == expected
    assert meta.make != "FUJIFILM"  # the rest still trusts the file first
