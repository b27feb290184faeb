"""The folders are the architecture: lower rooms never import higher ones, and no module cycles.

From the bottom up: the allocator; attention; scheduling (``sched``); model execution (``model``);
request I/O (``processing``); the engine; the front ends (``entrypoints`` and the plugins that
embed them elsewhere). Imports inside functions count too: a lazy import that points back up is
still a dependency, and a cycle through one still couples both ends.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {
    "baton_paged": REPO / "baton_paged",
    "baton_paged.allocator": REPO / "allocator",
    "baton_paged.attention": REPO / "attention",
    "baton_paged.plugins": REPO / "plugins",
}
FRONT_ENDS = (
    "baton_paged.entrypoints",
    "baton_paged.plugins.asgi",
    "baton_paged.plugins.ray_serve",
)
ENGINE = ("baton_paged.engine", "baton_paged.engine_parts")
ABOVE = {
    "baton_paged.allocator": ("baton_paged.attention", "baton_paged.sched", "baton_paged.model"),
    "baton_paged.attention": ("baton_paged.sched", "baton_paged.model", "baton_paged.processing"),
    "baton_paged.sched": ("baton_paged.model", "baton_paged.processing"),
    "baton_paged.model": ("baton_paged.processing",),
    "baton_paged.processing": (),
}
"""Each room, and the rooms above it (besides the engine and the front ends) it must not import."""


def module_name(package: str, path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    name = ".".join((package, *parts))
    return name.removesuffix(".__init__")


def imported(path: Path, name: str, modules: set[str]) -> set[str]:
    """The ``modules`` that ``path`` (module ``name``) imports, anywhere in it. ``from package
    import module`` depends on that module, not on the package's ``__init__``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.rsplit(".", node.level)[0]
                base = f"{package}.{base}" if base else package
            names = {f"{base}.{alias.name}" for alias in node.names}
            found.update(names & modules or {base})
    return found & modules - {name}


def import_graph() -> dict[str, set[str]]:
    sources = {
        module_name(package, path, root): path
        for package, root in ROOTS.items()
        for path in root.rglob("*.py")
    }
    return {name: imported(path, name, set(sources)) for name, path in sources.items()}


GRAPH = import_graph()


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("room", sorted(ABOVE))
def test_a_room_imports_nothing_above_it(room):
    forbidden = (*ABOVE[room], *ENGINE, *FRONT_ENDS)
    wrong = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if within(module, (room,))
        for target in sorted(targets)
        if within(target, forbidden)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_engine_imports_no_front_end():
    wrong = [
        f"{module} imports {target}"
        for module in ENGINE
        for target in GRAPH[module]
        if within(target, FRONT_ENDS)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """Depth-first search over the module graph; a back edge is a cycle."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(GRAPH[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])
