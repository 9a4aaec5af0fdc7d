"""Database schema (SQLAlchemy Core). Portable: nothing here is SQLite-only.

Alembic migrations in ``migrations/versions`` create and evolve these tables; this module is the
typed handle the repositories use. Keep the two in step (``alembic check`` in the tests).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend.

    SQLite has no time zones: values are stored as naive UTC and given their zone back on read.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


facility = Table(
    "facility",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("institution_code", String(10), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("provisional", Boolean, nullable=False, default=False),
    Column("status", String(20), nullable=False, default="active"),
    Column("status_reason", String(500)),
    Column("status_changed_at", UTCDateTime()),
    Column("policy", Text, nullable=False, default="{}"),
    Column("created_at", UTCDateTime(), nullable=False),
    # Migration 0003: the dental (歯科) code of a co-located dental department, which
    # is registered under the medical (医科) code; and where reminders and delivery mail go.
    Column("dental_code", String(10), unique=True),
    Column("contact_email", String(320)),
    # Self-service: the person who receives the post (担当者), and how the facility pays
    # (``deduction`` from the fee payment or ``transfer``; NULL: not chosen, shown as transfer).
    Column("recipient_name", String(200)),
    Column("payment_method", String(20)),
)

admin = Table(
    "admin",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("status", String(20), nullable=False, default="active"),
    Column("created_at", UTCDateTime(), nullable=False),
)

vendor = Table(
    "vendor",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("contact_email", String(320)),
    Column("status", String(20), nullable=False, default="active"),
    Column("created_at", UTCDateTime(), nullable=False),
)

vendor_facility = Table(
    "vendor_facility",
    metadata,
    Column("vendor_id", Integer, ForeignKey("vendor.id"), primary_key=True),
    Column("facility_id", Integer, ForeignKey("facility.id"), primary_key=True),
    Column("created_at", UTCDateTime(), nullable=False),
)

client_certificate = Table(
    "client_certificate",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("serial_hex", String(64), nullable=False, unique=True),
    Column("fingerprint_sha256", String(64), nullable=False, unique=True),
    Column("facility_id", Integer, ForeignKey("facility.id"), index=True),
    Column("admin_id", Integer, ForeignKey("admin.id"), index=True),
    # Self-service: a vendor's own certificate (代理申請), and the certified key's SHA-256
    # (SubjectPublicKeyInfo) so that a renewal request reusing any known key is refused.
    Column("vendor_id", Integer, ForeignKey("vendor.id"), index=True),
    Column("spki_sha256", String(64), index=True),
    Column("terminal_label", String(200)),
    Column("subject", String(500), nullable=False),
    Column("not_before", UTCDateTime(), nullable=False),
    Column("not_after", UTCDateTime(), nullable=False),
    Column("status", String(20), nullable=False, default="active"),
    Column("revoke_at", UTCDateTime()),
    Column("revoked_at", UTCDateTime()),
    Column("revocation_reason", String(500)),
    Column("issued_at", UTCDateTime(), nullable=False),
    Column("downloaded_at", UTCDateTime()),
    Column("last_used_at", UTCDateTime()),
    Column("certificate_der", LargeBinary, nullable=False),
)

signer = Table(
    "signer",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("name_kanji", String(200)),
    Column("role", String(100), nullable=False),
    Column("status", String(20), nullable=False, default="active"),
    Column("created_at", UTCDateTime(), nullable=False),
)

signer_facility = Table(
    "signer_facility",
    metadata,
    Column("signer_id", String(40), ForeignKey("signer.id"), primary_key=True),
    Column("facility_id", Integer, ForeignKey("facility.id"), primary_key=True),
    Column("created_at", UTCDateTime(), nullable=False),
)

credential = Table(
    "credential",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("signer_id", String(40), ForeignKey("signer.id"), nullable=False, index=True),
    Column("key_id", String(64), nullable=False, unique=True),
    Column("key_algorithm", String(20), nullable=False, default="RSA"),
    Column("key_bits", Integer, nullable=False),
    Column("status", String(30), nullable=False),
    Column("certificate_der", LargeBinary),
    Column("chain_pem", Text),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

audit_event = Table(
    "audit_event",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", String(40), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("facility_code", String(10)),
    Column("signer_id", String(40)),
    Column("action", String(80), nullable=False),
    Column("detail", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    UniqueConstraint("hash"),
)


# -- facility client certificate lifecycle (migration 0003) ------------------------------------

certificate_delivery = Table(
    "certificate_delivery",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "certificate_id",
        Integer,
        ForeignKey("client_certificate.id"),
        nullable=False,
        unique=True,
    ),
    # SHA-256 of the link token: the database alone does not give a working link.
    Column("token_hash", String(64), nullable=False, unique=True),
    # scrypt verifier of the download password (never the password itself).
    Column("password_hash", String(200), nullable=False),
    # The PKCS#12 wrapped with AES-256-GCM under delivery.key_file; NULL once downloaded.
    Column("p12_wrapped", LargeBinary),
    Column("file_name", String(200), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("window_started_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("rounds", Integer, nullable=False, default=1),
    # Wrong passwords checked, and password checks under way (gateway.passwords.AttemptLimit).
    Column("failed_attempts", Integer, nullable=False, default=0),
    Column("checking_attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("locked_at", UTCDateTime()),
    Column("downloaded_at", UTCDateTime()),
)

notification = Table(
    "notification",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("facility_id", Integer, ForeignKey("facility.id"), index=True),
    Column("certificate_id", Integer, ForeignKey("client_certificate.id")),
    # e.g. "expiry-90d" ... "expiry-0d", "expired", "revoked": one row per certificate and kind,
    # claimed by its INSERT, so a reminder is created once however many schedulers run.
    Column("kind", String(40), nullable=False),
    Column("due_at", UTCDateTime(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("recipient", String(320)),
    Column("subject", String(300), nullable=False),
    Column("body", Text, nullable=False),
    Column("smtp_claimed_at", UTCDateTime()),
    Column("sent_at", UTCDateTime()),
    Column("error", String(500)),
    UniqueConstraint("certificate_id", "kind"),
)


# --- FIDO2 enrolment, signer authentication and signature activation (revision 0002) --------
# Enrolment codes and passwords are stored hashed; SAD tokens only as SHA-256. A SAD's
# ``remaining`` and each ``sad_hash.remaining`` are decremented by conditional UPDATEs
# (``... WHERE remaining >= n``) inside one write transaction, so no interleaving of requests
# or worker processes can sign more than was authorized (see gateway/auth/activation.py).

enrollment = Table(
    "enrollment",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("signer_id", String(40), ForeignKey("signer.id"), nullable=False, index=True),
    Column("code_hash", String(64), nullable=False, unique=True),
    Column("password_hash", String(200), nullable=False),
    # Wrong passwords checked, and password checks under way (gateway.passwords.AttemptLimit).
    Column("failed_tries", Integer, nullable=False, default=0),
    Column("checking_tries", Integer, nullable=False, default=0, server_default="0"),
    Column("status", String(20), nullable=False),  # active | locked | used | revoked
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("used_at", UTCDateTime()),
)

fido_credential = Table(
    "fido_credential",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("signer_id", String(40), ForeignKey("signer.id"), nullable=False, index=True),
    Column("credential_id", String(1400), nullable=False, unique=True),  # base64url
    Column("credential_data", LargeBinary, nullable=False),  # AttestedCredentialData
    Column("sign_count", BigInteger, nullable=False),
    Column("aaguid", String(36), nullable=False),
    Column("label", String(200)),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("last_used_at", UTCDateTime()),
)

webauthn_challenge = Table(
    "webauthn_challenge",
    metadata,
    Column("id", String(64), primary_key=True),  # SHA-256 hex of the challenge bytes
    Column("kind", String(20), nullable=False),  # register | authenticate
    Column("signer_id", String(40), ForeignKey("signer.id"), nullable=False),
    Column("facility_id", Integer, ForeignKey("facility.id")),
    Column("enrollment_id", Integer, ForeignKey("enrollment.id")),
    Column("credential_id", String(40)),  # the CSC credential (authenticate)
    Column("binding", Text, nullable=False),  # canonical JSON the challenge commits to
    # The state python-fido2's *_begin returned, as JSON, handed back to *_complete as is.
    Column("fido2_state", Text),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False, index=True),
    Column("used_at", UTCDateTime()),
)

sad = Table(
    "sad",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("facility_id", Integer, ForeignKey("facility.id"), nullable=False),
    Column("signer_id", String(40), ForeignKey("signer.id"), nullable=False),
    Column("credential_id", String(40), ForeignKey("credential.id"), nullable=False),
    Column("fido_credential_id", String(40)),
    # How the signer proved presence (gateway.signing.grant.PRESENCE_*).
    Column("presence", String(20), nullable=False, default="fido2", server_default="fido2"),
    Column("hash_algorithm", String(40)),  # OID; NULL for a signing session (SCAL 1)
    Column("scal", String(1), nullable=False),
    Column("num_signatures", Integer, nullable=False),
    Column("remaining", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False, index=True),
    CheckConstraint("remaining >= 0", name="remaining_not_negative"),
)

sad_hash = Table(
    "sad_hash",
    metadata,
    Column("sad_id", Integer, ForeignKey("sad.id", ondelete="CASCADE"), primary_key=True),
    Column("hash", LargeBinary(64), primary_key=True),
    Column("authorized", Integer, nullable=False),  # multiplicity in the authorized multiset
    Column("remaining", Integer, nullable=False),
    CheckConstraint("remaining >= 0", name="remaining_not_negative"),
)


application = Table(
    "application",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(20), nullable=False, unique=True),
    Column("facility_id", Integer, ForeignKey("facility.id"), index=True),
    Column("institution_code", String(10), nullable=False, index=True),
    Column("kind", String(10), nullable=False),  # new | reapply | stop
    Column("cause", String(30)),
    Column("status", String(20), nullable=False),
    Column("facility_name", String(200), nullable=False),
    Column("facility_kind", String(20), nullable=False),
    Column("provisional", Boolean, nullable=False, default=False),
    Column("new_institution_code", String(10)),
    Column("recipient_name", String(200)),
    Column("contact_email", String(320)),
    Column("terminals", Text, nullable=False, default="[]"),
    Column("remarks", Text),
    Column("applicant", String(200), nullable=False),
    Column("via", String(10), nullable=False),  # officer | facility | vendor
    Column("vendor_id", Integer, ForeignKey("vendor.id")),
    Column("supersedes", String(20)),
    Column("superseded_by", String(20)),
    Column("decided_by", String(200)),
    Column("decision_reason", String(500)),
    Column("certificates", Text, nullable=False, default="[]"),
    Column("idempotency_scope", String(200)),
    Column("idempotency_key", String(100)),
    Column("body_sha256", String(64)),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    UniqueConstraint("idempotency_scope", "idempotency_key"),
)

fee_entry = Table(
    "fee_entry",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("facility_id", Integer, ForeignKey("facility.id"), nullable=False, index=True),
    Column("institution_code", String(10), nullable=False),
    Column("kind", String(20), nullable=False),  # issuance | postage
    Column("amount_yen", Integer, nullable=False),
    Column("occurred_at", UTCDateTime(), nullable=False),
    Column("certificate_serial", String(64), nullable=False),
    Column("event", String(40), nullable=False),
    Column("description", String(300), nullable=False),
    UniqueConstraint("certificate_serial", "kind"),
)

# My Number card (JPKI) presence: a signer's linked authentication certificates, and the
# challenges the card signs (the 48 bytes are kept: the signature is checked against them).
jpki_binding = Table(
    "jpki_binding",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("signer_id", String(40), ForeignKey("signer.id"), nullable=False, index=True),
    Column("spki_sha256", String(64), nullable=False, unique=True),  # one card, one signer
    Column("issuer", String(500), nullable=False),  # RFC 4514 (display; the key decides)
    Column("serial", String(64), nullable=False),  # hex
    Column("certificate_der", LargeBinary, nullable=False),
    Column("not_after", UTCDateTime(), nullable=False),
    Column("label", String(200)),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("last_used_at", UTCDateTime()),
)

jpki_challenge = Table(
    "jpki_challenge",
    metadata,
    Column("id", String(64), primary_key=True),  # SHA-256 hex of the challenge bytes
    Column("kind", String(20), nullable=False),  # register | authenticate
    Column("challenge", LargeBinary(64), nullable=False),
    Column("signer_id", String(40), ForeignKey("signer.id"), nullable=False),
    Column("facility_id", Integer, ForeignKey("facility.id")),
    Column("enrollment_id", Integer, ForeignKey("enrollment.id")),
    Column("credential_id", String(40)),
    Column("binding", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False, index=True),
    Column("used_at", UTCDateTime()),
)
