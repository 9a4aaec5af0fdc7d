"""Imports point one way: production code never stands on the test world or the tests.

Checked on the source (every ``import`` and ``from ... import`` of every module under
``gateway/``, including the ones inside functions), so a lazy import cannot slip through.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gateway

GATEWAY = Path(gateway.__file__).resolve().parent

# The sandbox is the test world; the CLI's sandbox commands are its only production doorway
# (``hpki-gateway sandbox init|tsa``), and they are what the sandbox is for.
SANDBOX_USERS = {"gateway/sandbox", "gateway/cli/sandbox.py"}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from gateway import sandbox` names the package in the alias
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in GATEWAY.rglob("*.py") if "migrations" not in p.parts)


def _rel(path: Path) -> str:
    return path.relative_to(GATEWAY.parent).as_posix()


def _is_sandbox_user(rel: str) -> bool:
    return any(rel == u or rel.startswith(u + "/") for u in SANDBOX_USERS)


def test_the_walk_sees_the_modules_and_their_imports() -> None:
    modules = {_rel(p) for p in _modules()}
    assert {
        "gateway/app.py",
        "gateway/lifecycle/certificates.py",
        "gateway/pki/issue.py",
    } <= modules
    cli = dict((name, line) for line, name in _imports(GATEWAY / "cli" / "sandbox.py"))
    assert "gateway.sandbox.world" in cli and "gateway.sandbox.tsa" in cli


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_no_production_module_imports_the_sandbox_or_the_tests() -> None:
    offenders = []
    for path in _modules():
        rel = _rel(path)
        for line, name in _imports(path):
            relative = name.startswith(".")
            test_world = _under(name, "gateway.sandbox") and not _is_sandbox_user(rel)
            if relative or _under(name, "tests") or test_world:
                offenders.append(f"{rel}:{line}: imports {name}")
    assert offenders == []


def test_the_lower_layers_do_not_import_the_upper_ones() -> None:
    # pki, hsm and store know nothing of HTTP, the lifecycle services or the CLI.
    upper = ("gateway.api", "gateway.app", "gateway.cli", "gateway.lifecycle", "gateway.server")
    offenders = []
    for layer in ("pki", "hsm", "store"):
        for path in sorted((GATEWAY / layer).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            for line, name in _imports(path):
                if any(_under(name, u) for u in upper):
                    offenders.append(f"{_rel(path)}:{line}: imports {name}")
    assert offenders == []
