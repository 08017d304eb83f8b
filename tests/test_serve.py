"""`clipsearch serve`: the daemon answers as the in-process path and the torch model do, notices a
re-index, refuses what it cannot answer, and `clipsearch query` falls back silently without it
(never started, stopped, killed with its socket left behind)."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clipsearch import daemon_client, fastquery, serve
from clipsearch.checkpoints import ModelBundle
from clipsearch.cli import cli
from clipsearch.configs import get_config
from clipsearch.encoders import ExportedTextEncoder, ModelEncoder
from clipsearch.filters import PhotoFilter
from clipsearch.model import build_model
from clipsearch.search import Hit, Query, Searcher, search
from clipsearch.store import Library
from clipsearch.tokenizer import Tokenizer
from clipsearch.transform import PreprocessConfig

MODEL = "test/tiny-serve"
QUERIES = [
    (Query.build("a dog on a beach"), {"top": 5}),
    (Query.build("beach", add=["sunset"], minus=["people"], minus_weight=0.5), {"top": 40}),
    (Query.build("a red car"), {"top": 10, "threshold": 0.0}),
]


def _bundle() -> ModelBundle:
    torch.manual_seed(0)
    cfg = get_config("tiny-vit")
    return ModelBundle(build_model(cfg).eval(), PreprocessConfig(image_size=64), Tokenizer(), MODEL, cfg)


def _add(lib, folder, vectors, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    with lib.transaction():
        for i, v in enumerate(vectors, start):
            image_id = lib.add_image(folder / f"{i}.jpg", size=1, mtime_ns=1, content_hash=f"h{i}")
            lib.put_embedding(image_id, MODEL, v)


def _unit(n, seed):
    v = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def library(tmp_path):
    bundle = _bundle()
    fastquery.ensure_text_encoder(bundle)
    lib = Library.open(tmp_path / "lib.db", create=True)
    lib.register_model(MODEL, "test", dim=32)
    _add(lib, tmp_path / "photos" / "a", _unit(30, 0))
    _add(lib, tmp_path / "photos" / "b", _unit(10, 1), start=30)
    yield lib, bundle, tmp_path
    lib.close()


@pytest.fixture
def daemon(library):
    lib = library[0]
    messages = []
    server = serve.QueryServer(lib.path, log=messages.append)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.messages = messages
    yield server
    server.shutdown()
    thread.join(timeout=10)
    server.close()


def _kw(options: dict) -> dict:
    """The daemon's tests write options as dicts; ``under`` is a filter."""
    options = dict(options)
    under = options.pop("under", None)
    return {**options, "filters": PhotoFilter(under=under)}


def _ask(path, query, options: dict):
    """The daemon's hits, as the pipeline makes them (None: it did not answer)."""
    hits = daemon_client.ask(path, query, **_kw(options))
    return None if hits is None else [Hit(*h) for h in hits]


def _same(a, b, atol=1e-5):
    assert [h.image_id for h in a] == [h.image_id for h in b]
    assert [h.path for h in a] == [h.path for h in b]
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-4, atol=atol)


def test_served_hits_equal_the_in_process_path_and_the_torch_model(library, daemon):
    lib, bundle, tmp_path = library
    options_under = {"top": 20, "under": tmp_path / "photos" / "b"}
    for query, options in [*QUERIES, (Query.build("a dog"), options_under)]:
        served = _ask(lib.path, query, options)
        assert served is not None and served, query
        _same(served, search(lib, ExportedTextEncoder(MODEL), query, **_kw(options)))
        _same(served, search(lib, ModelEncoder(bundle), query, **_kw(options)))  # the model itself, in torch
    assert daemon.answered == 4 and daemon.refused == 0
    assert all(h.path.parent.name == "b" for h in _ask(lib.path, Query.build("a dog"), options_under))
    high = _ask(lib.path, Query.build("a red car"), {"top": 40, "threshold": 0.2})
    assert all(h.score >= 0.2 for h in high)


