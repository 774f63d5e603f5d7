"""The import rules of docs/architecture.md, checked on the source (no module is imported).

Every ``import`` and ``from ... import`` counts, also those inside functions (a lazy import is still a
dependency), and so does ``importlib.import_module`` with a literal name (or an f-string's literal start).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from cf_testing.comfyui import REPO_ROOT

# Import name -> source folder, as pyproject's [tool.setuptools.package-dir] maps them.
ROOTS = {
    "charforge": REPO_ROOT / "custom_nodes" / "charforge",
    "charforge.driver": REPO_ROOT / "driver",
    "charforge.recipes": REPO_ROOT / "recipes",
}
# ComfyUI's own top-level modules: only the bridge may import them.
COMFYUI_MODULES = {
    "comfy",
    "comfy_api",
    "comfy_extras",
    "comfy_execution",
    "folder_paths",
    "server",
    "execution",
    "nodes",
    "latent_preview",
    "node_helpers",
}
HEAVY = {"torch", "numpy"}


def _module_name(path: Path) -> str:
    for name, folder in sorted(ROOTS.items(), key=lambda item: -len(item[0])):
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([name, *parts])
    raise AssertionError(path)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in ROOTS.values():
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _dynamic_name(call: ast.Call) -> str | None:
    """The module an ``importlib.import_module(...)`` call names, when its start is written out."""
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if called != "import_module" or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = str(arg.values[0].value)
        return prefix.rsplit(".", 1)[0] if "." in prefix else None  # "charforge.engine.x{...}" -> its package
    return None


def imports(name: str) -> Iterator[tuple[str, int]]:
    """(absolute module name, line) of every import in module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # `from . import bridge` imports the module charforge.bridge
                if f"{target}.{alias.name}" in MODULES:
                    yield f"{target}.{alias.name}", node.lineno
        elif isinstance(node, ast.Call):
            dynamic = _dynamic_name(node)
            if dynamic:
                yield dynamic, node.lineno


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(part: str, forbidden) -> list[str]:
    """``path:line imports name`` for every import of a module under `part` that `forbidden(target, module)`."""
    found = []
    for name in MODULES:
        if not _under(name, part):
            continue
        for target, line in imports(name):
            if forbidden(target, name):
                found.append(f"{MODULES[name].relative_to(REPO_ROOT)}:{line} imports {target}")
    return found


def _assert_none(found: list[str]) -> None:
    assert not found, "forbidden imports:\n" + "\n".join(found)


def test_the_scan_sees_every_part():
    for part in (
        "charforge.bridge",
        "charforge.engine",
        "charforge.nodes",
        "charforge.common",
        "charforge.driver",
        "charforge.recipes",
    ):
        assert any(_under(name, part) for name in MODULES), part
    # ...and lazy imports: the bridge reaches ComfyUI only through importlib.
    assert {"folder_paths", "comfy.utils"} <= {target for target, _ in imports("charforge.bridge")}


def test_engine_never_imports_the_driver_or_recipes():
    _assert_none(
        _violations(
            "charforge.engine", lambda target, _: _under(target, "charforge.driver", "charforge.recipes")
        )
    )


def test_driver_never_imports_the_pack_recipes_or_torch():
    """The driver talks to servers only: it runs where neither torch nor the node pack's packages are."""
    pack = (
        "charforge.engine",
        "charforge.nodes",
        "charforge.bridge",
        "charforge.pack",
        "charforge.deps",
        "charforge.catalogue",
    )
    _assert_none(
        _violations("charforge.driver", lambda target, _: _under(target, *pack, "charforge.recipes", *HEAVY))
    )


def test_only_the_bridge_imports_comfyui():
    def comfyui(target: str, name: str) -> bool:
        return target.split(".")[0] in COMFYUI_MODULES and name != "charforge.bridge"

    _assert_none(_violations("charforge", comfyui))


def test_common_imports_nothing_of_ours_and_nothing_heavy():
    def forbidden(target: str, _: str) -> bool:
        return _under(target, "charforge", *HEAVY) and not _under(target, "charforge.common")

    _assert_none(_violations("charforge.common", forbidden))


def test_recipes_never_reach_into_comfyui_or_the_node_adapters():
    """Recipes use the driver, the engine and common; the adapters and the bridge belong to ComfyUI's process."""
    _assert_none(
        _violations(
            "charforge.recipes",
            lambda target, _: _under(target, "charforge.nodes", "charforge.bridge", "charforge.pack"),
        )
    )


def import_cycles(part: str) -> list[list[str]]:
    """Import cycles between the modules under `part` (each as the modules on it, first repeated at the end)."""
    graph = {
        name: sorted({t for t, _ in imports(name) if t in MODULES and _under(t, part) and t != name})
        for name in MODULES
        if _under(name, part)
    }
    cycles: list[list[str]] = []
    # Tarjan's strongly connected components: every component of more than one module holds a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(_one_cycle(graph, sorted(component)))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def _one_cycle(graph: dict[str, list[str]], component: list[str]) -> list[str]:
    """A shortest path from the component's first module back to itself (what the failure message shows)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in graph[node]:
            if nxt == start:
                return paths[node] + [start]
            if nxt in members and nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    return component


def test_the_cycle_finder_reports_a_cycle():
    graph = {"a": ["b"], "b": ["c", "d"], "c": ["a"], "d": []}
    assert _one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_driver_modules_import_no_cycle():
    cycles = import_cycles("charforge.driver")
    assert cycles == [], "import cycles in driver/: " + "; ".join(" -> ".join(c) for c in cycles)
