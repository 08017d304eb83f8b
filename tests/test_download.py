"""download(): against a real HTTP server on 127.0.0.1, including its failures."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading

import pytest
from click.testing import CliRunner

from clipsearch import checkpoints, hashing, paths, pretrained
from clipsearch.cli import cli
from clipsearch.download import download
from clipsearch.errors import DownloadError, ModelLoadError
from clipsearch.pretrained import PRETRAINED

PAYLOAD = bytes(range(256)) * 9000  # 2.3 MB: several 1 MiB chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.hits.append(self.path)
        if self.path == "/file.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/truncated.bin":
            # Promise the whole payload, send half, then hang up.
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/nolength.bin":
            # HTTP/1.0 style: no Content-Length, the end of the body is the end of the connection.
            self.send_response(200)
            self.end_headers()
            self.wfile.write(PAYLOAD)
            self.close_connection = True
        else:
            self.send_error(404)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.hits = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(server, name):
    return f"http://127.0.0.1:{server.server_address[1]}/{name}"


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_streams_verifies_and_reports_progress(server, tmp_path):
    dest = tmp_path / "models" / "w.bin"
    calls = []
    out = download(
        _url(server, "file.bin"), dest, sha256=PAYLOAD_SHA, progress=lambda d, t: calls.append((d, t))
    )
    assert out == dest
    assert dest.read_bytes() == PAYLOAD
    assert calls[0] == (0, len(PAYLOAD))
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD))
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(calls) >= 3
    # Only the file and its checksum sidecar remain: no temp files.
    assert _leftovers(dest.parent) == ["w.bin", "w.bin.sha256"]
    assert hashing.file_sha256(dest) == PAYLOAD_SHA


@pytest.mark.parametrize("digest", [None, PAYLOAD_SHA[:8], PAYLOAD_SHA.upper(), PAYLOAD_SHA + "0"])
def test_download_refuses_anything_but_a_full_digest(server, tmp_path, digest):
    # A prefix, or no digest, would let a changed file through: refused before connecting.
    with pytest.raises(ValueError, match="full 64-digit sha256"):
        download(_url(server, "file.bin"), tmp_path / "w.bin", sha256=digest)
    assert server.hits == [] and _leftovers(tmp_path) == []


def test_download_without_content_length(server, tmp_path):
    dest = tmp_path / "w.bin"
    calls = []
    download(
        _url(server, "nolength.bin"), dest, sha256=PAYLOAD_SHA, progress=lambda d, t: calls.append((d, t))
    )
    assert dest.read_bytes() == PAYLOAD
    assert calls[-1] == (len(PAYLOAD), None)


def test_bad_checksum_leaves_nothing_behind(server, tmp_path):
    dest = tmp_path / "w.bin"
    wrong = "0" * 64
    with pytest.raises(DownloadError, match="checksum mismatch") as err:
        download(_url(server, "file.bin"), dest, sha256=wrong)
    assert PAYLOAD_SHA in str(err.value)
    assert _leftovers(tmp_path) == []


def test_bad_checksum_does_not_replace_an_existing_file(server, tmp_path):
    dest = tmp_path / "w.bin"
    dest.write_bytes(b"old")
    with pytest.raises(DownloadError):
        download(_url(server, "file.bin"), dest, sha256="f" * 64)
    assert dest.read_bytes() == b"old"
    assert _leftovers(tmp_path) == ["w.bin"]


def test_interrupted_transfer_leaves_no_partial_file(server, tmp_path):
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError) as err:
        download(_url(server, "truncated.bin"), dest, sha256=PAYLOAD_SHA)
    assert str(dest) in str(err.value)
    assert _leftovers(tmp_path) == []


def test_http_error_is_a_download_error(server, tmp_path):
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError, match="404"):
        download(_url(server, "missing.bin"), dest, sha256=PAYLOAD_SHA)
    assert _leftovers(tmp_path) == []


def test_destination_blocked_by_a_file_is_a_download_error(server, tmp_path):
    (tmp_path / "models").write_text("a file where the models directory should be")
    with pytest.raises(DownloadError, match="cannot write"):
        download(_url(server, "file.bin"), tmp_path / "models" / "w.bin", sha256=PAYLOAD_SHA)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


def test_unreachable_server_names_the_url_and_where_to_put_the_file(tmp_path):
    dest = tmp_path / "models" / "w.bin"
    url = f"http://127.0.0.1:{_dead_port()}/w.bin"
    with pytest.raises(DownloadError) as err:
        download(url, dest, sha256=PAYLOAD_SHA, timeout=5)
    message = str(err.value)
    assert url in message and str(dest) in message and "offline" in message
    assert _leftovers(dest.parent) == []


@pytest.fixture
def registered(server, monkeypatch):
    """A registry entry pointing at the local server."""
    entry = {
        "arch": "tiny-vit",
        "quick_gelu": True,
        "url": _url(server, "file.bin"),
        "revision": "test",
        "filename": "test-weights.bin",
        "sha256": PAYLOAD_SHA,
        "format": "openai",
    }
    monkeypatch.setitem(PRETRAINED, "tiny-vit/test", entry)
    return entry


def test_fetch_pretrained_downloads_once_then_uses_the_cache(server, registered):
    assert "tiny-vit/test" not in pretrained.cached_pretrained()
    path = pretrained.fetch_pretrained("tiny-vit/test")
    assert path == paths.models_dir() / "test-weights.bin"
    assert path.read_bytes() == PAYLOAD
    assert server.hits == ["/file.bin"]
    assert "tiny-vit/test" in pretrained.cached_pretrained()

    assert pretrained.fetch_pretrained("tiny-vit/test") == path
    assert server.hits == ["/file.bin"]  # not downloaded again


def test_cached_file_is_hashed_once(server, registered, monkeypatch):
    pretrained.fetch_pretrained("tiny-vit/test")
    hashed = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: hashed.append(p) or real(p))
    pretrained.fetch_pretrained("tiny-vit/test")
    assert hashed == []  # the sidecar written at download time answered
    path = paths.models_dir() / "test-weights.bin"
    hashing.sidecar(path).unlink()
    pretrained.fetch_pretrained("tiny-vit/test")
    pretrained.fetch_pretrained("tiny-vit/test")
    assert hashed == [path]  # re-hashed once, then cached again


def test_corrupted_cached_file_is_reported_not_used(server, registered):
    path = pretrained.fetch_pretrained("tiny-vit/test")
    path.write_bytes(PAYLOAD[:-1] + b"\x00")  # new size and mtime invalidate the sidecar
    with pytest.raises(ModelLoadError, match="delete it") as err:
        pretrained.fetch_pretrained("tiny-vit/test")
    assert str(path) in str(err.value)


def test_offline_pretrained_load_says_where_to_put_the_file(monkeypatch):
    entry = dict(PRETRAINED["ViT-B-32/openai"], url=f"http://127.0.0.1:{_dead_port()}/ViT-B-32.pt")
    monkeypatch.setitem(PRETRAINED, "ViT-B-32/openai", entry)
    with pytest.raises(DownloadError) as err:
        checkpoints.load_bundle("ViT-B-32/openai")
    assert str(paths.models_dir() / "openai-ViT-B-32.pt") in str(err.value)


def test_registry_entries_are_well_formed():
    names = pretrained.list_pretrained()
    for required in ("ViT-B-32/openai", "RN50/openai", "ViT-L-14-336/openai", "ViT-B-32/laion2b_s34b_b79k"):
        assert required in names
    filenames = [e["filename"] for e in PRETRAINED.values()]
    assert len(set(filenames)) == len(filenames)
    for name, entry in PRETRAINED.items():
        assert name.split("/")[0] == entry["arch"]
        assert entry["url"].startswith("https://")
        sha = entry["sha256"]
        assert sha is None or (len(sha) == 64 and int(sha, 16) >= 0)
        assert pretrained.is_pinned(entry) == (sha is not None and "revision" in entry)
        if "huggingface.co" in entry["url"] and pretrained.is_pinned(entry):
            assert f"/resolve/{entry['revision']}/" in entry["url"]  # a commit, not a branch
            assert len(entry["revision"]) == 40
        if "/releases/download/" in entry["url"]:
            assert sha.startswith(entry["url"].rsplit("-", 1)[1].split(".")[0])  # the file name's prefix
        if "openaipublic" in entry["url"]:
            # OpenAI's URLs carry the full digest; every OpenAI release used QuickGELU.
            assert entry["url"].split("/")[-2] == sha and entry["quick_gelu"]
    unpinned = sorted(n for n, e in PRETRAINED.items() if not pretrained.is_pinned(e))
    assert unpinned == [
        "ViT-B-16/datacomp_xl_s13b_b90k",
        "ViT-B-16/laion2b_s34b_b88k",
        "ViT-B-32/datacomp_xl_s13b_b90k",
        "ViT-L-14/datacomp_xl_s13b_b90k",
    ]
    assert PRETRAINED["ViT-B-32/laion2b_s34b_b79k"]["quick_gelu"] is False
    assert PRETRAINED["ViT-L-14/laion2b_s32b_b82k"]["mean"] == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("sha256", [None, PAYLOAD_SHA[:8]])
def test_unpinned_registry_entry_is_refused_before_any_download(server, registered, sha256):
    registered["sha256"] = sha256
    with pytest.raises(ModelLoadError, match="without a pinned revision and full sha256"):
        checkpoints.load_bundle("tiny-vit/test")
    assert server.hits == []
    assert not (paths.models_dir() / "test-weights.bin").exists()
    # A copy an earlier version downloaded unverified is not used, but named.
    (paths.models_dir()).mkdir(parents=True, exist_ok=True)
    (paths.models_dir() / "test-weights.bin").write_bytes(PAYLOAD)
    with pytest.raises(ModelLoadError, match="downloaded unverified is .*test-weights.bin: pass that path"):
        checkpoints.load_bundle("tiny-vit/test")


def test_registry_entry_without_a_revision_is_refused(server, registered):
    del registered["revision"]
    with pytest.raises(ModelLoadError, match="pinned revision"):
        pretrained.fetch_pretrained("tiny-vit/test")
    assert server.hits == []


def test_a_killed_downloads_temporary_is_removed_by_the_next_download(server, tmp_path):
    """kill -9 mid-download leaves the temporary (up to the model's size); it is never used, and the
    next download into the folder deletes it once no writer holds it. A live one is kept."""
    import fcntl
    import os

    dest = tmp_path / "models" / "w.bin"
    dest.parent.mkdir()
    dead = dest.parent / ".w.bin.k1ll3d00.tmp"
    dead.write_bytes(PAYLOAD[:1000])
    live = dest.parent / ".w.bin.l1ve0000.tmp"
    live.write_bytes(PAYLOAD[:1000])
    old = os.stat(dead).st_mtime - 3600
    for p in (dead, live):
        os.utime(p, (old, old))
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a download still running holds
        download(_url(server, "file.bin"), dest, sha256=PAYLOAD_SHA)
        assert _leftovers(dest.parent) == [live.name, "w.bin", "w.bin.sha256"]


def test_a_full_disk_says_to_free_space_not_to_make_the_folder_writable(server, tmp_path, monkeypatch):
    import errno

    from clipsearch import download as download_module

    def full(url, out, dest, progress, timeout):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download_module, "_fetch", full)
    dest = tmp_path / "models" / "w.bin"
    with pytest.raises(DownloadError) as err:
        download(_url(server, "file.bin"), dest, sha256=PAYLOAD_SHA)
    message = str(err.value)
    assert "No space left on device" in message and "free some space" in message
    assert "writable" not in message
    assert _leftovers(dest.parent) == []


def test_models_tells_a_verified_copy_from_a_damaged_or_unchecked_one(server, registered):
    """`clipsearch models` said "cached: yes" for a file that fails its checksum (loading it is refused)."""
    assert pretrained.cached_state("tiny-vit/test") is None
    path = pretrained.fetch_pretrained("tiny-vit/test")
    assert pretrained.cached_state("tiny-vit/test") == "verified"  # hashed as it downloaded
    path.write_bytes(PAYLOAD[:-1] + b"!")  # changed since: not known until read again
    assert pretrained.cached_state("tiny-vit/test") == "unchecked"
    with pytest.raises(ModelLoadError, match="does not match the pinned checksum"):
        pretrained.fetch_pretrained("tiny-vit/test")  # reads it, and records what it found
    assert pretrained.cached_state("tiny-vit/test") == "damaged"
    listed = CliRunner().invoke(cli, ["models", "--json"])
    row = next(r for r in json.loads(listed.output) if r["name"] == "tiny-vit/test")
    assert row["cached"] and row["state"] == "damaged"
    assert "damaged: delete it" in CliRunner().invoke(cli, ["models"]).output