def test_the_socket_is_private_and_keyed_by_the_library(library, daemon, tmp_path, monkeypatch):
    lib = library[0]
    path = daemon_client.socket_path(lib.path)
    assert path == daemon.socket_path and path.parent == fastquery.cache_dir("x").parents[1] / "serve"
    assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    # another spelling of the same file is the same library; another file is another one
    monkeypatch.chdir(tmp_path)
    assert daemon_client.socket_path("lib.db") == path
    assert daemon_client.socket_path(tmp_path / "other.db") != path
    assert _ask(tmp_path / "other.db", Query.build("a dog"), {"top": 3}) is None  # no daemon


def test_a_reindex_is_noticed_while_serving(library, daemon):
    lib, bundle, tmp_path = library
    query = Query.build("a small boat")
    before = _ask(lib.path, query, {"top": 5})
    target = fastquery.text_features(MODEL, ["a small boat"])  # [1, 32]
    _add(lib, tmp_path / "photos" / "new", np.repeat(target, 3, axis=0), start=100)  # a re-index
    after = _ask(lib.path, query, {"top": 5})
    assert {h.path.parent.name for h in after[:3]} == {"new"} and after[0].score == pytest.approx(
        1.0, abs=1e-5
    )
    assert [h.image_id for h in after] != [h.image_id for h in before]
    _same(after, search(lib, ExportedTextEncoder(MODEL), query, top=5))
    assert daemon.reloads >= 1
    with lib.transaction():  # photos removed: they leave the served results too
        lib.remove_images([h.image_id for h in after[:3]])
    _same(_ask(lib.path, query, {"top": 5}), before)


def test_a_library_deleted_and_made_again_is_reopened(library, daemon):
    import shutil

    lib, bundle, tmp_path = library
    query = Query.build("a dog")
    before = _ask(lib.path, query, {"top": 5})
    lib.close()
    for p in tmp_path.glob("lib.db*"):  # the database, its WAL files and the FAISS index folder
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    with Library.open(tmp_path / "lib.db", create=True) as again:
        again.register_model(MODEL, "test", dim=32)
        _add(again, tmp_path / "photos" / "c", _unit(12, 7))
        after = _ask(again.path, query, {"top": 5})
        assert after is not None and {h.path.parent.name for h in after} == {"c"}
        _same(after, search(again, ExportedTextEncoder(MODEL), query, top=5))
    assert [h.image_id for h in before] != [h.image_id for h in after] and daemon.reloads >= 1


def test_what_the_daemon_cannot_answer_is_refused_and_it_keeps_serving(library, daemon, tmp_path):
    lib = library[0]
    assert _ask(lib.path, Query.build("   "), {"top": 3}) is None  # empty text: the caller's error
    assert _ask(lib.path, Query.build("dog", minus=["dog"]), {"top": 3}) is None  # cancels out
    assert _ask(lib.path, Query.build(image="x.jpg"), {"top": 3}) is None  # never sent
    assert daemon.refused == 2 and all("refused" in m for m in daemon.messages)
    for raw in (
        b"not json\n",
        b'{"version": 99}\n',
        json.dumps({"version": 1, "library": "/other.db"}).encode() + b"\n",
    ):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(daemon.socket_path))
            sock.sendall(raw)
            reply = json.loads(daemon_client._read_line(sock))
        assert reply["ok"] is False and "bad request" in reply["error"], raw
    assert daemon.refused == 5
    assert len(_ask(lib.path, Query.build("a dog"), {"top": 3})) == 3  # still serving
    assert daemon.answered == 1


