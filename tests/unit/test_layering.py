"""The dependency rules of ARCHITECTURE.md hold: the three programs never import each other,
`protocol` imports nothing of ours, `common` only `protocol`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "nestbox"

ALLOWED: dict[str, set[str]] = {
    "protocol": {"protocol"},
    "common": {"protocol", "common"},
    "envd": {"protocol", "common", "envd"},
    "hostagent": {"protocol", "common", "hostagent"},
    "controlplane": {"protocol", "common", "controlplane"},
    "cli": {"protocol", "cli"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level `nestbox.<package>` names a module imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "nestbox" and len(parts) > 1:
                found.add(parts[1])
    return found


def modules_of(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package: str) -> None:
    bad = {
        str(p.relative_to(SRC)): sorted(imported_packages(p) - ALLOWED[package])
        for p in modules_of(package)
        if imported_packages(p) - ALLOWED[package] - {"__version__"}
    }
    assert bad == {}


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from nestbox.hostagent import settings\nimport nestbox.envd.app\n")
    assert imported_packages(module) == {"hostagent", "envd"}
