"""The package rules of ARCHITECTURE.md. The import contracts in pyproject.toml (`lint-imports`,
run by `make lint`, and here) check run-time imports; they leave out `if TYPE_CHECKING:`
imports (`exclude_type_checking_imports`: an annotation may name a higher layer's type inside a
program). What they cannot see is checked here over the AST: that those annotation-only imports
never cross between packages either (the three programs never import each other, `common`
imports only `protocol`, `protocol` nothing of ours, the `sdk` only `protocol`)."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "nestbox"
LINT_IMPORTS = ROOT / ".venv" / "bin" / "lint-imports"

ALLOWED: dict[str, set[str]] = {
    "protocol": {"protocol"},
    "common": {"protocol", "common"},
    "envd": {"protocol", "common", "envd"},
    "hostagent": {"protocol", "common", "hostagent"},
    "controlplane": {"protocol", "common", "controlplane"},
    "sdk": {"protocol", "sdk"},
    "cli": {"protocol", "sdk", "cli"},
}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def type_checking_imports(path: Path) -> set[str]:
    """The top-level `nestbox.<package>` names imported under `if TYPE_CHECKING:` in a module."""
    found: set[str] = set()
    for block in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(block, ast.If) and _is_type_checking(block.test)):
            continue
        for node in (n for statement in block.body for n in ast.walk(statement)):
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


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_type_checking_imports_keep_the_package_rules(package: str) -> None:
    bad = {
        str(p.relative_to(SRC)): sorted(type_checking_imports(p) - ALLOWED[package])
        for p in sorted((SRC / package).rglob("*.py"))
        if type_checking_imports(p) - ALLOWED[package]
    }
    assert bad == {}


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "import nestbox.protocol\n"  # a run-time import: the contracts' business
        "if TYPE_CHECKING:\n"
        "    from nestbox.hostagent import settings\n"
        "    import nestbox.envd.app\n"
    )
    assert type_checking_imports(module) == {"hostagent", "envd"}


def test_the_import_contracts_hold() -> None:
    done = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
