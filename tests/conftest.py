"""Shared fixtures: one sandbox world and one running gateway for the integration tests.

Everything here is real: the sandbox is built by the real CLI (SoftHSM token, TEST CAs,
SQLite), the gateway runs as a real process behind a real TLS listener on 127.0.0.1.
A missing system part (SoftHSM, openssl) makes these fixtures fail, never skip.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import Server, client_context, free_port, run_cli
from tests.support.postgres import Databases, postgres_cluster
from tests.support.signing import Csc
from tests.support.webauthn import SoftAuthenticator

pytest_plugins = ["tests.support.pcsc"]


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} is not installed: run `make test` (scripts/bootstrap.sh)")


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The manifest of a freshly built sandbox world."""
    _require("softhsm2-util")
    _require("openssl")
    d = tmp_path_factory.mktemp("sandbox")
    run_cli("sandbox", "init", str(d), "--port", str(free_port()))
    manifest: dict[str, Any] = json.loads((d / "manifest.json").read_text())
    manifest["dir"] = str(d)
    return manifest


@pytest.fixture(scope="session")
def gateway(sandbox: dict[str, Any]) -> Iterator[Server]:
    srv = Server(Path(sandbox["config"]), free_port())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def hospital(sandbox: dict[str, Any]) -> dict[str, Any]:
    fac: dict[str, Any] = next(f for f in sandbox["facilities"] if f["kind"] == "hospital")
    return fac


@pytest.fixture(scope="session")
def pharmacy(sandbox: dict[str, Any]) -> dict[str, Any]:
    fac: dict[str, Any] = next(f for f in sandbox["facilities"] if f["kind"] == "pharmacy")
    return fac


@pytest.fixture(scope="session")
def hospital_ctx(sandbox: dict[str, Any], hospital: dict[str, Any]) -> Any:
    return client_context(sandbox["server_ca"], hospital["client_cert"], hospital["client_key"])


@pytest.fixture(scope="session")
def doctor(
    sandbox: dict[str, Any], gateway: Server, hospital_ctx: Any
) -> tuple[dict[str, Any], SoftAuthenticator]:
    """The sandbox's first doctor, enrolled with the code + password from the manifest.

    Tests that issue further enrolment codes for this doctor must depend on this fixture
    (a new code revokes unused earlier ones).
    """
    doc: dict[str, Any] = next(s for s in sandbox["signers"] if s["role"] == "Medical Doctor")
    auth = SoftAuthenticator(origin=f"https://localhost:{gateway.port}")
    r = Csc(gateway.port, hospital_ctx).enroll(
        doc["enrollment_code"], doc["enrollment_password"], auth
    )
    assert r.status == 200, r.body
    assert r.json()["status"] == "registered"
    assert r.json()["credential_id"] == auth.credential_id_b64
    return doc, auth


# -- the store engine ---------------------------------------------------------------------------
#
# Tests where the engine's behaviour matters (locking, exactly-once across processes, the audit
# chain under concurrent writers, lifecycle transactions) take ``store_url`` and run twice: on a
# SQLite file and on a fresh database of one throwaway PostgreSQL cluster shared by the session
# (started when the first such test runs). docs/operations.md lists which tests run on which.


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[Databases]:
    with postgres_cluster() as url:
        yield Databases(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated-or-empty store of each engine: SQLite (a new file, migrated by whoever opens
    it first) and PostgreSQL (a fresh database holding the migrated schema)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/gw.db"
    dbs: Databases = request.getfixturevalue("pg_databases")
    return dbs.fresh()
