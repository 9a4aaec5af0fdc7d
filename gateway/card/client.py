"""The card flows against a gateway, as a Python API a facility system can import.

``authorize`` = ``POST /auth/jpki/authenticate/begin`` -> VERIFY the PIN -> sign the 48
challenge bytes -> ``POST /csc/v2/credentials/authorize`` with ``authData`` id ``jpki`` ->
the SAD. ``enroll`` = the same with ``/auth/jpki/register/...`` and the enrolment code +
password (proof of possession). The PIN goes to the card only: never to the gateway, a log
or an exception message.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from gateway.card.errors import CardError, CardErrorCode
from gateway.card.jpki import JpkiCard
from gateway.clock import Clock, system_clock

SHA256_OID = "2.16.840.1.101.3.4.2.1"


class GatewayCallError(Exception):
    """The gateway refused a call: HTTP status and its error body (problem+json or CSC)."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        if isinstance(body, dict):
            text = body.get("detail") or body.get("error_description") or body.get("title")
        else:
            text = None
        super().__init__(f"HTTP {status}: {text or body}")

    @property
    def description(self) -> str:
        return str(self.args[0])


@dataclass
class GatewayClient:
    """HTTPS with the facility's client certificate (mTLS), trusting ``server_ca``."""

    url: str
    client_cert: str
    client_key: str
    server_ca: str | None = None
    timeout: float = 30.0

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.server_ca)
        ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        parts = urlsplit(self.url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"gateway URL must be https://host[:port]: {self.url}")
        conn = http.client.HTTPSConnection(
            parts.hostname, parts.port or 443, context=self._context(), timeout=self.timeout
        )
        try:
            conn.request(
                "POST",
                parts.path.rstrip("/") + path,
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            data = raw.decode("utf-8", "replace")[:500]
        if resp.status >= 400 or not isinstance(data, dict):
            raise GatewayCallError(resp.status, data)
        return data


def explain(e: GatewayCallError) -> CardError | None:
    """The gateway's refusals that a doctor can act on, as card messages (ja/en)."""
    text = e.description
    if "JPKI certificate is expired or not yet valid" in text:
        return CardError(CardErrorCode.CERTIFICATE_EXPIRED)
    if "JPKI certificate is revoked" in text:
        return CardError(CardErrorCode.CERTIFICATE_REVOKED)
    return None


def _check_validity(cert_der: bytes, now: datetime) -> None:
    """Refuse before asking for the PIN when the card's certificate is out of its validity."""
    cert = x509.load_der_x509_certificate(cert_der)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise CardError(CardErrorCode.CERTIFICATE_EXPIRED)


def _card_signs(
    card: JpkiCard, gateway: GatewayClient, pin: str, challenge: bytes, challenge_id: str
) -> bytes:
    """VERIFY then sign; when the card refuses (wrong or blocked PIN, card pulled), tell the
    gateway so that the challenge is burnt and the refusal audited, then raise it."""
    try:
        card.verify_auth_pin(pin)
        return card.sign(challenge)
    except CardError as e:
        with contextlib.suppress(GatewayCallError, OSError):
            gateway.post("/auth/jpki/abort", {"challenge_id": challenge_id, "reason": e.code.value})
        raise


def _b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def authorize(
    card: JpkiCard,
    gateway: GatewayClient,
    *,
    credential_id: str,
    hashes: Sequence[bytes],
    pin: str,
    hash_algorithm_oid: str = SHA256_OID,
    description: str | None = None,
    clock: Clock = system_clock,
) -> dict[str, Any]:
    """begin -> VERIFY -> sign -> authorize; returns ``{"SAD", "expiresIn"}``."""
    cert = card.read_auth_certificate()
    _check_validity(cert, clock())
    body: dict[str, Any] = {
        "credentialID": credential_id,
        "hashes": [base64.b64encode(h).decode() for h in hashes],
        "hashAlgorithmOID": hash_algorithm_oid,
        "numSignatures": len(hashes),
    }
    if description:
        body["description"] = description
    begun = gateway.post("/auth/jpki/authenticate/begin", body)
    challenge = _b64u_decode(str(begun["challenge"]))
    signature = _card_signs(card, gateway, pin, challenge, str(begun["challenge_id"]))
    value = json.dumps(
        {
            "certificate": base64.b64encode(cert).decode(),
            "signature": base64.b64encode(signature).decode(),
            "challenge_id": begun["challenge_id"],
        }
    )
    return gateway.post(
        "/csc/v2/credentials/authorize",
        {**body, "authData": [{"id": "jpki", "value": value}]},
    )


def enroll(
    card: JpkiCard,
    gateway: GatewayClient,
    *,
    code: str,
    password: str,
    pin: str,
    label: str | None = None,
    clock: Clock = system_clock,
) -> dict[str, Any]:
    """Link this card to the signer of the enrolment code (the card proves possession)."""
    cert = card.read_auth_certificate()
    _check_validity(cert, clock())
    begun = gateway.post(
        "/auth/jpki/register/begin", {"enrollment_code": code, "password": password}
    )
    challenge = _b64u_decode(str(begun["challenge"]))
    signature = _card_signs(card, gateway, pin, challenge, str(begun["challenge_id"]))
    body: dict[str, Any] = {
        "enrollment_code": code,
        "certificate": base64.b64encode(cert).decode(),
        "signature": base64.b64encode(signature).decode(),
        "challenge_id": begun["challenge_id"],
    }
    if label:
        body["label"] = label
    return gateway.post("/auth/jpki/register/complete", body)
