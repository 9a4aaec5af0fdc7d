"""The sandbox's TSA, HSM and role failure scenarios, acting on the signing path itself.

A switched-on ``tsa_down``, ``tsa_slow``, ``hsm_unavailable`` or ``signer_without_role`` does
not answer for the gateway: the request goes through the handler, the SAD is spent, the
document is built, and then the part that fails in real life fails:

- ``tsa_down``: the timestamp request goes to a TCP port that is bound but not listening, so the
  connection is refused exactly as for a TSA that is down; the real RFC 3161 client turns that
  into 503 ``tsa_unavailable``, the signing core gives the SAD back and audits;
- ``tsa_slow``: it goes to a port that accepts connections and never answers, so the client's
  own ``timestamp.timeout`` expires (503 ``tsa_timeout``);
- ``hsm_unavailable``: the key store raises what the PKCS#11 store raises when the token is
  gone (503 ``temporarily_unavailable``, ``HSM token unavailable``);
- ``signer_without_role``: the signing policy's role check reads the credential's hcRole as
  ``Pharmacist``, so the real check refuses a prescription exactly as for a real pharmacist
  (403 ``role_not_permitted``, after the SAD check, the SAD given back) and lets a dispensing
  result through.

Only the requests of the facility (or credential) the scenario is switched on for are affected:
the scenario middleware (``api/scenarios.py``) puts the names switched on for the request in
:data:`SWITCHED`, a context variable that the handler's task, and what it awaits, sees.
Installed by ``app.py`` in a sandbox only.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import ClassVar

from cryptography import x509

from gateway.config import Settings
from gateway.errors import HsmUnavailable
from gateway.hsm.api import DigestAlgorithm, GeneratedKey, KeyHandle, KeyStore, StoreKeyHandle
from gateway.sign.eprescription import RolePolicy
from gateway.sign.service import SigningPolicy
from gateway.sign.timestamp import Rfc3161Client

__all__ = [
    "SWITCHED",
    "ScenarioKeyStore",
    "ScenarioRolePolicy",
    "ScenarioTsa",
    "scenario_keystore",
    "scenario_policy",
    "scenario_tsa",
]

#: The scenarios switched on for the request being handled (empty outside one).
SWITCHED: ContextVar[frozenset[str]] = ContextVar("sandbox_scenarios", default=frozenset())

#: The text of the PKCS#11 store's own error when the token cannot be reached.
HSM_UNAVAILABLE_TEXT = "HSM token unavailable"


class _StandIn:
    """A loopback TCP port that never serves: bound only (connection refused), or listening
    without ever accepting (the client waits until its time-out). Made once per process."""

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _sockets: ClassVar[dict[str, socket.socket]] = {}

    @classmethod
    def port(cls, kind: str) -> int:
        with cls._lock:
            sock = cls._sockets.get(kind)
            if sock is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind(("127.0.0.1", 0))
                if kind == "silent":
                    sock.listen(64)
                cls._sockets[kind] = sock
            return int(sock.getsockname()[1])


class ScenarioTsa(Rfc3161Client):
    """The configured TSA, except for requests under ``tsa_down`` / ``tsa_slow``."""

    def __init__(self, *, url: str, timeout: float) -> None:
        super().__init__(url=url, timeout=timeout)
        self._stand_ins: dict[str, Rfc3161Client] = {}

    def _stand_in(self, scenario: str, kind: str) -> Rfc3161Client:
        client = self._stand_ins.get(scenario)
        if client is None:
            url = f"http://127.0.0.1:{_StandIn.port(kind)}/sandbox-scenario/{scenario}"
            client = self._stand_ins[scenario] = Rfc3161Client(url=url, timeout=self.timeout)
        return client

    async def post(self, request_der: bytes) -> bytes:
        switched = SWITCHED.get()
        if "tsa_down" in switched:
            return await self._stand_in("tsa_down", "closed").post(request_der)
        if "tsa_slow" in switched:
            return await self._stand_in("tsa_slow", "silent").post(request_der)
        return await super().post(request_der)

    async def close(self) -> None:
        for client in self._stand_ins.values():
            await client.close()
        await super().close()


def scenario_tsa(settings: Settings, tsa: Rfc3161Client | None) -> Rfc3161Client | None:
    """``tsa`` as the sandbox runs it (unchanged outside a sandbox or without a TSA)."""
    if not settings.service.sandbox or tsa is None:
        return tsa
    return ScenarioTsa(url=tsa.url, timeout=tsa.timeout)


class ScenarioKeyStore:
    """``inner``, except that signing (``get_key``, ``sign_digests``) fails for the requests
    under ``hsm_unavailable``; every other call goes to ``inner`` unchanged."""

    def __init__(self, inner: KeyStore, *, retry_after: int) -> None:
        self.inner = inner
        self.retry_after = retry_after

    def _refuse_if_switched(self) -> None:
        if "hsm_unavailable" in SWITCHED.get():
            raise HsmUnavailable(HSM_UNAVAILABLE_TEXT, retry_after=self.retry_after)

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def generate_rsa_key(self, *, label: str, bits: int = 2048) -> GeneratedKey:
        return await self.inner.generate_rsa_key(label=label, bits=bits)

    async def get_key(self, key_id: str) -> KeyHandle:
        self._refuse_if_switched()
        await self.inner.get_key(key_id)  # KeyNotFound as the store says it
        return StoreKeyHandle(self, key_id)  # signs through this store, so the switch holds

    async def sign_digests(
        self, key_id: str, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        self._refuse_if_switched()
        return await self.inner.sign_digests(key_id, digests, algorithm)

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        return await self.inner.key_attributes(key_id)

    async def destroy_key(self, key_id: str) -> None:
        await self.inner.destroy_key(key_id)

    async def public_key_der(self, key_id: str) -> bytes:
        return await self.inner.public_key_der(key_id)

    async def check(self) -> None:
        await self.inner.check()


def scenario_keystore(settings: Settings, keystore: KeyStore) -> KeyStore:
    """``keystore`` as the sandbox runs it (unchanged outside a sandbox)."""
    if not settings.service.sandbox:
        return keystore
    return ScenarioKeyStore(keystore, retry_after=settings.hsm.retry_after)


#: The hcRole a credential under ``signer_without_role`` signs with: a pharmacist's.
STAND_IN_ROLE = "Pharmacist"


@dataclass(frozen=True)
class ScenarioRolePolicy(RolePolicy):
    """The configured role policy, except that under ``signer_without_role`` the certificate's
    hcRole reads as a pharmacist's."""

    def check(self, cert: x509.Certificate, document_type: str) -> str:
        if "signer_without_role" in SWITCHED.get():
            return self.check_roles([STAND_IN_ROLE], document_type)
        return super().check(cert, document_type)


def scenario_policy(settings: Settings, policy: SigningPolicy) -> SigningPolicy:
    """``policy`` as the sandbox runs it (unchanged outside a sandbox)."""
    if not settings.service.sandbox:
        return policy
    return replace(policy, roles=ScenarioRolePolicy(policy.roles.allowed))
