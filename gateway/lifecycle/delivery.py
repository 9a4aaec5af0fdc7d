"""One-time download of a facility's PKCS#12: link token, download password, 14-day window.

The source documents deliver the file behind a link valid 14 days, protected by a download
password sent in a separate mail; a resend opens a new 14-day window. Here:
- the link token (256 bits) and the download password are random; the store keeps only the
  token's SHA-256 and an scrypt verifier of the password, so a copy of the database yields
  neither a working link nor the password;
- the PKCS#12 (itself encrypted under the p12 password that exists only on the printed notice)
  is wrapped with AES-256-GCM under ``certificates.delivery_key_file`` and deleted from the
  store the moment it is downloaded (or its certificate is revoked or replaced);
- wrong passwords are counted in the store (``ATTEMPTS``: a check is reserved before the slow
  scrypt); at ``max_download_attempts`` wrong ones the link locks until an officer resends
  (new token, new password, new window).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.errors import ConfigError, Conflict, GatewayError, Gone, Locked
from gateway.passwords import AttemptLimit
from gateway.passwords import hash_password as hash_password
from gateway.passwords import verify_password as verify_password
from gateway.store.schema import certificate_delivery, client_certificate

_WRAP_VERSION = b"hgw1"
#: Wrong download passwords and the checks under way, per link (gateway/passwords.py).
ATTEMPTS = AttemptLimit(
    certificate_delivery, failed="failed_attempts", checking="checking_attempts"
)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class P12Wrapper:
    """AES-256-GCM under the delivery key, bound (AAD) to the certificate serial."""

    def __init__(self, key_material: bytes) -> None:
        if len(key_material) < 32:
            raise ConfigError("certificates.delivery_key_file: the key must be at least 32 bytes")
        self._aead = AESGCM(hashlib.sha256(b"hpki-gateway p12 wrap|" + key_material).digest())

    def wrap(self, p12: bytes, serial_hex: str) -> bytes:
        nonce = os.urandom(12)
        return _WRAP_VERSION + nonce + self._aead.encrypt(nonce, p12, serial_hex.encode())

    def unwrap(self, blob: bytes, serial_hex: str) -> bytes:
        if not blob.startswith(_WRAP_VERSION):
            raise GatewayError("stored certificate file has an unknown format")
        nonce = blob[len(_WRAP_VERSION) : len(_WRAP_VERSION) + 12]
        try:
            return self._aead.decrypt(nonce, blob[len(_WRAP_VERSION) + 12 :], serial_hex.encode())
        except InvalidTag as e:
            raise GatewayError(
                "stored certificate file cannot be decrypted (was delivery_key_file changed?)"
            ) from e


@dataclass(frozen=True, kw_only=True)
class DeliveryWindow:
    """What the two mails carry. ``password`` is shown once and never stored."""

    token: str
    password: str
    expires_at: datetime
    round: int


def new_secrets() -> tuple[str, str]:
    from gateway.pki.facility_ca import random_password

    return secrets.token_urlsafe(32), random_password(12)


@dataclass(frozen=True, kw_only=True)
class NewSecrets:
    """A new link token and download password, with the password's scrypt verifier."""

    token: str
    password: str
    password_hash: str


def make_secrets() -> NewSecrets:
    """New secrets for a download window (scrypt: run it in a thread, before the write
    transaction that stores them, so the event loop and the write lock never wait on it)."""
    token, password = new_secrets()
    return NewSecrets(token=token, password=password, password_hash=hash_password(password))


async def create_in(
    conn: AsyncConnection,
    *,
    certificate_id: int,
    wrapped_p12: bytes,
    file_name: str,
    now: datetime,
    days: int,
    token: str,
    password_hash: str,
) -> datetime:
    expires = now + timedelta(days=days)
    await conn.execute(
        insert(certificate_delivery).values(
            certificate_id=certificate_id,
            token_hash=token_hash(token),
            password_hash=password_hash,
            p12_wrapped=wrapped_p12,
            file_name=file_name,
            created_at=now,
            window_started_at=now,
            expires_at=expires,
            rounds=1,
            failed_attempts=0,
            checking_attempts=0,
        )
    )
    return expires


