"""XAdES long-term forms (ETSI TS 101 903): ES-XL and ES-A, as the e-prescription samples carry
them (HPKI.md §3).

ES-XL adds, after the SignatureTimeStamp: an XAdES 1.4.1 TimeStampValidationData with the TSA's
chain and its CRLs, CertificateValues with the signer's issuers, and RevocationValues with the
CRLs that show the signer's path not revoked at signing. ES-A adds an XAdES 1.4.1
ArchiveTimeStamp over everything before it, then that timestamp's own TimeStampValidationData.

Revocation data comes from :class:`gateway.pki.crl.CrlSource` (configured files, or downloads
from the distribution points with a time-out, cached until nextUpdate): never fetched per
request while a cached CRL is current. Without a current CRL the request fails with
RevocationUnavailable (503, Retry-After) before the signer's key is used.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree

from gateway.errors import RevocationUnavailable, TsaUnavailable
from gateway.hsm.api import DigestAlgorithm
from gateway.pki.crl import CrlSource
from gateway.sign import timestamp as ts
from gateway.sign.xades import C14N10, DS, XADES, unsigned_signature_properties

__all__ = [
    "LEVELS",
    "LongTermSource",
    "ValidationData",
    "add_archive_timestamp",
    "add_validation_data",
    "signer_validation_data",
    "tsa_validation_data",
]

XADES141 = "http://uri.etsi.org/01903/v1.4.1#"
_DS = "{%s}" % DS  # noqa: UP031
_XA = "{%s}" % XADES  # noqa: UP031
_XA141 = "{%s}" % XADES141  # noqa: UP031
#: CSC conformance_level -> XAdES form.
LEVELS = {"AdES-B-B": "ES-BES", "AdES-B-T": "ES-T", "AdES-B-LT": "ES-XL", "AdES-B-LTA": "ES-A"}


@dataclass
class LongTermSource:
    """Where validation data comes from: CRLs (files / distribution points, cached) and the
    TSA trust anchors that end the TSA's chain."""

    crls: CrlSource = field(default_factory=CrlSource)
    tsa_anchors: Sequence[x509.Certificate] = ()
    #: HPKI anchors and intermediates: the signer's chain when extending a signature that
    #: carries only the signer's certificate.
    certs: Sequence[x509.Certificate] = ()


@dataclass
class ValidationData:
    certs: list[x509.Certificate] = field(default_factory=list)
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)


def _der(c: x509.Certificate | x509.CertificateRevocationList) -> str:
    return base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii")


