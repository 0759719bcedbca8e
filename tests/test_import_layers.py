"""Imports go one way: a module may import its own layer and the layers below it, never above.

    0 shared    errors, registry, _checks, _aliases, importpath, ops/, io, allocator
    1 data      data/
    2 models    models/
    3 losses    losses/
    4 distill   distill/ (distiller, taps, connectors, multitask, layers, onpolicy;
                distill/teacher/: teacher sources, stores, speed-up)
    5 engine    engine/
    6 tasks     tasks/ (with the problem metrics)
    7 recipes   recipes/
    8 front     report/, compress/, export, cli, __init__, __main__
    9 integrations  integrations/ (Hugging Face Trainer, Lightning, trackers): other people's
                loops around the public API; nothing in kdistill imports them

Every `import kdistill…` counts, including those inside functions (a late import is still a
dependency). The README's architecture section and docs/architecture.md show the same layout.

And no module imports in a circle: over the graph of module → imported module (importing
`a.b.c` also runs the packages `a.b` and `a`, so it depends on their `__init__` too, except the
packages the importing module is itself inside), no strongly connected set of two or more
modules. Each detector is proven on planted files: a test that cannot fail is a defect.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kdistill"

LAYERS = {
    "errors": 0, "registry": 0, "_checks": 0, "_aliases": 0, "ops": 0, "io": 0,
    "importpath": 0, "allocator": 0,
    "data": 1,
    "models": 2,
    "losses": 3,
    "distill": 4,
    "engine": 5,
    "tasks": 6,
    "recipes": 7,
    "report": 8, "compress": 8, "export": 8, "cli": 8, "__init__": 8,
    "__main__": 8, "examples": 8,
    "integrations": 9,
}  # fmt: skip


def layer_of(parts: list[str]) -> int:
    head = parts[0] if parts else "__init__"
    if head not in LAYERS:
        raise AssertionError(f"kdistill.{'.'.join(parts)}: no layer assigned; add it to LAYERS")
    return LAYERS[head]


def kdistill_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("kdistill")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "kdistill":
                found += [(node.lineno, f"kdistill.{a.name}") for a in node.names]
            elif node.module.startswith("kdistill."):
                found.append((node.lineno, node.module))
    return found


def module_name(path: Path, root: Path) -> str:
    """`kdistill.a.b` for root/a/b.py, `kdistill.a` for root/a/__init__.py."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["kdistill", *parts])


def import_graph(root: Path) -> dict[str, set[str]]:
    """module → the kdistill modules it imports (names that are not modules, as in
    ``from kdistill.x import Name``, count as their module `kdistill.x`), with the packages above
    an imported module that the importer is not itself inside."""
    paths = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if path.name == "__init__.py":
            own_packages.add(name)
        edges: set[str] = set()
        for _, imported in kdistill_imports(path):
            while imported not in paths and "." in imported:  # a name inside a module
                imported = imported.rsplit(".", 1)[0]
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in paths and target not in own_packages and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of two or more modules (Tarjan), each sorted: every module in
    one reaches every other by imports, so they import in a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_modules_import_each_other_in_a_circle():
    graph = import_graph(SRC)
    assert "kdistill.distill.distiller" in graph["kdistill.engine.loop"]  # the graph is real
    found = circles(graph)
    assert not found, "modules that import each other in a circle:\n" + "\n".join(
        " ⇄ ".join(component) for component in found
    )


def test_the_circle_detector_sees_a_planted_circle(tmp_path):
    # a → b → c → a through a `from … import Name` and a late import, and a package whose
    # __init__ imports a submodule that imports a module that imports the package back
    root = tmp_path / "kdistill"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text("from kdistill.b import thing\n")
    (root / "b.py").write_text("def f():\n    import kdistill.c\n")
    (root / "c.py").write_text("import kdistill.a\n")
    (root / "pkg" / "__init__.py").write_text("from kdistill.pkg.inner import X\n")
    (root / "pkg" / "inner.py").write_text("from kdistill.outside import Y\n")
    (root / "outside.py").write_text("from kdistill.pkg.other import Z\n")  # runs pkg/__init__
    (root / "pkg" / "other.py").write_text("")
    (root / "fine.py").write_text("import kdistill.a\n")
    graph = import_graph(root)
    assert graph["kdistill.a"] == {"kdistill.b"}
    assert graph["kdistill.pkg.inner"] == {"kdistill.outside"}  # its own package is not an edge
    assert circles(graph) == [
        ["kdistill.a", "kdistill.b", "kdistill.c"],
        ["kdistill.outside", "kdistill.pkg", "kdistill.pkg.inner"],
    ]
    (root / "c.py").write_text("")
    (root / "outside.py").write_text("from kdistill.pkg.other import Z\n")
    (root / "pkg" / "inner.py").write_text("")
    assert circles(import_graph(root)) == []


