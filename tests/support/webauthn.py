"""A software WebAuthn authenticator (ES256, attestation "none") for tests.

``soft-webauthn`` needs fido2<2, so this one is written on python-fido2 2.x's data types. It
produces the standard JSON mapping (base64url) that browsers' ``toJSON()`` produce, and lets a
test break exactly one thing at a time: origin, RP ID, flags, counter, challenge.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor
from fido2.cose import ES256
from fido2.utils import websafe_decode, websafe_encode
from fido2.webauthn import AttestedCredentialData, AuthenticatorData, CollectedClientData

FLAG = AuthenticatorData.FLAG
AAGUID = bytes.fromhex("6870 6b69 2d67 6174 6577 6179 2d74 6573".replace(" ", ""))


@dataclass
class SoftAuthenticator:
    """One credential on one software authenticator."""

    origin: str
    rp_id: str = "localhost"
    sign_count: int = 0
    #: Always report sign count 0, as authenticators without a counter do (synced passkeys):
    #: for one authenticator shared by concurrent clients, whose assertions reach the gateway
    #: in any order (a counter that did not grow is refused as a clone).
    counter_less: bool = False
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    credential_id: bytes = field(default_factory=lambda: os.urandom(32))

    @property
    def credential_id_b64(self) -> str:
        return websafe_encode(self.credential_id)

    def _client_data(self, kind: str, challenge: str, origin: str | None) -> CollectedClientData:
        return CollectedClientData.create(
            type=kind, challenge=challenge, origin=origin or self.origin
        )

    def create(
        self,
        public_key: dict[str, Any],
        *,
        origin: str | None = None,
        rp_id: str | None = None,
        flags: int = FLAG.UP | FLAG.UV | FLAG.AT,
        cose: dict[int, Any] | None = None,
    ) -> dict[str, Any]:
        """navigator.credentials.create(): a RegistrationResponse as JSON. ``cose`` replaces
        the credential's public key (COSE_Key map) with one the authenticator does not hold."""
        assert public_key["authenticatorSelection"]["userVerification"] == "required"
        client_data = self._client_data("webauthn.create", public_key["challenge"], origin)
        key = ES256.from_cryptography_key(self.key.public_key()) if cose is None else cose
        cred = AttestedCredentialData.create(AAGUID, self.credential_id, key)
        rp_hash = hashlib.sha256((rp_id or public_key["rp"]["id"]).encode()).digest()
        auth_data = AuthenticatorData.create(rp_hash, flags, self.sign_count, cred)
        attestation = cbor.encode({"fmt": "none", "authData": bytes(auth_data), "attStmt": {}})
        return {
            "id": self.credential_id_b64,
            "rawId": self.credential_id_b64,
            "type": "public-key",
            "response": {
                "clientDataJSON": websafe_encode(client_data),
                "attestationObject": websafe_encode(attestation),
            },
            "clientExtensionResults": {},
        }

    def get(
        self,
        public_key: dict[str, Any],
        *,
        origin: str | None = None,
        rp_id: str | None = None,
        flags: int = FLAG.UP | FLAG.UV,
        counter: int | None = None,
        challenge: str | None = None,
    ) -> dict[str, Any]:
        """navigator.credentials.get(): an AuthenticationResponse as JSON."""
        allowed = [c["id"] for c in public_key.get("allowCredentials") or []]
        assert self.credential_id_b64 in allowed, "the server did not ask for this credential"
        client_data = self._client_data(
            "webauthn.get", challenge or public_key["challenge"], origin
        )
        if counter is None and self.counter_less:
            counter = 0
        elif counter is None:
            self.sign_count += 1
            counter = self.sign_count
        rp_hash = hashlib.sha256((rp_id or public_key["rpId"]).encode()).digest()
        auth_data = AuthenticatorData.create(rp_hash, flags, counter)
        signature = self.key.sign(bytes(auth_data) + client_data.hash, ec.ECDSA(hashes.SHA256()))
        return {
            "id": self.credential_id_b64,
            "rawId": self.credential_id_b64,
            "type": "public-key",
            "response": {
                "clientDataJSON": websafe_encode(client_data),
                "authenticatorData": websafe_encode(auth_data),
                "signature": websafe_encode(signature),
            },
            "clientExtensionResults": {},
        }


def challenge_bytes(public_key: dict[str, Any]) -> bytes:
    return websafe_decode(public_key["challenge"])
