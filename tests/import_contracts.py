"""An import-linter contract type: no import cycle among the modules of a package, module by
module, imports inside functions included (grimp reads every ``import`` statement, wherever it
stands). import-linter's own ``acyclic_siblings`` squashes a subpackage into one node, and the
engine package has one (``engine.integrations``) whose modules stand on both sides of
``engine.engine``: ``Engine.httpx_client`` builds a governed transport, and the gateway opens an
``Engine``.

Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so an import counts as one of
each package above the module too (unless the importer is inside that package, already running):
a package that re-exports what imports one of its own importers is a cycle that fails at import
time, and it is reported. Imports made only for type checking (``if TYPE_CHECKING:``) are left
out: they never run.

In pyproject.toml::

    contract_types = ["acyclic_modules: tests.import_contracts.AcyclicModulesContract"]
    [[tool.importlinter.contracts]]
    type = "acyclic_modules"
    containers = ["engine"]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grimp
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def module_edges(graph: grimp.ImportGraph, container: str) -> dict[str, set[str]]:
    """Every module of ``container`` and the modules of it that importing it runs."""
    modules = graph.find_descendants(container) | {container}
    edges: dict[str, set[str]] = {}
    for importer in modules:
        targets = edges.setdefault(importer, set())
        for imported in graph.find_modules_directly_imported_by(importer):
            parts = imported.split(".")
            for n in range(1, len(parts) + 1):
                target = ".".join(parts[:n])
                if target in modules and importer != target and not importer.startswith(target + "."):
                    targets.add(target)
    return edges


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's, without recursion),
    each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


class AcyclicModulesContract(Contract):
    type_name = "acyclic_modules"

    containers = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        containers: list[str] = list(self.containers)  # type: ignore[call-overload]
        runtime = grimp.build_graph(*containers, exclude_type_checking_imports=True)
        found = []
        for container in containers:
            edges = module_edges(runtime, container)
            for component in cycles(edges):
                members = set(component)
                found.append([(a, b, [d["line_number"] for d in runtime.get_import_details(importer=a, imported=b)])
                              for a in component for b in sorted(edges[a] & members)])
        return ContractCheck(kept=not found, warnings=[], metadata={"cycles": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for imports in check.metadata["cycles"]:
            output.print_error("These modules import each other, in a cycle:")
            for importer, imported, lines in imports:
                where = f" (l. {', '.join(map(str, lines))})" if lines else " (importing its package)"
                output.print_error(f"- {importer} -> {imported}{where}")
            output.new_line()
