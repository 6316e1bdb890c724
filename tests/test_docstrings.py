"""Every public class, function and method of the package says what it is (issue 30: 41% had no docstring,
including the `Family` base a newcomer extends)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "attnctl"


def _undocumented(node, prefix: str, path: Path) -> list[str]:
    missing = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not child.name.startswith("_"):
            if ast.get_docstring(child) is None:
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{child.lineno} {prefix}{child.name}")
            if isinstance(child, ast.ClassDef):
                missing += _undocumented(child, f"{prefix}{child.name}.", path)
    return missing


def test_every_public_definition_has_a_docstring():
    missing = [m for path in sorted(PACKAGE.rglob("*.py"))
               for m in _undocumented(ast.parse(path.read_text(encoding="utf-8")), "", path)]
    assert missing == []
