"""The contract that forbids import cycles among engine modules (tests/import_contracts.py, run
by ``lint-imports``) sees an import inside a function, and a package whose ``__init__`` runs
what imports it; an import made only for type checking never runs and is no cycle."""

from __future__ import annotations

import textwrap
from pathlib import Path

import grimp
import pytest

from tests.import_contracts import cycles, module_edges


def _cycles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> list[list[str]]:
    for name, text in files.items():
        path = tmp_path / "cyc" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyc", exclude_type_checking_imports=True, cache_dir=None)
    return cycles(module_edges(graph, "cyc"))


def test_an_import_inside_a_function_closes_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _cycles(tmp_path, monkeypatch, {
        "__init__.py": "",
        "a.py": "from cyc import b\n",
        "b.py": "def f():\n    from cyc.c import g\n",
        "c.py": "import cyc.a\ndef g(): pass\n",
        "d.py": "import cyc.a\n",
    }) == [["cyc.a", "cyc.b", "cyc.c"]]


def test_a_package_counts_as_its_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``x`` imports ``p.rules``, which runs ``p/__init__``, which imports ``p.book``, which
    imports ``x``: the cycle the budgets once had with alerts, had they been a package."""
    assert _cycles(tmp_path, monkeypatch, {
        "__init__.py": "",
        "x.py": "from cyc.p.rules import R\n",
        "p/__init__.py": "from cyc.p.rules import R\nfrom cyc.p.book import B\n",
        "p/rules.py": "class R: pass\n",
        "p/book.py": "from cyc.x import R\nclass B: pass\n",
    }) == [["cyc.p", "cyc.p.book", "cyc.x"]]


def test_an_import_for_type_checking_only_is_no_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _cycles(tmp_path, monkeypatch, {
        "__init__.py": "",
        "a.py": "from cyc import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cyc.a import A\n",
    }) == []


def test_the_engine_has_no_import_cycle() -> None:
    graph = grimp.build_graph("engine", exclude_type_checking_imports=True, cache_dir=None)
    assert cycles(module_edges(graph, "engine")) == []
