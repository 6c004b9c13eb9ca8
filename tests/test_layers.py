"""Import rules between layers that a refactor could quietly break."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hsplit_sim"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (imports inside functions count too)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("layer", ["experiment", "backends"])
def test_runs_and_sweeps_do_not_import_analysis(layer):
    """A run and a sweep produce their results without the reading side: analysis may change (or be absent)."""
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    offending = {str(f.relative_to(PACKAGE)): sorted(m for m in imported_modules(f)
                                                     if m == "analysis" or m.startswith("analysis."))
                 for f in files}
    assert not {f: m for f, m in offending.items() if m}