def locked_error(max_attempts: int) -> Locked:
    """The one answer for a locked link, whatever the password and whenever it was given."""
    return Locked(
        f"this download link is locked after {max_attempts} wrong download passwords; "
        "ask the registration office to resend it"
    )


def refuse_unavailable(
    row: Any,
    cert_status: str,
    now: datetime,
    max_attempts: int,
    *,
    check_window: bool = True,
    replaced: bool = False,
) -> None:
    """Raise the reason this download cannot happen, if any (order: most final first).

    ``replaced``: the certificate has a revocation scheduled (a rotation replaced it); its
    file is never delivered any more (a rotation drops it; this covers files kept by a
    rotation made before that rule)."""
    if row.downloaded_at is not None:
        raise Gone(
            f"this certificate file was already downloaded on "
            f"{row.downloaded_at.isoformat(timespec='seconds')}; it is kept only until the "
            "first download: ask the registration office"
        )
    if cert_status == "revoked" or row.p12_wrapped is None:
        raise Gone("this certificate was revoked; its file is no longer available")
    if replaced:
        raise Gone("this certificate was replaced by a newer one; its file is no longer available")
    if not check_window:
        return
    if row.locked_at is not None or row.failed_attempts >= max_attempts:
        raise locked_error(max_attempts)
    if row.expires_at <= now:
        raise Gone(
            f"this download link expired on {row.expires_at.isoformat(timespec='seconds')} "
            "(links are valid for a limited time): ask the registration office to resend it"
        )


async def reset_window_in(
    conn: AsyncConnection, *, delivery_id: int, now: datetime, days: int, fresh: NewSecrets
) -> DeliveryWindow:
    """Replace the link's token and password (``fresh``, from :func:`make_secrets`)."""
    expires = now + timedelta(days=days)
    row = (
        await conn.execute(
            update(certificate_delivery)
            .where(certificate_delivery.c.id == delivery_id)
            .values(
                token_hash=token_hash(fresh.token),
                password_hash=fresh.password_hash,
                window_started_at=now,
                expires_at=expires,
                rounds=certificate_delivery.c.rounds + 1,
                failed_attempts=0,
                checking_attempts=0,
                locked_at=None,
            )
            .returning(certificate_delivery.c.rounds)
        )
    ).one()
    return DeliveryWindow(
        token=fresh.token, password=fresh.password, expires_at=expires, round=int(row.rounds)
    )


async def delivery_for_certificate(conn: AsyncConnection, certificate_id: int) -> Any:
    row = (
        await conn.execute(
            select(certificate_delivery).where(
                certificate_delivery.c.certificate_id == certificate_id
            )
        )
    ).one_or_none()
    if row is None:
        raise Conflict(
            "this certificate was handed over directly (no download link); nothing to resend"
        )
    return row


async def drop_file_in(conn: AsyncConnection, certificate_id: int) -> None:
    """Delete the stored PKCS#12 (revocation, replacement): a revoked or replaced
    certificate is never delivered; its link answers as a revoked certificate's does."""
    await conn.execute(
        update(certificate_delivery)
        .where(certificate_delivery.c.certificate_id == certificate_id)
        .values(p12_wrapped=None)
    )


async def export_file_in(conn: AsyncConnection, delivery_id: int, now: datetime) -> None:
    """The stored PKCS#12 left by an officer's export: dropped, and recorded as downloaded."""
    await conn.execute(
        update(certificate_delivery)
        .where(certificate_delivery.c.id == delivery_id)
        .values(p12_wrapped=None, downloaded_at=now)
    )


async def link_state_in(conn: AsyncConnection, th: str) -> Any:
    """The delivery with token hash ``th``, its certificate's status and scheduled
    revocation (``cert_revoke_at``), or None."""
    return (
        await conn.execute(
            select(
                certificate_delivery,
                client_certificate.c.status.label("cert_status"),
                client_certificate.c.revoke_at.label("cert_revoke_at"),
            )
            .select_from(certificate_delivery.join(client_certificate))
            .where(certificate_delivery.c.token_hash == th)
        )
    ).one_or_none()
