"""The ledger owns the SQL: no module outside ``engine/ledger/`` holds SQL text.

Every string constant of the product code (engine, tui, bench; docstrings aside), f-strings
with their placeholders, is read by the parser and searched for the statements a database
runs. A statement written anywhere else would be a second place that knows the schema, and
the PostgreSQL ledger could not stand in for the SQLite one behind the same interface.
(The driver imports are import-linter's to forbid, in pyproject.toml.)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "tui", "bench")
LEDGER = ROOT / "engine" / "ledger"

#: The statements of SQL, as this code base writes them (keywords in capitals).
SQL = re.compile(r"\bSELECT\b.*\bFROM\b|\bINSERT\s+(OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
                 r"|\bCREATE\s+(UNIQUE\s+)?(TABLE|INDEX|TRIGGER|VIEW)\b|\bPRAGMA\s+\w+", re.DOTALL)


def _docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring nodes (prose, never run)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _texts(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, text) of every string constant; an f-string with ``{}`` for each placeholder."""
    skip = _docstrings(tree)
    inside: set[int] = set()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = []
            for value in node.values:
                inside.add(id(value))
                parts.append(value.value if isinstance(value, ast.Constant) and isinstance(value.value, str)
                             else "{}")
            out.append((node.lineno, "".join(parts)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip | inside:
            out.append((node.lineno, node.value))
    return out


def sql_outside_the_ledger() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.is_relative_to(LEDGER):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, text in sorted(_texts(tree)):
                if SQL.search(text):
                    found.append(f"{path.relative_to(ROOT)}:{line}: {' '.join(text.split())[:80]}")
    return found


def test_no_module_outside_the_ledger_holds_sql() -> None:
    found = sql_outside_the_ledger()
    assert not found, "SQL outside engine/ledger/ (move it into a repository):\n" + "\n".join(found)


def test_the_search_finds_the_sql_it_is_for() -> None:
    """The detector itself: each kind of statement, in a plain string and an f-string, is found;
    prose and docstrings are not."""
    source = '''
"""A docstring may say SELECT x FROM y: prose."""
A = "SELECT id FROM api_tokens WHERE id = ?"
B = f"SELECT {COLUMNS} FROM providers"
C = ("INSERT INTO members (workspace, user) "
     "VALUES (?, ?)")
D = "UPDATE holds SET grant_id = ? WHERE id = ?"
E = "DELETE FROM members WHERE user = ?"
F = "CREATE TABLE e (ts INTEGER)"
G = "PRAGMA journal_mode = WAL"
H = "CREATE UNIQUE INDEX i ON e (ts)"
prose = ["select a model from the catalog", "update the policy, then set it", "a pragmatic choice",
         r"#include|SELECT |for \\(|if \\("]
'''
    texts = [text for _, text in _texts(ast.parse(source))]
    assert [t for t in texts if SQL.search(t)] == [
        "SELECT id FROM api_tokens WHERE id = ?", "SELECT {} FROM providers",
        "INSERT INTO members (workspace, user) VALUES (?, ?)", "UPDATE holds SET grant_id = ? WHERE id = ?",
        "DELETE FROM members WHERE user = ?", "CREATE TABLE e (ts INTEGER)", "PRAGMA journal_mode = WAL",
        "CREATE UNIQUE INDEX i ON e (ts)"]
