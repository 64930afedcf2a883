"""The import graph keeps the layers of DESIGN.md: the sans-IO core imports nothing of the
rest, the daemon nothing of the client, and the client takes its wire facts from
kmsd.protocol alone (read from the source with ast, so lazy imports count too)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What kmsclient may import from kmsd besides kmsd.protocol, and why.
CLIENT_MAY_USE = {
    "kmsd": "the version both commands print",
    "kmsd.addresses": "HOST:PORT syntax, the same on both command lines",
    "kmsd.eventloop": "the --loop choice, the same on both command lines",
    "kmsd.pipe": "both commands end quietly when their reader goes away",
    "kmsd.text": "one escaping of client-chosen strings in every text output",
    "kmsd.clock": "the lab clock file that kmsd --clock-file reads",
    "kmsd.cliparser": "one argument parser: errors and help alike on both command lines",
}
# The in-process fleet runs real hosts in the simulator's own process.
FLEET = "kmsclient.sim.fleet"
FLEET_MAY_USE = {"kmsd.host", "kmsd.cache"}


def modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imports(module: str, path: Path) -> set[str]:
    """Every module `module` imports, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            prefix = ".".join(base) if node.level else ""
            name = ".".join(p for p in (prefix, node.module or "") if p)
            found.add(name)
            if node.module is None:  # from . import a, b: modules themselves
                found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_resolver_of_this_test_reads_relative_imports() -> None:
    graph = dict(modules("kmsclient"))
    assert "kmsd.protocol.client" in imports("kmsclient.activation", graph["kmsclient.activation"])
    assert "kmsclient.sim.fleet" in imports("kmsclient.sim.chart", graph["kmsclient.sim.chart"])
    assert "kmsclient.licensing" in imports("kmsclient.sim.chart", graph["kmsclient.sim.chart"])
    core = dict(modules("kmsd"))["kmsd.protocol.client"]
    assert "kmsd.protocol.checks" in imports("kmsd.protocol.client", core)


def test_kmsclient_takes_wire_facts_from_kmsd_protocol_only() -> None:
    wrong = {}
    for module, path in modules("kmsclient"):
        allowed = set(CLIENT_MAY_USE) | (FLEET_MAY_USE if module == FLEET else set())
        outside = {
            name
            for name in imports(module, path)
            if within(name, "kmsd") and not within(name, "kmsd.protocol") and name not in allowed
        }
        if outside:
            wrong[module] = sorted(outside)
    assert wrong == {}


def test_the_core_imports_nothing_else_of_the_project() -> None:
    wrong = {}
    for module, path in modules("kmsd"):
        if within(module, "kmsd.protocol"):
            outside = {
                name
                for name in imports(module, path)
                if (within(name, "kmsd") and not within(name, "kmsd.protocol"))
                or within(name, "kmsclient")
            }
            if outside:
                wrong[module] = sorted(outside)
    assert wrong == {}


def test_the_daemon_imports_nothing_of_the_client() -> None:
    wrong = {
        module: sorted(n for n in imports(module, path) if within(n, "kmsclient"))
        for module, path in modules("kmsd")
    }
    assert {m: names for m, names in wrong.items() if names} == {}


def test_the_core_touches_no_socket_process_or_database() -> None:
    io = ("asyncio", "selectors", "socket", "ssl", "subprocess", "sqlite3")
    wrong = {
        module: sorted(n for n in imports(module, path) if any(within(n, m) for m in io))
        for module, path in modules("kmsd")
        if within(module, "kmsd.protocol")
    }
    assert {m: names for m, names in wrong.items() if names} == {}
