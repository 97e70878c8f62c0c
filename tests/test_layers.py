"""Imports go one way: hardware <- fedbot <- agent, coordinator <- cli. agent and coordinator never
import each other; what both need lives in fedbot. Lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAY_IMPORT = {
    "hardware": {"hardware"},
    "fedbot": {"hardware", "fedbot"},
    "agent": {"hardware", "fedbot", "agent"},
    "coordinator": {"hardware", "fedbot", "coordinator"},
    "cli": {"hardware", "fedbot", "agent", "coordinator", "cli"},
}


def climbing_imports(package: str, source: str) -> list[str]:
    """The project packages that `source` (a module of `package`) imports but may not."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [
            name for name in names if name.split(".")[0] in MAY_IMPORT and name.split(".")[0] not in MAY_IMPORT[package]
        ]
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_no_import_climbs_back(package):
    wrong = {
        str(path.relative_to(ROOT)): climbing
        for path in sorted((ROOT / package).rglob("*.py"))
        if (climbing := climbing_imports(package, path.read_text()))
    }
    assert not wrong, f"imports against the layers: {wrong}"


def test_the_check_sees_top_level_and_lazy_imports():
    source = "import agent.daemon\ndef f():\n    from coordinator.registry import RunDirectory\n"
    assert climbing_imports("fedbot", source) == ["agent.daemon", "coordinator.registry"]
    assert climbing_imports("agent", "from coordinator import superlink\n") == ["coordinator"]
    assert climbing_imports("cli", source) == []
