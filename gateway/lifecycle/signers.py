"""Signers (doctors, pharmacists) and their credentials (an HSM key + HPKI certificate).

A signer may serve several facilities. Production flow: ``add`` generates the key on the token
(credential status ``pending_certificate``), ``csr`` exports a PKCS#10 request signed by that key,
``import_cert`` attaches the certificate the HPKI CA issued after checking it carries the same
public key and meets the HPKI signing profile. In a sandbox, ``add`` has the TEST HPKI CA issue
the certificate at once.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from gateway.audit import AuditLog
from gateway.clock import Clock, system_clock
from gateway.errors import Conflict, GatewayError, InvalidRequest, NotFound, PkiError
from gateway.hsm.api import GeneratedKey, KeyStore
from gateway.pki import hpki
from gateway.pki.csr import build_csr, public_key_matches
from gateway.pki.issue import TEST_SIGN_CRL_URL, CertAndKey, issue_hpki_signer_cert
from gateway.pki.load import parse_certificate, parse_pem_chain
from gateway.store import signers as signer_store
from gateway.store.db import Database
from gateway.store.schema import credential, facility, signer, signer_facility

log = logging.getLogger("gateway.signers")
_ROLE_RE = re.compile(r"^[A-Za-z][A-Za-z .,'()-]{1,63}$")


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


@dataclass(frozen=True, kw_only=True)
class TestIssuer:
    """Sandbox only: the TEST HPKI signing CA that issues signer certificates directly."""

    ca_cert: x509.Certificate
    ca_key: rsa.RSAPrivateKey
    chain: list[x509.Certificate]  # CA first, then up to the root
    #: Where the sandbox serves this CA's CRL and its OCSP responder (written in each cert).
    crl_url: str | None = None
    ocsp_url: str | None = None
    ca_issuers_url: str | None = None

    @classmethod
    def load(
        cls,
        cert_path: Path,
        key_path: Path,
        anchors: list[Path],
        *,
        crl_url: str | None = None,
        ocsp_url: str | None = None,
        ca_issuers_url: str | None = None,
    ) -> TestIssuer:
        ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise PkiError("the test CA key must be RSA")
        chain = [ca_cert]
        for p in anchors:
            chain.extend(parse_pem_chain(p.read_bytes()))
        return cls(
            ca_cert=ca_cert,
            ca_key=key,
            chain=chain,
            crl_url=crl_url,
            ocsp_url=ocsp_url,
            ca_issuers_url=ca_issuers_url,
        )


@dataclass(frozen=True, kw_only=True)
class Credential:
    id: str
    signer_id: str
    key_id: str
    key_algorithm: str
    key_bits: int
    status: str
    certificate: x509.Certificate | None
    chain: list[x509.Certificate]

    @classmethod
    def from_row(cls, r: Any) -> Credential:
        return cls(
            id=r.id,
            signer_id=r.signer_id,
            key_id=r.key_id,
            key_algorithm=r.key_algorithm,
            key_bits=r.key_bits,
            status=r.status,
            certificate=(
                x509.load_der_x509_certificate(r.certificate_der) if r.certificate_der else None
            ),
            chain=parse_pem_chain(r.chain_pem.encode()) if r.chain_pem else [],
        )


@dataclass(frozen=True, kw_only=True)
class Signer:
    id: str
    name: str
    name_kanji: str | None
    role: str
    status: str
    facilities: list[str]
    credentials: list[Credential]

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "name_kanji": self.name_kanji,
            "role": self.role,
            "status": self.status,
            "facilities": self.facilities,
            "credentials": [
                {
                    "id": c.id,
                    "status": c.status,
                    "key": f"{c.key_algorithm}-{c.key_bits}",
                    "certificate_serial": (
                        format(c.certificate.serial_number, "x") if c.certificate else None
                    ),
                    "not_after": (
                        c.certificate.not_valid_after_utc.isoformat() if c.certificate else None
                    ),
                }
                for c in self.credentials
            ],
        }


class SignerService:
    def __init__(
        self,
        *,
        db: Database,
        audit: AuditLog,
        keystore: KeyStore | None,
        key_bits: int = 2048,
        test_issuer: TestIssuer | None = None,
        trust_anchors: list[x509.Certificate] | None = None,
        intermediates: list[x509.Certificate] | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.db = db
        self.clock = clock
        self.audit = audit
        self._keystore = keystore
        self.key_bits = key_bits
        self.test_issuer = test_issuer
        self.trust_anchors = trust_anchors or []
        self.intermediates = intermediates or []

    @property
    def keys(self) -> KeyStore:
        """The key store; commands that touch no key (list, link, lock) run without one."""
        if self._keystore is None:
            raise GatewayError("this operation needs the HSM key store, which was not opened")
        return self._keystore

    async def _facility_ids(self, codes: list[str]) -> dict[str, int]:
        if not codes:
            raise InvalidRequest("a signer needs at least one facility (--facility CODE)")
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(facility.c.id, facility.c.institution_code).where(
                        facility.c.institution_code.in_(codes)
                    )
                )
            ).all()
        found = {r.institution_code: r.id for r in rows}
        missing = [c for c in codes if c not in found]
        if missing:
            raise NotFound(f"facility {', '.join(missing)} is not registered")
        return found

    async def add(
        self,
        *,
        name: str,
        role: str,
        facilities: list[str],
        actor: str,
        name_kanji: str | None = None,
        serial_number_attr: str | None = None,
        organization: str | None = None,
    ) -> Signer:
        name = name.strip()
        if not name or len(name) > 200:
            raise InvalidRequest("signer name must be 1-200 characters")
        if not _ROLE_RE.match(role):
            raise InvalidRequest(
                f"role {role!r} is not an hcRole text (e.g. 'Medical Doctor', 'Pharmacist')"
            )
        fac_ids = await self._facility_ids(facilities)
        signer_id = _new_id("sgn")
        cred_id = _new_id("cred")
        key = await self.keys.generate_rsa_key(label=f"hpki-{signer_id}", bits=self.key_bits)
        cert_der: bytes | None = None
        chain_pem: str | None = None
        status = "pending_certificate"
        if self.test_issuer is not None:
            cert = issue_hpki_signer_cert(
                self.test_issuer_ca(),
                public_key_der=key.public_key_der,
                name_romaji=name,
                name_kanji=name_kanji or name,
                role=role,
                organization=organization or "HPKI TEST FACILITY",
                serial_number_attr=serial_number_attr or signer_id.upper(),
                now=self.clock(),
                crl_url=self.test_issuer.crl_url or TEST_SIGN_CRL_URL,
                ocsp_url=self.test_issuer.ocsp_url,
                ca_issuers_url=self.test_issuer.ca_issuers_url,
            )
            cert_der = cert.public_bytes(serialization.Encoding.DER)
            chain_pem = "".join(
                c.public_bytes(serialization.Encoding.PEM).decode() for c in self.test_issuer.chain
            )
            status = "active"
        now = self.clock()
        try:
            await self._store_new_signer(
                signer_id=signer_id,
                cred_id=cred_id,
                name=name,
                name_kanji=name_kanji,
                role=role,
                fac_ids=fac_ids,
                key=key,
                status=status,
                cert_der=cert_der,
                chain_pem=chain_pem,
                actor=actor,
                now=now,
            )
        except BaseException:
            # No credential refers to the new key: remove it rather than leave it on the token.
            try:
                await self.keys.destroy_key(key.key_id)
            except GatewayError:
                log.error("could not remove unused key %s from the token", key.key_id)
            raise
        return await self.get(signer_id)

    async def _store_new_signer(
        self,
        *,
        signer_id: str,
        cred_id: str,
        name: str,
        name_kanji: str | None,
        role: str,
        fac_ids: dict[str, int],
        key: GeneratedKey,
        status: str,
        cert_der: bytes | None,
        chain_pem: str | None,
        actor: str,
        now: datetime,
    ) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                insert(signer).values(
                    id=signer_id,
                    name=name,
                    name_kanji=name_kanji,
                    role=role,
                    status="active",
                    created_at=now,
                )
            )
            for fid in fac_ids.values():
                await conn.execute(
                    insert(signer_facility).values(
                        signer_id=signer_id, facility_id=fid, created_at=now
                    )
                )
            await conn.execute(
                insert(credential).values(
                    id=cred_id,
                    signer_id=signer_id,
                    key_id=key.key_id,
                    key_algorithm="RSA",
                    key_bits=key.key_size,
                    status=status,
                    certificate_der=cert_der,
                    chain_pem=chain_pem,
                    created_at=now,
                    updated_at=now,
                )
            )
            await self.audit.append(
                conn,
                action="signer.add",
                actor=actor,
                signer_id=signer_id,
                detail={
                    "name": name,
                    "role": role,
                    "facilities": sorted(fac_ids),
                    "credential": cred_id,
                    "key_id": key.key_id,
                    "certificate": "issued by TEST CA" if cert_der else "pending",
                },
                now=now,
            )

    def test_issuer_ca(self) -> CertAndKey:
        assert self.test_issuer is not None
        return CertAndKey(cert=self.test_issuer.ca_cert, key=self.test_issuer.ca_key)

    async def get(self, signer_id: str) -> Signer:
        async with self.db.read() as conn:
            srow = (
                await conn.execute(select(signer).where(signer.c.id == signer_id))
            ).one_or_none()
            if srow is None:
                raise NotFound(f"signer {signer_id} does not exist")
            codes = (
                await conn.execute(
                    select(facility.c.institution_code)
                    .select_from(signer_facility.join(facility))
                    .where(signer_facility.c.signer_id == signer_id)
                    .order_by(facility.c.institution_code)
                )
            ).scalars()
            creds = (
                await conn.execute(
                    select(credential)
                    .where(credential.c.signer_id == signer_id)
                    .order_by(credential.c.created_at)
                )
            ).all()
            return Signer(
                id=srow.id,
                name=srow.name,
                name_kanji=srow.name_kanji,
                role=srow.role,
                status=srow.status,
                facilities=list(codes),
                credentials=[Credential.from_row(c) for c in creds],
            )

    async def list_signers(self, *, institution_code: str | None = None) -> list[Signer]:
        async with self.db.read() as conn:
            q = select(signer.c.id).order_by(signer.c.created_at)
            if institution_code is not None:
                q = (
                    select(signer.c.id)
                    .select_from(signer.join(signer_facility).join(facility))
                    .where(facility.c.institution_code == institution_code)
                    .order_by(signer.c.created_at)
                )
            ids = list((await conn.execute(q)).scalars())
        return [await self.get(i) for i in ids]

    async def facility_credentials(
        self, facility_id: int, *, user_id: str | None = None, credential_id: str | None = None
    ) -> list[Credential]:
        """The credentials offered to a facility (CSC ``credentials/list`` and ``info``)."""
        async with self.db.read() as conn:
            rows = await signer_store.facility_credentials(
                conn, facility_id, user_id=user_id, credential_id=credential_id
            )
        return [Credential.from_row(r) for r in rows]

    async def _only_credential(self, signer_id: str) -> Credential:
        s = await self.get(signer_id)
        if not s.credentials:
            raise NotFound(f"signer {signer_id} has no credential")
        return s.credentials[-1]

    async def csr(self, signer_id: str, *, actor: str) -> bytes:
        """PKCS#10 request (DER) signed by the signer's HSM key, for the HPKI CA."""
        s = await self.get(signer_id)
        cred = await self._only_credential(signer_id)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
                x509.NameAttribute(NameOID.COMMON_NAME, s.name),
            ]
        )
        public_der = await self.keys.public_key_der(cred.key_id)
        handle = await self.keys.get_key(cred.key_id)
        der = await build_csr(public_key_der=public_der, subject=subject, key=handle)
        await self.audit.append_alone(
            self.db,
            action="credential.csr",
            actor=actor,
            signer_id=signer_id,
            detail={"credential": cred.id},
        )
        return der

    async def import_cert(
        self,
        signer_id: str,
        cert_data: bytes,
        *,
        chain: list[x509.Certificate] | None = None,
        actor: str,
    ) -> Credential:
        """Attach a CA-issued certificate: same public key, HPKI profile, role, chain."""
        s = await self.get(signer_id)
        cred = await self._only_credential(signer_id)
        cert = parse_certificate(cert_data)
        public_der = await self.keys.public_key_der(cred.key_id)
        if not public_key_matches(cert, public_der):
            raise PkiError(
                f"the certificate's public key is not the key of credential {cred.id} "
                "(was it issued for another CSR?)"
            )
        problems = hpki.check_signing_profile(cert)
        if problems:
            raise PkiError("not an HPKI signing certificate: " + "; ".join(problems))
        roles = hpki.parse_hcroles(cert)
        if roles != [s.role]:
            raise PkiError(
                f"the certificate's hcRole {roles} does not match the signer's role {s.role!r}"
            )
        chain_certs: list[x509.Certificate] = list(chain or [])
        if not self.trust_anchors:
            raise PkiError("no HPKI trust anchors configured (pki.hpki_trust_anchors)")
        path = hpki.verify_chain(
            cert,
            intermediates=chain_certs + self.intermediates,
            trust_anchors=self.trust_anchors,
            moment=self.clock(),
        )
        chain_certs = path[1:]  # the validated path (issuing CAs up to the anchor) is stored
        chain_pem = "".join(
            c.public_bytes(serialization.Encoding.PEM).decode() for c in chain_certs
        )
        now = self.clock()
        async with self.db.write() as conn:
            await conn.execute(
                update(credential)
                .where(credential.c.id == cred.id)
                .values(
                    certificate_der=cert.public_bytes(serialization.Encoding.DER),
                    chain_pem=chain_pem or None,
                    status="active",
                    updated_at=now,
                )
            )
            await self.audit.append(
                conn,
                action="credential.import_cert",
                actor=actor,
                signer_id=signer_id,
                detail={
                    "credential": cred.id,
                    "serial": format(cert.serial_number, "x"),
                    "issuer": cert.issuer.rfc4514_string(),
                    "not_after": cert.not_valid_after_utc.isoformat(),
                },
                now=now,
            )
        return (await self.get(signer_id)).credentials[-1]

    async def link(self, signer_id: str, institution_code: str, *, actor: str) -> None:
        await self.get(signer_id)
        fid = (await self._facility_ids([institution_code]))[institution_code]
        async with self.db.write() as conn:
            try:
                await conn.execute(
                    insert(signer_facility).values(
                        signer_id=signer_id, facility_id=fid, created_at=self.clock()
                    )
                )
            except IntegrityError as e:
                raise Conflict(f"signer {signer_id} already serves {institution_code}") from e
            await self.audit.append(
                conn,
                action="signer.link",
                actor=actor,
                signer_id=signer_id,
                facility_code=institution_code,
            )

    async def unlink(self, signer_id: str, institution_code: str, *, actor: str) -> None:
        fid = (await self._facility_ids([institution_code]))[institution_code]
        async with self.db.write() as conn:
            res = await conn.execute(
                delete(signer_facility)
                .where(signer_facility.c.signer_id == signer_id)
                .where(signer_facility.c.facility_id == fid)
            )
            if res.rowcount == 0:
                raise NotFound(f"signer {signer_id} does not serve {institution_code}")
            await self.audit.append(
                conn,
                action="signer.unlink",
                actor=actor,
                signer_id=signer_id,
                facility_code=institution_code,
            )

    async def set_status(
        self, signer_id: str, *, status: str, reason: str | None, actor: str
    ) -> None:
        """Lock (``locked``) or unlock (``active``) a signer; a locked signer cannot sign."""
        if status not in ("active", "locked"):
            raise InvalidRequest(f"signer status {status!r} is not 'active' or 'locked'")
        async with self.db.write() as conn:
            res = await conn.execute(
                update(signer).where(signer.c.id == signer_id).values(status=status)
            )
            if res.rowcount == 0:
                raise NotFound(f"signer {signer_id} does not exist")
            await self.audit.append(
                conn,
                action="signer.lock" if status == "locked" else "signer.unlock",
                actor=actor,
                signer_id=signer_id,
                detail={"reason": reason},
            )
