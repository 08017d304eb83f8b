"""Once a model's exports exist, index, query, label and similar run without PyTorch (issue 15).

Tested as a user meets it: real ``python -m clipsearch`` processes in which ``import torch`` is made
impossible (a ``sitecustomize`` on ``PYTHONPATH`` puts ``None`` in ``sys.modules["torch"]``), after a
first index with torch settled the model (verdict, ONNX export, text export). Their answers are
checked against the model itself in torch, in this process; a picture uploaded to ``clipsearch web``
is checked against ``query --image`` with the model. Also: ``index`` on a folder without photos
starts no model download (a registry entry pointed at a server on 127.0.0.1 that counts requests).
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import types
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from e2e_helpers import REPO, make_tiny_model, write_photo

NO_TORCH = 'import sys\nsys.modules["torch"] = None  # "import torch" raises ImportError from here on\n'


def _run(args, env, shim: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    if shim is not None:
        full["PYTHONPATH"] = os.pathsep.join([str(shim), full.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", "clipsearch", *map(str, args)],
        capture_output=True,
        text=True,
        env=full,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def settled(tmp_path_factory):
    """A tiny model settled on a first index run with torch: verdict, ONNX exports, text export.

    The verdict is then set to keep onnx-fp32 (as on a machine where ONNX Runtime measured fastest),
    so the runs below are deterministic whatever this busy machine measured.
    """
    root = tmp_path_factory.mktemp("torch-free")
    home = root / "home"
    home.mkdir()
    env = {"CLIPSEARCH_HOME": str(home), "CLIPSEARCH_BACKGROUND": "0"}
    model = make_tiny_model(root / "model")
    for k in range(6):
        write_photo(root / "first" / f"a{k}.jpg", k)
        write_photo(root / "later" / f"b{k}.png", 100 + k)
    write_photo(root / "later" / "c.webp", 200, fmt="WEBP")
    write_photo(root / "query.jpg", 300)
    lib = root / "lib.db"
    first = _run(["--db", lib, "index", root / "first", "--model", model], env)
    assert first.returncode == 0, first.stderr[-3000:]
    [verdict_path] = home.glob("backends/*/verdict.json")
    verdict = json.loads(verdict_path.read_text())
    measured = verdict["backends"]
    assert measured["onnx-fp32"]["cosine"] >= 0.995, measured
    fastest = max(m["images_per_s"] or 0 for m in measured.values())
    measured["onnx-fp32"]["images_per_s"] = fastest * 2
    verdict["chosen"] = "onnx-fp32"
    verdict_path.write_text(json.dumps(verdict))
    shim = root / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_TORCH)
    return {"root": root, "home": home, "env": env, "model": model, "lib": lib, "shim": shim}


def _stored(lib: Path, names: list[str]) -> dict[str, np.ndarray]:
    from clipsearch.store import Library

    with Library.open(lib) as library:
        _, paths, vectors = library.embeddings(library.require_default_model())
    by_name = {Path(p).name: v for p, v in zip(paths, vectors, strict=True)}
    return {n: by_name[n] for n in names}


def _reference(model_dir: Path, paths: list[Path]) -> np.ndarray:
    """The model itself in torch fp32 on the full decode of each file: normalised ``[N, D]``."""
    from clipsearch.checkpoints import load_bundle
    from clipsearch.imageio import open_image

    bundle = load_bundle(model_dir)
    with torch.no_grad():
        x = torch.stack([bundle.preprocess(open_image(p)) for p in paths])  # [N, 3, H, W]
        feats = bundle.model.encode_image(x).float()  # [N, D]
    return (feats / feats.norm(dim=-1, keepdim=True)).numpy()


def test_the_shim_really_makes_torch_impossible(settled):
    code = "import importlib, sys\ntry:\n    import torch\nexcept ImportError:\n    sys.exit(3)\n"
    env = {**os.environ, "PYTHONPATH": str(settled["shim"])}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 3


def test_index_embeds_through_the_onnx_export_without_torch(settled):
    root, lib = settled["root"], settled["lib"]
    out = _run(["--verbose", "--db", lib, "index", root / "later"], settled["env"], settled["shim"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "image backend: onnx-fp32" in out.stderr
    assert "not loaded: its ONNX export embedded" in out.stderr
    names = sorted(p.name for p in (root / "later").iterdir())
    stored = _stored(lib, names)
    reference = _reference(settled["model"], [root / "later" / n for n in names])
    for name, ref in zip(names, reference, strict=True):
        cosine = float(stored[name] @ ref / np.linalg.norm(stored[name]) / np.linalg.norm(ref))
        assert cosine >= 0.995, (name, cosine)


def test_label_uses_the_text_export_and_equals_the_model(settled):
    args = ["--db", settled["lib"], "label", "--classes", "a dog,a beach,a red car", "--json"]
    args += ["--template", "a photo of {}.", "--template", "{} in the sun"]
    free = _run(["--verbose", *args], settled["env"], settled["shim"])
    assert free.returncode == 0, free.stderr[-3000:]
    assert "torch-free text tower" in free.stderr
    with_torch = _run([*args, "--model", settled["model"]], settled["env"])
    assert with_torch.returncode == 0, with_torch.stderr[-3000:]
    a, b = json.loads(free.stdout), json.loads(with_torch.stdout)
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) >= 6
    for x, y in zip(a, b, strict=True):
        assert x["label"] == y["label"] and x["score"] == pytest.approx(y["score"], abs=1e-4)


def test_similar_and_image_queries_encode_a_new_file_through_the_export(settled):
    query = settled["root"] / "query.jpg"
    base = ["--db", settled["lib"]]
    free = _run(["--verbose", *base, "similar", query, "--json"], settled["env"], settled["shim"])
    assert free.returncode == 0, free.stderr[-3000:]
    assert "image files through the onnx-fp32 export" in free.stderr
    with_torch = _run(
        [*base, "query", "--image", query, "--model", settled["model"], "--json"], settled["env"]
    )
    assert with_torch.returncode == 0, with_torch.stderr[-3000:]
    a, b = json.loads(free.stdout), json.loads(with_torch.stdout)
    assert [h["path"] for h in a][:5] == [h["path"] for h in b][:5]
    assert [h["score"] for h in a][:5] == pytest.approx([h["score"] for h in b][:5], abs=2e-3)
    mixed = _run(
        [*base, "query", "--image", query, "--add", "a dog", "-n", "3"], settled["env"], settled["shim"]
    )
    assert mixed.returncode == 0 and len(mixed.stdout.splitlines()) == 3, mixed.stderr[-3000:]
    text = _run([*base, "query", "a dog", "-n", "3"], settled["env"], settled["shim"])
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 3, text.stderr[-3000:]


def _post_upload(url: str, token: str, picture: bytes) -> tuple[int, str]:
    """POST ``picture`` to the web's /upload as the page's form does: ``(status, Location)``."""
    boundary = "clipsearch-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{token}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + picture
        + f"\r\n--{boundary}--\r\n".encode()
    )
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request("POST", "/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, response.getheader("Location") or ""


def test_web_upload_encodes_the_picture_through_the_export(settled):
    """A picture dropped on ``clipsearch web`` goes the way ``query --image`` does: no torch."""
    from web_helpers import ServerProcess

    query = settled["root"] / "query.jpg"
    path = os.pathsep.join([str(settled["shim"]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    site = types.SimpleNamespace(db=settled["lib"], env={**settled["env"], "PYTHONPATH": path})
    server = ServerProcess(site)
    try:
        with urllib.request.urlopen(server.url, timeout=60) as page:
            token = re.search(r'name="csrf" value="([^"]+)"', page.read().decode()).group(1)
        status, location = _post_upload(server.url, token, query.read_bytes())
        assert status == 303 and location.startswith("/?image="), (status, location)
        with urllib.request.urlopen(server.url + location, timeout=60) as page:
            html = page.read().decode()
    finally:
        err = server.stop()
    assert "Traceback" not in err, err[-3000:]
    ids = [int(i) for i in re.findall(r'<a href="/photo/(\d+)"', html)]
    scores = [float(s) for s in re.findall(r'class="score">([-0-9.]+)<', html)]
    base = ["--db", settled["lib"], "query", "--image", query, "--json", "-n", "5"]
    with_torch = _run([*base, "--model", settled["model"]], settled["env"])
    assert with_torch.returncode == 0, with_torch.stderr[-3000:]
    expected = json.loads(with_torch.stdout)
    assert ids[:5] == [h["image_id"] for h in expected]
    assert scores[:5] == pytest.approx([h["score"] for h in expected], abs=3e-3)


def test_without_a_verdict_index_loads_the_model_and_says_so(settled, tmp_path):
    """A new home (no exports): the same command needs torch, and the shim makes it fail loudly."""
    env = {**settled["env"], "CLIPSEARCH_HOME": str(tmp_path)}
    out = _run(
        ["--db", tmp_path / "l.db", "index", settled["root"] / "first", "--model", settled["model"]],
        env,
        settled["shim"],
    )
    assert out.returncode != 0


def test_index_of_a_folder_without_photos_loads_no_model(settled, tmp_path):
    """Even on a new home (no verdict, no exports: any model load would need torch)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    env = {**settled["env"], "CLIPSEARCH_HOME": str(tmp_path / "home")}
    args = ["--db", tmp_path / "l.db", "index", tmp_path / "empty", "--model", settled["model"]]
    out = _run(args, env, settled["shim"])
    assert out.returncode == 1 and "no images found" in out.stderr and "Traceback" not in out.stderr, (
        out.stderr[-2000:]
    )


