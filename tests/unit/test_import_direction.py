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


def _offenders(layers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for layer in layers:
        target = GATEWAY / layer
        paths = sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
        for path in paths:
            if "migrations" in path.parts:
                continue
            for line, name in _imports(path):
                if any(_under(name, f) for f in forbidden):
                    found.append(f"{_rel(path)}:{line}: imports {name}")
    return found


def test_the_services_do_not_import_the_http_layer_or_the_wiring() -> None:
    # api -> auth/signing/sign -> hsm/pki/store: the services know nothing of HTTP handlers,
    # of the app that wires them, of the CLI or of the server.
    services = ("auth", "signing", "sign", "verify", "lifecycle", "audit", "passwords")
    upper = ("gateway.api", "gateway.app", "gateway.cli", "gateway.server")
    assert _offenders(services, upper) == []


def test_signing_does_not_import_how_presence_was_proved() -> None:
    # The signing use case takes a Grant, whatever proved presence; auth/ builds Grants.
    assert _offenders(("signing",), ("gateway.auth", "gateway.api")) == []


def test_the_store_imports_no_service() -> None:
    services = ("gateway.auth", "gateway.signing", "gateway.sign", "gateway.verify")
    assert _offenders(("store",), services) == []


def test_a_forbidden_import_is_seen() -> None:
    # The scan itself: auth/ imports signing/, so forbidding it must find offenders.
    assert _offenders(("auth",), ("gateway.signing",))