def test_a_second_daemon_is_refused_and_a_stale_socket_replaced(library, tmp_path):
    lib = library[0]
    path = daemon_client.socket_path(lib.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound and closed without listening: what a killed daemon leaves
    stale.close()
    assert path.exists() and _ask(lib.path, Query.build("a dog"), {"top": 3}) is None
    with serve.QueryServer(lib.path) as first:
        thread = threading.Thread(target=first.serve_forever, daemon=True)
        thread.start()
        try:
            assert len(_ask(lib.path, Query.build("a dog"), {"top": 3})) == 3
            with pytest.raises(serve.ServeError, match="already serving"):
                serve.QueryServer(lib.path)
            assert len(_ask(lib.path, Query.build("a dog"), {"top": 3})) == 3  # untouched
        finally:
            first.shutdown()
            thread.join(timeout=10)
    assert not path.exists()  # removed on close


def test_two_daemons_started_at_once_never_both_serve(library, monkeypatch):
    """Both may find the old socket of a killed daemon dead; the second must not then unlink the
    first's live socket (leaving it serving nobody). The daemon lock decides, before any warm-up."""
    lib = library[0]
    with serve.QueryServer(lib.path) as first:
        thread = threading.Thread(target=first.serve_forever, daemon=True)
        thread.start()
        try:
            warmed = []
            with monkeypatch.context() as m:
                m.setattr(serve, "_answers", lambda path: False)  # it looked dead a moment ago
                m.setattr(Searcher, "warm_up", lambda self, say=None: warmed.append(self))
                with pytest.raises(serve.ServeError, match="already serving"):
                    serve.QueryServer(lib.path)
            assert warmed == []  # refused before loading anything
            assert len(_ask(lib.path, Query.build("a dog"), {"top": 3})) == 3  # the first still answers
        finally:
            first.shutdown()
            thread.join(timeout=10)
    with serve.QueryServer(lib.path):  # the lock went with the first: the next daemon starts
        pass


def test_an_unsafe_socket_folder_is_made_private_and_a_too_long_path_refused(library, tmp_path):
    lib = library[0]
    folder = daemon_client.socket_path(lib.path).parent
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    with serve.QueryServer(lib.path):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    with pytest.raises(serve.ServeError, match="longer than unix sockets allow"):
        serve.QueryServer(lib.path, socket=tmp_path / ("x" * 120) / "s.sock")


def test_a_socket_path_too_long_is_said_with_verbose(library, monkeypatch, caplog):
    """The query ran by itself without a word of why, even with --verbose."""
    lib = library[0]
    long_home = lib.path.parent / ("h" * 110)
    monkeypatch.setenv("CLIPSEARCH_HOME", str(long_home))
    with caplog.at_level("INFO", logger="clipsearch.daemon_client"):
        assert daemon_client.ask(lib.path, Query.build("a dog"), top=3) is None
    assert "too long for unix sockets" in caplog.text


def test_a_daemon_that_never_replies_is_given_up_on(library):
    lib = library[0]
    path = daemon_client.socket_path(lib.path)
    path.parent.mkdir(parents=True, mode=0o700)
    with socket.socket(socket.AF_UNIX) as hung:
        hung.bind(str(path))
        hung.listen()  # accepts connections (the kernel does), never answers
        start = time.perf_counter()
        assert daemon_client.ask(lib.path, Query.build("a dog"), top=3, timeout=0.5) is None
        assert 0.4 < time.perf_counter() - start < 5


def test_a_socket_in_a_folder_others_can_open_is_never_asked(library):
    """On a shared home another user could plant a listener: the client asks only a socket of its
    own user in a folder nobody else can open (the daemon makes it so; see the test above)."""
    lib = library[0]
    path = daemon_client.socket_path(lib.path)
    path.parent.mkdir(parents=True, mode=0o700)
    os.chmod(path.parent, 0o755)
    with socket.socket(socket.AF_UNIX) as planted:
        planted.bind(str(path))
        planted.listen()
        planted.settimeout(0.2)
        assert _ask(lib.path, Query.build("a dog"), {"top": 3}) is None
        with pytest.raises(TimeoutError):
            planted.accept()  # no connection was even made
        os.chmod(path.parent, 0o700)  # the same socket in a private folder is asked
        assert daemon_client.ask(lib.path, Query.build("a dog"), top=3, timeout=0.3) is None
        conn, _ = planted.accept()
        conn.close()


def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.output


def test_cli_query_uses_the_daemon_and_runs_alone_without_it(library, daemon):
    lib = library[0]
    args = ["--db", str(lib.path), "query", "a dog on a beach", "--minus", "people", "--top", "7", "--json"]
    code, served = _run(args)
    assert code == 0 and daemon.answered == 1
    code, bad = _run(["--db", str(lib.path), "query", "dog", "--minus", "dog"])
    assert code == 1 and "cancel out" in bad  # refused by the daemon, then met in-process
    daemon.shutdown()
    daemon.close()
    code, alone = _run(args)
    assert code == 0 and daemon.answered == 1
    a, b = json.loads(served), json.loads(alone)
    assert [(h["rank"], h["path"], h["image_id"]) for h in a] == [
        (h["rank"], h["path"], h["image_id"]) for h in b
    ]
    np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-5)


