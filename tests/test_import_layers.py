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

Every `import kdistill…` counts, including those inside functions (a late import is still a
dependency). The README's architecture section shows the same layout.
"""

from __future__ import annotations

import ast
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


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        own = layer_of(parts)
        for line, module in kdistill_imports(path):
            target = layer_of(module.split(".")[1:])
            if target > own:
                upward.append(
                    f"{path.relative_to(SRC)}:{line} (layer {own}) imports {module} "
                    f"(layer {target})"
                )
    assert not upward, "imports that go upward:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    # the detector itself must work: a models module importing losses is flagged
    module = tmp_path / "m.py"
    module.write_text("from kdistill.losses.detection import YOLOLoss\nimport kdistill.engine\n")
    imports = kdistill_imports(module)
    assert [layer_of(m.split(".")[1:]) for _, m in imports] == [3, 5]
    assert layer_of(["models", "dense"]) < layer_of(["losses", "detection"])
