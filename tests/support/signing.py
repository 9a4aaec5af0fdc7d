"""The FIDO2 + CSC signing flow over real mTLS, and in-process services on the sandbox store.

The in-process services share the running gateway's SQLite file (WAL, BEGIN IMMEDIATE), so a
test can create state "in the past" with an injected ``now`` instead of sleeping.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.app import make_activation, make_audit, make_fido2
from gateway.auth.activation import SignatureActivation
from gateway.auth.fido2 import Fido2Authenticator
from gateway.config import load_settings
from gateway.store.db import Database
from tests.support.gateway import Response, request
from tests.support.webauthn import SoftAuthenticator

SHA256 = "2.16.840.1.101.3.4.2.1"
SHA384 = "2.16.840.1.101.3.4.2.2"
RSA = "1.2.840.113549.1.1.1"
SHA256_RSA = "1.2.840.113549.1.1.11"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def random_hashes(n: int, size: int = 32) -> list[bytes]:
    return [
        hashlib.sha256(os.urandom(16)).digest()[:size] if size <= 32 else os.urandom(size)
        for _ in range(n)
    ]


@dataclass
class Csc:
    """A facility system calling one gateway."""

    port: int
    ctx: ssl.SSLContext

    def post(self, path: str, body: Any) -> Response:
        return request(self.port, "POST", path, ctx=self.ctx, json_body=body)

    def begin(
        self, credential_id: str, hashes: list[bytes], *, alg: str = SHA256, n: int | None = None
    ) -> Response:
        return self.post(
            "/auth/fido2/authenticate/begin",
            {
                "credentialID": credential_id,
                "hashes": [b64(h) for h in hashes],
                "hashAlgorithmOID": alg,
                "numSignatures": len(hashes) if n is None else n,
            },
        )

    def authorize_raw(
        self,
        credential_id: str,
        hashes: list[bytes],
        assertion: dict[str, Any],
        *,
        alg: str | None = SHA256,
        n: int | None = None,
    ) -> Response:
        body: dict[str, Any] = {
            "credentialID": credential_id,
            "numSignatures": len(hashes) if n is None else n,
            "hashes": [b64(h) for h in hashes],
            "authData": [{"id": "webauthn", "value": json.dumps(assertion)}],
        }
        if alg is not None:
            body["hashAlgorithmOID"] = alg
        return self.post("/csc/v2/credentials/authorize", body)

    def authorize(
        self, credential_id: str, hashes: list[bytes], auth: SoftAuthenticator, **kw: Any
    ) -> str:
        """The happy path: begin -> authenticator -> authorize; returns the SAD."""
        r = self.begin(credential_id, hashes)
        assert r.status == 200, r.body
        assertion = auth.get(r.json()["publicKey"], **kw)
        r = self.authorize_raw(credential_id, hashes, assertion)
        assert r.status == 200, r.body
        sad: str = r.json()["SAD"]
        return sad

    def sign_hash(
        self,
        credential_id: str,
        sad: str,
        hashes: list[bytes],
        *,
        alg: str | None = SHA256,
        sign_algo: str = RSA,
    ) -> Response:
        body: dict[str, Any] = {
            "credentialID": credential_id,
            "SAD": sad,
            "hashes": [b64(h) for h in hashes],
            "signAlgo": sign_algo,
        }
        if alg is not None:
            body["hashAlgorithmOID"] = alg
        return self.post("/csc/v2/signatures/signHash", body)

    def enroll(self, code: str, password: str, auth: SoftAuthenticator) -> Response:
        r = self.post("/auth/fido2/register/begin", {"enrollment_code": code, "password": password})
        assert r.status == 200, r.body
        return self.post(
            "/auth/fido2/register/complete",
            {"enrollment_code": code, "credential": auth.create(r.json()["publicKey"])},
        )


@dataclass
class Services:
    db: Database
    fido2: Fido2Authenticator
    activation: SignatureActivation


@asynccontextmanager
async def services(config: str | Path) -> AsyncIterator[Services]:
    settings = load_settings(config, environ={})
    db = Database(settings.database_url())
    audit = make_audit(settings)
    fido2 = make_fido2(settings, db=db, audit=audit)
    try:
        yield Services(
            db=db,
            fido2=fido2,
            activation=make_activation(settings, db=db, audit=audit, fido2=fido2),
        )
    finally:
        await db.close()


def replayed_authorizations(
    cscs: list[Csc], credential_id: str, hashes: list[bytes], auth: SoftAuthenticator, copies: int
) -> list[Response]:
    """One ceremony's assertion sent ``copies`` times at once (each on its own TLS connection,
    spread over ``cscs``): the replay a single-use challenge must stop."""
    from concurrent.futures import ThreadPoolExecutor

    r = cscs[0].begin(credential_id, hashes)
    assert r.status == 200, r.body
    assertion = auth.get(r.json()["publicKey"])
    with ThreadPoolExecutor(copies) as pool:
        return list(
            pool.map(
                lambda i: cscs[i % len(cscs)].authorize_raw(credential_id, hashes, assertion),
                range(copies),
            )
        )