def test_a_served_query_process_imports_neither_numpy_nor_the_model(library, daemon):
    """`query TEXT` and `similar ID` (an indexed photo) are answered by the daemon: the process that
    asks imports nothing heavy."""
    lib = library[0]
    photo = lib.images()[3].id
    for n, command in enumerate((["query", "a dog"], ["similar", str(photo)]), start=1):
        out = subprocess.run(
            [
                sys.executable,
                "-X",
                "importtime",
                "-m",
                "clipsearch",
                "--db",
                str(lib.path),
                *command,
                "--paths",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=os.environ.copy(),
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert len(out.stdout.splitlines()) == 20 and daemon.answered == n, command
        imported = {
            line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")
        }
        heavy = {"numpy", "torch", "faiss", "onnxruntime", "rich", "tokenizers"}
        assert imported and not (heavy & imported), (command, heavy & imported)
    assert out.stdout.splitlines()[0] == str(lib.images()[3].path)  # the photo itself first


def _wait_for(predicate, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_the_serve_command_stops_cleanly_and_a_killed_one_leaves_queries_working(library):
    lib = library[0]
    path = daemon_client.socket_path(lib.path)
    command = [sys.executable, "-m", "clipsearch", "--db", str(lib.path), "serve"]
    query = Query.build("a dog")
    reference = search(lib, ExportedTextEncoder(MODEL), query, top=5)

    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert _wait_for(lambda: _ask(lib.path, query, {"top": 5}) is not None), "the daemon never answered"
        _same(_ask(lib.path, query, {"top": 5}), reference)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "Serving" in err and "Stopped after 2 queries" in err
        assert not path.exists()
    finally:
        proc.kill()
        proc.wait()

    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        assert _wait_for(lambda: _ask(lib.path, query, {"top": 5}) is not None)
        proc.kill()  # SIGKILL: no clean-up, the socket stays behind
        proc.wait()
        assert path.exists()
        start = time.perf_counter()
        assert _ask(lib.path, query, {"top": 5}) is None
        assert time.perf_counter() - start < 1.0  # a stale socket is refused at once, not waited on
        code, out = _run(["--db", str(lib.path), "query", "a dog", "--top", "5", "--paths"])
        assert code == 0 and out.splitlines() == [str(h.path) for h in reference]
    finally:
        proc.kill()
        proc.wait()


def test_serve_without_a_library_or_images_is_one_line(tmp_path):
    code, out = _run(["--db", str(tmp_path / "none.db"), "serve"])
    assert code == 1 and "no library at" in out
    Library.open(tmp_path / "empty.db", create=True).close()
    code, out = _run(["--db", str(tmp_path / "empty.db"), "serve"])
    assert code == 1 and "has no images yet" in out