class _CountingServer(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (the http.server API)
        type(self).hits.append(self.path)
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_index_of_a_folder_without_photos_downloads_nothing(tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        shim = tmp_path / "shim"
        shim.mkdir()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/ViT-B-32.pt"
        (shim / "sitecustomize.py").write_text(
            textwrap.dedent(
                f"""
                from clipsearch.pretrained import PRETRAINED  # the default model, served from 127.0.0.1
                PRETRAINED["ViT-B-32/openai"]["url"] = {url!r}
                """
            )
        )
        env = {"CLIPSEARCH_HOME": str(tmp_path / "home")}
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("no photos here")
        out = _run(["--db", tmp_path / "l.db", "index", tmp_path / "empty"], env, shim)
        assert out.returncode == 1 and "no images found" in out.stderr, out.stderr[-2000:]
        assert _CountingServer.hits == []
        # the same command on a folder with a photo does go to that server: the count can fail
        write_photo(tmp_path / "photos" / "a.jpg", 1)
        out = _run(["--db", tmp_path / "l.db", "index", tmp_path / "photos"], env, shim)
        assert out.returncode != 0 and _CountingServer.hits == ["/ViT-B-32.pt"], (
            _CountingServer.hits,
            out.stderr,
        )
    finally:
        httpd.shutdown()
