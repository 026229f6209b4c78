"""docs/design.md §5's import rules, checked on the source: the codec and the store never import trio
or socket (nor does anything they import from the project); tmemclient never imports tmemd."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tmemclient", "tmemd")

# Pure parts: the codec and the store (with the policy it uses), and the session handler that
# only turns decoded messages into replies.
PURE = (
    "tmemclient.wire.codec",
    "tmemclient.wire.messages",
    "tmemclient.wire.layout",
    "tmemd.store",
    "tmemd.policy",
    "tmemd.session",
)
NO_IO = {"trio", "socket"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in the file names, anywhere in it (functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


SOURCES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in SOURCES.items()}


def closure(root: str) -> set[str]:
    """``root`` and every project module it imports, transitively."""
    seen = {root}
    todo = [root]
    while todo:
        for name in GRAPH[todo.pop()]:
            if name in SOURCES and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_the_rules_see_the_whole_project() -> None:
    assert set(PURE) <= SOURCES.keys()
    assert "tmemd.server" in SOURCES and "tmemclient.client" in SOURCES
    assert "trio" in GRAPH["tmemd.server"]  # the scan finds what is there


@pytest.mark.parametrize("root", PURE)
def test_pure_parts_import_no_io(root: str) -> None:
    reached = {
        (module, name.split(".")[0])
        for module in closure(root)
        for name in GRAPH[module]
        if name.split(".")[0] in NO_IO
    }
    assert not reached, f"{root} reaches I/O modules: {sorted(reached)}"


def test_tmemclient_never_imports_tmemd() -> None:
    bad = {
        (module, name)
        for module, names in GRAPH.items()
        if module.startswith("tmemclient")
        for name in names
        if name.split(".")[0] == "tmemd"
    }
    assert not bad, sorted(bad)
