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
