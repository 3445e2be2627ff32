"""docs/architecture.md names real code: every `module.py: Name.attr` it cites exists there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
REFERENCE = re.compile(r"`([\w/]+\.py): ([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)`")


def defined_names(path: Path) -> set[str]:
    """Dotted names defined in a module: functions, classes, their methods and attributes."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + child.name)
                if isinstance(child, ast.ClassDef):
                    visit(child, prefix + child.name + ".")
                else:
                    # self.<attr> assignments inside methods are the class's attributes
                    owner = prefix.rstrip(".")
                    for sub in ast.walk(child):
                        if isinstance(sub, (ast.Assign, ast.AnnAssign)):
                            targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
                            for target in targets:
                                if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                                        and target.value.id == "self" and owner):
                                    names.add(f"{owner}.{target.attr}")
            elif isinstance(child, (ast.Assign, ast.AnnAssign)):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                names.update(prefix + t.id for t in targets if isinstance(t, ast.Name))

    visit(tree, "")
    return names


def test_every_cited_function_exists_in_its_module() -> None:
    references = REFERENCE.findall(DOC.read_text(encoding="utf-8"))
    assert len(references) > 20, "the map cites the code by module and name"
    missing = []
    for module, name in references:
        path = ROOT / "gateway" / module
        if not path.exists():
            missing.append(f"{module} (no such module)")
        elif name not in defined_names(path):
            missing.append(f"{module}: {name}")
    assert not missing, f"docs/architecture.md cites code that is not there: {missing}"
