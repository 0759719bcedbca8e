"""The longest functions of the package (lines from `def` to the end of the body, docstring
included), as the layout issue measures them.

    python bench/function_lengths.py            # the ten longest
    python bench/function_lengths.py --top 5
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kdistill"


def function_lengths(root: Path = SRC) -> list[tuple[int, str]]:
    """(lines, "module.py:qualified_name") for every function and method under `root`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        lines = child.end_lineno - child.lineno + 1
                        found.append((lines, f"{path.relative_to(root)}:{name}"))
                    stack.append((child, name + "."))
    return sorted(found, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=10)
    for lines, name in function_lengths()[: parser.parse_args().top]:
        print(f"{lines:5d}  {name}")


if __name__ == "__main__":
    main()
