"""Inputs a security review found answered 500, one check each, on the real parts: python-fido2's
server behind the origin check, the grouped writes and the audit chain on a SQLite file,
cryptography reading certificates and requests the tests build and sign, the JSON loader."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from gateway.audit import AuditLog, event_hash
from gateway.auth import presence
from gateway.auth.fido2 import Fido2Authenticator
from gateway.auth.jpki import card_key, parse_auth_data, verify_card_signature
from gateway.errors import GatewayError, InvalidRequest
from gateway.lifecycle.applications import _audited_key, _check_idempotency_key
from gateway.pki import csr_check
from gateway.signing.grant import Caller
from gateway.store.db import Database
from gateway.store.schema import audit_event

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TEST refusal inputs")])
CALLER = Caller(actor="facility:1310000011", facility_id=1, institution_code="1310000011")


def _re_sign(der: bytes, tbs: bytes, new_tbs: bytes, signature: bytes) -> bytes:
    """``der`` with its signed part replaced (same length) and signed again by KEY."""
    assert len(new_tbs) == len(tbs) and der.count(tbs) == 1 and der.endswith(signature)
    return der.replace(tbs, new_tbs)[: -len(signature)] + KEY.sign(
        new_tbs, padding.PKCS1v15(), hashes.SHA256()
    )


def _certificate(*, key_oid_last_byte: int = 0x01) -> x509.Certificate:
    """A self-signed RSA certificate; its SPKI algorithm 1.2.840.113549.1.1.<last byte>."""
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(KEY.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(KEY, hashes.SHA256())
    )
    rsa_encryption = bytes.fromhex("06092a864886f70d010101")
    tbs = cert.tbs_certificate_bytes
    new_tbs = tbs.replace(rsa_encryption, rsa_encryption[:-1] + bytes([key_oid_last_byte]))
    der = cert.public_bytes(serialization.Encoding.DER)
    return x509.load_der_x509_certificate(_re_sign(der, tbs, new_tbs, cert.signature))


# -- 1. FIDO2 origin; unexpected exceptions in a presence check ------------------------------


def test_an_origin_of_another_json_type_is_not_allowed() -> None:
    auth = Fido2Authenticator(
        db=Database("sqlite+aiosqlite://"), audit=AuditLog(), rp_id="localhost", rp_name="TEST",
        origins=frozenset({"https://localhost"}),
    )  # fmt: skip
    assert auth._origin_allowed("https://localhost")
    for origin in (["https://localhost"], {"a": 1}, None, 1, "https://evil.example"):
        assert not auth._origin_allowed(origin)  # a list raised TypeError (unhashable)


async def _store(tmp_path: Path) -> Database:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/gw.db")
    await db.migrate()
    return db


async def test_an_unexpected_exception_in_a_grouped_unit_is_its_refusal(tmp_path: Path) -> None:
    db = await _store(tmp_path)
    recorded: list[GatewayError] = []
    try:

        def broken(conn: Any) -> None:
            {}[["origin"]]  # type: ignore[index]  # TypeError: unhashable type: 'list'

        with pytest.raises(presence.CheckFailed) as e:
            await db.run_grouped(
                presence.refusing(broken), on_refusal=lambda c, err: recorded.append(err)
            )
        assert e.value.status == 500 and isinstance(e.value.__cause__, TypeError)
        assert recorded == [e.value]  # the grouped write ran on_refusal: audit, burn
        assert e.value.description == "presence check failed: unexpected TypeError"
        assert "TypeError" not in e.value.client_description

        def refused(conn: Any) -> None:
            raise InvalidRequest("refused as before")

        with pytest.raises(InvalidRequest):
            await db.run_grouped(
                presence.refusing(refused), on_refusal=lambda c, err: recorded.append(err)
            )
        assert [type(r) for r in recorded] == [presence.CheckFailed, InvalidRequest]

        def store_error(conn: Any) -> None:
            raise OperationalError("SELECT 1", {}, Exception("disk I/O error"))

        # The store's own errors keep their path: no refusal to record in a failing store.
        with pytest.raises(OperationalError):
            await db.run_grouped(
                presence.refusing(store_error), on_refusal=lambda c, err: recorded.append(err)
            )
        assert len(recorded) == 2
    finally:
        await db.close()


async def test_an_unexpected_exception_in_an_attempt_is_audited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = await _store(tmp_path)
    audit = AuditLog()
    try:
        auth = Fido2Authenticator(
            db=db, audit=audit, rp_id="localhost", rp_name="TEST",
            origins=frozenset({"https://localhost"}),
        )  # fmt: skip
        now = dt.datetime.now(dt.UTC)
        with caplog.at_level("ERROR", logger="gateway.auth"), pytest.raises(presence.CheckFailed):
            async with auth.attempt("test.refused", CALLER, now=now, challenge="00" * 32):
                raise KeyError("secret-proof-data")
        # One line naming the type and where; no stack trace, nothing of the exception's data.
        (rec,) = [r for r in caplog.records if r.name == "gateway.auth"]
        assert rec.exc_info is None
        assert rec.getMessage().startswith("presence check failed: unexpected KeyError at ")
        assert "test_refusal_inputs.py:" in rec.getMessage()
        assert "secret-proof-data" not in caplog.text
        async with db.read() as conn:
            rows = (
                await conn.execute(
                    select(audit_event).where(audit_event.c.action == "test.refused")
                )
            ).all()
            assert len(rows) == 1
            assert json.loads(rows[0].detail) == {
                "reason": "presence check failed: unexpected KeyError"
            }
            assert (await audit.verify(conn)).ok
    finally:
        await db.close()


# -- 2. the JPKI authData value ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("[" * 50_000 + "]" * 50_000, "the jpki value is nested deeper than 32 levels"),
        ("[" + "9" * 5000 + "]", "the jpki value has a number with too many digits"),
        ("{", "the jpki value is not valid JSON: Expecting property name enclosed in double"),
    ],
    ids=["deep", "digits", "not-json"],
)
def test_jpki_value_is_read_with_the_bounded_loader(value: str, text: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_auth_data([{"id": "jpki", "value": value}])
    assert e.value.description.startswith(f"Invalid parameter authData: {text}")


def test_jpki_challenge_id_must_be_printable_ascii() -> None:
    cert = _certificate()
    der = cert.public_bytes(serialization.Encoding.DER)
    value = {
        "certificate": base64.b64encode(der).decode(),
        "signature": "AAAA",
        "challenge_id": "\udcff",  # what a JSON "\udcff" escape becomes
    }
    with pytest.raises(InvalidRequest) as e:
        parse_auth_data([{"id": "jpki", "value": value}])
    assert e.value.description == (
        "Invalid parameter authData: the jpki challenge_id is not printable ASCII"
    )


# -- 3. a card certificate whose key algorithm cryptography cannot load -----------------------


def test_a_card_key_of_an_unknown_algorithm_is_400() -> None:
    cert = _certificate(key_oid_last_byte=0x63)  # 1.2.840.113549.1.1.99
    for check in (lambda: card_key(cert), lambda: verify_card_signature(cert, b"c", b"s")):
        with pytest.raises(InvalidRequest) as e:
            check()
        assert e.value.description == (
            "the JPKI authentication certificate's key cannot be read (algorithm "
            "1.2.840.113549.1.1.99): a card's key is RSA"
        )
    assert isinstance(card_key(_certificate()), rsa.RSAPublicKey)


# -- 4. PKCS#10 requests whose parts cryptography cannot read ---------------------------------


DIGITAL_SIGNATURE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False,
)  # fmt: skip


def _csr(ext_der: bytes, oid_last_byte: int) -> x509.CertificateSigningRequest:
    """A request signed by KEY with keyUsage, and ``ext_der`` as extension 2.5.29.<last byte>."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.99"), ext_der),
            critical=False,
        )
        .add_extension(DIGITAL_SIGNATURE, critical=True)
        .sign(KEY, hashes.SHA256())
    )
    tbs = csr.tbs_certrequest_bytes
    new_tbs = tbs.replace(
        bytes.fromhex("0603551d63"), bytes.fromhex("0603551d") + bytes([oid_last_byte])
    )
    der = _re_sign(csr.public_bytes(serialization.Encoding.DER), tbs, new_tbs, csr.signature)
    out = x509.load_der_x509_csr(der)
    assert out.is_signature_valid
    return out