def test_no_module_imports_a_layer_above_its_own():
    upward = upward_imports(SRC)
    assert not upward, "imports that go upward:\n" + "\n".join(upward)


def upward_imports(root: Path) -> list[str]:
    upward = []
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        own = layer_of(parts)
        for line, module in kdistill_imports(path):
            target = layer_of(module.split(".")[1:])
            if target > own:
                upward.append(
                    f"{path.relative_to(root)}:{line} (layer {own}) imports {module} "
                    f"(layer {target})"
                )
    return upward


def test_the_checker_sees_an_upward_import(tmp_path):
    # the detector itself must work: a models module importing losses is flagged
    module = tmp_path / "m.py"
    module.write_text("from kdistill.losses.detection import YOLOLoss\nimport kdistill.engine\n")
    imports = kdistill_imports(module)
    assert [layer_of(m.split(".")[1:]) for _, m in imports] == [3, 5]
    assert layer_of(["models", "dense"]) < layer_of(["losses", "detection"])


def test_the_checker_flags_planted_upward_imports_in_the_new_rooms(tmp_path):
    # distill below engine, engine below tasks and recipes: each planted import is reported
    root = tmp_path / "kdistill"
    for folder in ("distill/teacher", "engine", "tasks", "recipes"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "distill" / "teacher" / "source.py").write_text(
        "def late():\n    from kdistill.engine.loop import fit\n"
    )
    (root / "engine" / "loop.py").write_text("from kdistill.tasks import get_task\n")
    (root / "tasks" / "metrics.py").write_text("import kdistill.recipes.runner\n")
    (root / "recipes" / "runner.py").write_text("from kdistill.distill.distiller import Term\n")
    found = upward_imports(root)
    assert [line.split(" ")[0] for line in found] == [
        "distill/teacher/source.py:2",
        "engine/loop.py:1",
        "tasks/metrics.py:1",
    ]


# -- the engine knows no problem, no language model and no concrete teacher source ---------------
ENGINE_MUST_NOT_SAY = re.compile(r"TopKDistribution|OnPolicy|kjv|fashion|scenes")
CONCRETE_SOURCES = {
    "TeacherCache",
    "TokenTeacherCache",
    "MemoryTeacherOutputs",
    "LiveTeacher",
    "LookupSource",
    "OnPolicy",
    "OnPolicyTransform",
}


def engine_mentions(folder: Path) -> list[str]:
    """Lines of `folder`'s modules naming a problem, a language-model type or a dataset (in any
    text), or a concrete teacher source / batch transform in code (imports and names)."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        text = path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            if ENGINE_MUST_NOT_SAY.search(line):
                found.append(f"{path.name}:{number}: {line.strip()}")
        for node in ast.walk(ast.parse(text)):
            names = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.ImportFrom):
                names = [alias.name for alias in node.names]
            concrete = [name for name in names if name in CONCRETE_SOURCES]
            found += [f"{path.name}:{node.lineno}: names {name}" for name in concrete]
    return found


def test_the_engine_names_no_problem_language_model_or_concrete_teacher_source():
    found = engine_mentions(SRC / "engine")
    assert not found, "the engine should only see the protocols:\n" + "\n".join(found)


def test_the_engine_check_sees_planted_mentions(tmp_path):
    (tmp_path / "loop.py").write_text(
        '"""Reads kjv blocks."""\n'
        "from kdistill.distill.teacher.store import TeacherCache\n"
        "def f(source):\n    return isinstance(source, store.MemoryTeacherOutputs)\n"
    )
    found = engine_mentions(tmp_path)
    assert [line.split(": ", 1)[0] for line in found] == ["loop.py:1", "loop.py:2", "loop.py:4"]


def test_compress_writes_through_the_run_store_not_engine_internals():
    # compress sits on the run store (recipes.run_store) and kdistill.io
    reaching = [
        f"{path.name}:{line} imports {module}"
        for path in sorted((SRC / "compress").glob("*.py"))
        for line, module in kdistill_imports(path)
        if module.startswith("kdistill.engine")
    ]
    assert not reaching, "\n".join(reaching)