def _path(leaf: x509.Certificate, pool: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """``leaf`` and its issuers found in ``pool`` by name, up to a self-signed one."""
    out = [leaf]
    while out[-1].issuer != out[-1].subject and len(out) < 6:
        nxt = next((c for c in pool if c.subject == out[-1].issuer and c not in out), None)
        if nxt is None:
            break
        out.append(nxt)
    return out


async def _crls_for(
    path: Sequence[x509.Certificate], source: LongTermSource, now: dt.datetime, *, required: bool
) -> list[x509.CertificateRevocationList]:
    out: list[x509.CertificateRevocationList] = []
    for child, issuer in itertools.pairwise(path):
        crl, why = await source.crls.current_crl(child, issuer, now)
        if crl is None:
            if required:
                raise RevocationUnavailable(
                    f"no current CRL of {issuer.subject.rfc4514_string()} for the long-term "
                    f"signature: {why}; nothing was signed"
                )
            continue
        if crl not in out:
            out.append(crl)
    return out


async def signer_validation_data(
    chain: Sequence[x509.Certificate], source: LongTermSource, now: dt.datetime
) -> ValidationData:
    """The signer's issuers and the CRLs over its path (fetched before the key is used)."""
    path = _path(chain[0], chain[1:])
    return ValidationData(
        certs=list(path[1:]), crls=await _crls_for(path, source, now, required=True)
    )


async def tsa_validation_data(
    token_der: bytes, source: LongTermSource, now: dt.datetime
) -> ValidationData:
    """The TSA's chain (from the token and the TSA anchors) and the CRLs found for it.

    A TSA certificate without a distribution point or configured CRL is carried without one
    (test TSAs); one whose CRL server fails stops the request.
    """
    token = ts.parse_token(token_der)
    signer = ts._find_signer_cert(token.signed_data["signer_infos"][0], token.certificates)
    if signer is None:
        raise TsaUnavailable("the timestamp token does not carry the TSA certificate")
    path = _path(signer, [*token.certificates, *source.tsa_anchors])
    crls: list[x509.CertificateRevocationList] = []
    for child, issuer in itertools.pairwise(path):
        crl, why = await source.crls.current_crl(child, issuer, now)
        if crl is not None:
            crls.append(crl)
        elif "did not answer" in why:
            raise RevocationUnavailable(
                f"no current CRL of {issuer.subject.rfc4514_string()} for the TSA: {why}; "
                "nothing was returned"
            )
    return ValidationData(certs=path, crls=crls)


def _new_id(sample: bool, kind: str, uid: str) -> str:
    return f"id{secrets.token_hex(4)}" if sample else f"{kind}-{uid}"


def _values(parent: etree._Element, data: ValidationData, *, sample: bool, uid: str) -> None:
    cv = etree.SubElement(parent, _XA + "CertificateValues")
    cv.set("Id", _new_id(sample, "certificate-values", uid))
    for c in data.certs:
        etree.SubElement(cv, _XA + "EncapsulatedX509Certificate").text = _der(c)
    if data.crls:
        rv = etree.SubElement(parent, _XA + "RevocationValues")
        rv.set("Id", _new_id(sample, "revocation-values", uid))
        crl_values = etree.SubElement(rv, _XA + "CRLValues")
        for crl in data.crls:
            etree.SubElement(crl_values, _XA + "EncapsulatedCRLValue").text = _der(crl)


def _timestamp_validation_data(
    usp: etree._Element, ts_el: etree._Element, data: ValidationData, *, sample: bool, uid: str
) -> None:
    tsvd = etree.SubElement(
        usp, _XA141 + "TimeStampValidationData", nsmap={"xa141" if sample else "xades141": XADES141}
    )
    tsvd.set("Id", _new_id(sample, "tsvd", uid))
    tsvd.set("URI", f"#{ts_el.get('Id')}")
    _values(tsvd, data, sample=sample, uid=uid)


def add_validation_data(
    sig: etree._Element,
    *,
    signer: ValidationData,
    tsa: ValidationData,
    sample: bool,
    uid: str,
) -> None:
    """ES-T -> ES-XL: TimeStampValidationData for the SignatureTimeStamp, CertificateValues and
    RevocationValues (in the samples' order)."""
    usp = unsigned_signature_properties(sig)
    sts = usp.find(_XA + "SignatureTimeStamp")
    if sts is None:
        raise ValueError("ES-XL needs a SignatureTimeStamp first")
    _timestamp_validation_data(usp, sts, tsa, sample=sample, uid=uid)
    _values(usp, signer, sample=sample, uid=uid)


async def add_archive_timestamp(
    sig: etree._Element,
    *,
    tsa: ts.TimestampClient,
    source: LongTermSource,
    sample: bool,
    uid: str,
    now: dt.datetime,
    content: bytes | None = None,
) -> None:
    """ES-XL -> ES-A (or a renewed ES-A): an ArchiveTimeStamp over the signature and all the
    unsigned properties before it, then its own TimeStampValidationData."""
    from gateway.verify.xml_refs import archive_timestamp_input, id_index

    tree = sig.getroottree()
    index, _ = id_index(tree.getroot())
    data = archive_timestamp_input(sig, None, tree, index, exclusive=False, content=content)
    token = await tsa.timestamp(hashlib.sha256(data).digest(), DigestAlgorithm.SHA256)
    tsa_data = await tsa_validation_data(token, source, now)
    usp = unsigned_signature_properties(sig)
    ats = etree.SubElement(
        usp, _XA141 + "ArchiveTimeStamp", nsmap={"xa141" if sample else "xades141": XADES141}
    )
    ats.set("Id", _new_id(sample, "archive-ts", uid + secrets.token_hex(2)))
    etree.SubElement(ats, _DS + "CanonicalizationMethod").set("Algorithm", C14N10)
    etree.SubElement(ats, _XA + "EncapsulatedTimeStamp").text = base64.b64encode(token).decode()
    _timestamp_validation_data(usp, ats, tsa_data, sample=sample, uid=uid + secrets.token_hex(2))


@dataclass
class LongTerm:
    """A request for ES-XL or ES-A: the signer's validation data is gathered (and can fail)
    before the key is used."""

    form: str  # "ES-XL" | "ES-A"
    signer: ValidationData
    source: LongTermSource


async def prepare_long_term(
    conformance_level: str,
    chain: Sequence[x509.Certificate],
    source: LongTermSource | None,
    now: dt.datetime,
) -> LongTerm | None:
    form = LEVELS.get(conformance_level)
    if form not in ("ES-XL", "ES-A"):
        return None
    source = source or LongTermSource()
    return LongTerm(form, await signer_validation_data(chain, source, now), source)


async def finish_long_term(
    sig: etree._Element,
    token: bytes | None,
    long_term: LongTerm,
    *,
    tsa: ts.TimestampClient,
    sample: bool,
    uid: str,
    now: dt.datetime,
    content: bytes | None = None,
) -> None:
    """ES-T -> ES-XL (-> ES-A) on a signature that already has its SignatureTimeStamp."""
    if token is None:
        raise ValueError("a long-term signature needs its signature timestamp")
    tsa_data = await tsa_validation_data(token, long_term.source, now)
    add_validation_data(sig, signer=long_term.signer, tsa=tsa_data, sample=sample, uid=uid)
    if long_term.form == "ES-A":
        await add_archive_timestamp(
            sig,
            tsa=tsa,
            source=long_term.source,
            sample=sample,
            uid=uid,
            now=now,
            content=content,
        )
