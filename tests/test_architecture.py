"""The package's layout holds: imports point one way between the wings, no module imports itself
back through a cycle, and the serving path never loads the developer tools or the doctor.

Why a test: a layering rule that only lives in README erodes with the first convenient import;
here it fails the build the day it is broken, naming the import that broke it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "oauth_sidecar"

# Each room and the rooms its modules may import at module level (besides themselves).
# config/ is the floor; the shared top-level modules (errors, request keys, logging, metrics, ...)
# sit on it; the wings use both; the app assembles the wings; the doctor and the developer
# tools stand above the app and are never imported by it.
SHARED = "shared"
APP = "app"
MAY_IMPORT: dict[str, set[str]] = {
    "config": set(),
    SHARED: {"config"},
    "auth": {"config", SHARED},
    "signin": {"config", SHARED, "auth"},
    "mcp": {"config", SHARED, "auth"},
    "upstream": {"config", SHARED, "auth", "mcp"},
    APP: {"config", SHARED, "auth", "signin", "mcp", "upstream"},
    "doctor": {"config", SHARED, "auth", "signin", "mcp", "upstream", APP},
    "devtools": {"config", SHARED, "auth", "signin", "mcp", "upstream", APP},
}
APP_MODULES = {"app", "__main__", "front_door", "health", "listener"}  # top-level, above the wings


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself: __version__
        return SHARED
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return APP if parts[1] in APP_MODULES else SHARED


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports_at_module_level(path: Path) -> set[str]:
    """Our modules this file imports outside any function (function-local imports are the
    deliberate lazy ones, e.g. __main__ loading the doctor only for `check`)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes: list[ast.AST] = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, (ast.If, ast.Try)):  # TYPE_CHECKING blocks, guarded imports
            nodes.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("oauth_sidecar"))
        elif (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
              and node.module.startswith("oauth_sidecar")):
            found.add(node.module)
            # `from oauth_sidecar.x import y` may name a submodule y
            found.update(f"{node.module}.{a.name}" for a in node.names)
    modules = _modules()
    return {name for name in found if name in modules}


def test_every_module_is_in_a_room_that_the_layering_knows() -> None:
    rooms = {_room(name) for name in _modules()}
    assert rooms <= set(MAY_IMPORT), rooms - set(MAY_IMPORT)
    assert {"config", "auth", "signin", "upstream", "doctor", "devtools"} <= rooms


def test_imports_point_one_way_between_the_rooms() -> None:
    wrong = []
    for name, path in _modules().items():
        room = _room(name)
        for imported in _imports_at_module_level(path):
            target = _room(imported)
            if target != room and target not in MAY_IMPORT[room]:
                wrong.append(f"{name} ({room}) imports {imported} ({target})")
    assert wrong == []


def test_no_module_imports_itself_back_through_a_cycle() -> None:
    graph = {name: _imports_at_module_level(path) - {name} for name, path in _modules().items()}
    # A package's __init__ imported by `from package import x` is not an edge back.
    for name, edges in graph.items():
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    on_path: list[str] = []
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        if node in on_path:
            cycles.append([*on_path[on_path.index(node):], node])
            return
        if node in done:
            return
        on_path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        on_path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert cycles == []


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["oauth_sidecar.__main__", "oauth_sidecar.app"])
def test_the_serving_path_loads_neither_the_doctor_nor_the_developer_tools(entry: str) -> None:
    probe = (
        f"import sys, {entry}\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('oauth_sidecar.')))\n"
    )
    loaded = subprocess.run(  # noqa: S603 (our own interpreter running a fixed probe)
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()
    assert "oauth_sidecar.app" in loaded  # the probe really loaded the serving path
    assert [m for m in loaded if m.startswith(("oauth_sidecar.devtools",
                                               "oauth_sidecar.doctor"))] == []