@pytest.mark.parametrize(
    ("ext_der", "oid", "text"),
    [
        (bytes.fromhex("03020780"), 0x0F, "Duplicate 2.5.29.15 extension"),  # keyUsage twice
        (bytes.fromhex("3003010105"), 0x13, "BasicConstraints::ca"),  # BOOLEAN 0x05
    ],
    ids=["duplicate-key-usage", "bad-basic-constraints"],
)
def test_an_unreadable_extension_is_invalid_request(ext_der: bytes, oid: int, text: str) -> None:
    csr = _csr(ext_der, oid)
    with pytest.raises(InvalidRequest) as e:
        csr_check.check_request(csr, current=_certificate(), min_rsa_bits=2048)
    assert e.value.description.startswith("the request's extensions cannot be read (")
    assert text in e.value.description


# -- 5. Idempotency-Key, and the audit chain given a string UTF-8 cannot encode ---------------


def test_an_idempotency_key_is_printable_ascii() -> None:
    for good in ("form-0001", "a" * 100, "webform 2026/11/27 #1"):
        _check_idempotency_key(good)
        assert _audited_key(good) == good
    for bad in ("k\udcff", "フォーム-1", "a" * 101, " ", "", "a\nb"):
        with pytest.raises(InvalidRequest) as e:
            _check_idempotency_key(bad)
        assert e.value.description == "an idempotency key is 1-100 printable ASCII characters"
        recorded = _audited_key(bad)
        assert recorded is not None and len(recorded) <= 600
        recorded.encode("utf-8")  # always encodable
    assert _audited_key("k\udcff") == "k\\udcff"


async def test_the_audit_chain_takes_a_string_utf8_cannot_encode(tmp_path: Path) -> None:
    db = await _store(tmp_path)
    audit = AuditLog(key=b"k" * 32)
    try:
        async with db.write() as conn:
            plain = await audit.append(
                conn, action="test.plain", actor="facility:1310000011",
                detail={"reason": "日本語 text"},
            )  # fmt: skip
            odd = await audit.append(
                conn, action="test.odd", actor="facility:\udcff", signer_id="s\udcff",
                detail={"reason": "k\udcff"},
            )  # fmt: skip
        # A string that encodes is hashed exactly as before (the chain's existing hashes).
        assert plain.detail == '{"reason":"日本語 text"}'
        assert plain.hash == event_hash(
            key=b"k" * 32, seq=plain.seq, ts=plain.ts, actor="facility:1310000011",
            facility_code=None, signer_id=None, action="test.plain", detail=plain.detail,
            prev_hash=plain.prev_hash,
        )  # fmt: skip
        # The other is stored escaped; its detail is still JSON of the same value.
        assert odd.actor == "facility:\\udcff" and odd.signer_id == "s\\udcff"
        assert odd.detail == '{"reason":"k\\udcff"}'
        assert json.loads(odd.detail) == {"reason": "k\udcff"}
        async with db.read() as conn:
            report = await audit.verify(conn)
        assert report.ok and report.events == 2
    finally:
        await db.close()
