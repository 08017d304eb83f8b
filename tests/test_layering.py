"""How the package is put together: rules a reader relies on, checked on the source itself."""

import ast
import re
from pathlib import Path

import clipsearch

PACKAGE = Path(clipsearch.__file__).parent
# Statements that only a SQL string starts with; a string counts when it reads as one.
_SQL = re.compile(
    r"^\s*(SELECT\s.+\sFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+"
    r"(TABLE|INDEX|VIEW|TRIGGER)|ALTER\s+TABLE|DROP\s+(TABLE|INDEX)|PRAGMA\s|BEGIN\b|COMMIT\b|ROLLBACK\b)",
    re.IGNORECASE | re.DOTALL,
)


def _strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):  # f"SELECT ... {x}": the literal pieces joined
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            yield node.lineno, text


def _sql_outside_store() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "store.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("sqlite3", "sqlite_utils", "apsw") for n in names):
                    found.append(f"{path.name}:{node.lineno}: imports a SQLite driver")
        lines = sorted({line for line, text in _strings(tree) if _SQL.match(text)})
        found += [f"{path.name}:{line}: SQL" for line in lines]
    return found


def test_sql_lives_in_the_store_only():
    assert _sql_outside_store() == []


def test_the_sql_check_sees_sql(tmp_path, monkeypatch):
    """The check above would catch a query, an f-string query and a driver import elsewhere."""
    fake = tmp_path / "clipsearch"
    fake.mkdir()
    (fake / "store.py").write_text('Q = "SELECT id FROM images"\n')
    (fake / "indexer.py").write_text(
        'import sqlite3\nA = "select id from images where x = ?"\nB = f"DELETE FROM labels WHERE id IN ({1})"\n'
        'C = "Update the index: select the photos from a folder"\n'
    )
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    found = _sql_outside_store()
    assert [f.split(":")[:2] for f in found] == [
        ["indexer.py", "1"],
        ["indexer.py", "2"],
        ["indexer.py", "3"],
    ]


# The query's route, top to bottom (docs/architecture.md): callers, the pipeline, what it uses.
_ABOVE_THE_PIPELINE = {"clipsearch.cli", "clipsearch.serve", "clipsearch.web"}
_BELOW_THE_PIPELINE = (
    "encoders",
    "fastquery",
    "tokenizer_table",
    "daemon_client",
    "vectors",
    "filters",
    "store",
)


def _imports(path: Path) -> set[str]:
    """Every clipsearch module ``path`` imports, at its top or inside a function (not those under
    ``if TYPE_CHECKING:``, which never run: annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipsearch"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from clipsearch import search`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("clipsearch"))
    return found


def _reaches(imported: set[str], modules: set[str]) -> set[str]:
    return {m for m in imported if any(m == t or m.startswith(t + ".") for t in modules)}


def test_the_query_route_goes_one_way_down():
    """Nothing below the pipeline (clipsearch.search) imports it or its callers; the pipeline
    imports none of its callers."""
    up = _ABOVE_THE_PIPELINE | {"clipsearch.search"}
    for name in _BELOW_THE_PIPELINE:
        assert _reaches(_imports(PACKAGE / f"{name}.py"), up) == set(), name
    assert _reaches(_imports(PACKAGE / "search.py"), _ABOVE_THE_PIPELINE) == set()


def test_the_route_check_sees_an_import_back_up(tmp_path):
    (tmp_path / "m.py").write_text(
        "if TYPE_CHECKING:\n    from clipsearch.cli import cli\n"
        "def f():\n    from clipsearch.search import Query\n    from clipsearch import web\n"
    )
    up = {"clipsearch.search", "clipsearch.web", "clipsearch.cli"}
    assert _reaches(_imports(tmp_path / "m.py"), up) == {
        "clipsearch.search",
        "clipsearch.search.Query",
        "clipsearch.web",
    }
