"""XAdES long-term forms (ETSI TS 101 903): ES-XL and ES-A, as the e-prescription samples carry
them (HPKI.md §3).

ES-XL adds, after the SignatureTimeStamp: an XAdES 1.4.1 TimeStampValidationData with the TSA's
chain and its CRLs, CertificateValues with the signer's issuers, and RevocationValues with the
CRLs that show the signer's path not revoked at signing. ES-A adds an XAdES 1.4.1
ArchiveTimeStamp over everything before it, then that timestamp's own TimeStampValidationData.

Revocation data: for a certificate whose AIA names an OCSP responder, that responder's answer
(``LongTermSource.ocsp``; cached until its nextUpdate) is embedded as an OCSP response
(OCSPValues), with the CRLs as the fallback unless ``revocation = "ocsp"``; otherwise, and as
the fallback, a CRL from :class:`gateway.pki.crl.CrlSource` (configured files, or downloads from
the distribution points with a time-out, cached until nextUpdate). Never fetched per request
while a cached answer is current. Without usable revocation data the request fails with
RevocationUnavailable (503, Retry-After) before the signer's key is used.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from lxml import etree

from gateway.errors import AccessDenied, RevocationUnavailable, TsaUnavailable
from gateway.hsm.api import DigestAlgorithm
from gateway.pki.crl import CrlSource
from gateway.pki.ocsp import OcspClient, OcspResult, ocsp_urls
from gateway.sign import ids
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
    """Where validation data comes from: OCSP where a certificate names a responder, CRLs
    (files / distribution points, cached), and the TSA trust anchors that end the TSA's chain."""

    crls: CrlSource = field(default_factory=CrlSource)
    tsa_anchors: Sequence[x509.Certificate] = ()
    #: HPKI anchors and intermediates: the signer's chain when extending a signature that
    #: carries only the signer's certificate.
    certs: Sequence[x509.Certificate] = ()
    #: Asks the AIA responder of a certificate that names one (None: CRLs only).
    ocsp: OcspClient | None = None
    #: ``auto``: OCSP where the certificate names a responder, else (and when it fails) CRLs;
    #: ``ocsp``: OCSP where named, no CRL fallback; ``crl``: CRLs only
    #: (``[signing] long_term_revocation``).
    revocation: str = "auto"
    _ocsp_cache: dict[tuple[int, bytes], OcspResult] = field(
        default_factory=dict, repr=False, init=False
    )

    async def ocsp_answer(
        self, cert: x509.Certificate, issuer: x509.Certificate, now: dt.datetime
    ) -> OcspResult | None:
        """The responder's usable answer for ``cert`` (cached until its nextUpdate), or None
        when OCSP is not to be asked for it; "unavailable"/"unknown" results are not cached."""
        if self.ocsp is None or self.revocation == "crl" or not ocsp_urls(cert):
            return None
        key = (cert.serial_number, issuer.fingerprint(hashes.SHA256()))
        cached = self._ocsp_cache.get(key)
        if cached is not None and cached.next_update is not None and cached.next_update > now:
            return cached
        answer = await self.ocsp.status(cert, issuer, now)
        if answer.status in ("good", "revoked") and answer.der is not None:
            if len(self._ocsp_cache) > 4096:
                self._ocsp_cache.clear()
            self._ocsp_cache[key] = answer
        return answer


@dataclass
class ValidationData:
    certs: list[x509.Certificate] = field(default_factory=list)
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)
    #: DER OCSP responses (RFC 6960) for certificates whose responder answered.
    ocsps: list[bytes] = field(default_factory=list)


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


async def _revocation_for(
    path: Sequence[x509.Certificate], source: LongTermSource, now: dt.datetime, *, required: bool
) -> tuple[list[x509.CertificateRevocationList], list[bytes]]:
    """Revocation evidence over ``path``: an OCSP response where the certificate names a
    responder (see ``LongTermSource.revocation``), else a current CRL of the issuer.

    ``required``: a certificate without either stops the request (503), and one the responder
    says is revoked is refused (403): nothing is signed with a revoked certificate.
    """
    crls: list[x509.CertificateRevocationList] = []
    ocsps: list[bytes] = []
    for child, issuer in itertools.pairwise(path):
        answer = await source.ocsp_answer(child, issuer, now)
        if answer is not None and answer.status == "revoked" and required:
            raise AccessDenied(
                f"the certificate {child.subject.rfc4514_string()} is revoked: {answer.reason}; "
                "nothing was signed"
            )
        if answer is not None and answer.status == "good" and answer.der is not None:
            if answer.der not in ocsps:
                ocsps.append(answer.der)
            continue
        if answer is not None and source.revocation == "ocsp":
            if required:
                raise RevocationUnavailable(
                    f"no OCSP answer for {child.subject.rfc4514_string()} for the long-term "
                    f"signature: {answer.reason}; nothing was signed"
                )
            continue
        crl, why = await source.crls.current_crl(child, issuer, now)
        if crl is None:
            if required:
                ocsp_why = f" (OCSP: {answer.reason})" if answer is not None else ""
                raise RevocationUnavailable(
                    f"no current CRL of {issuer.subject.rfc4514_string()} for the long-term "
                    f"signature: {why}{ocsp_why}; nothing was signed"
                )
            continue
        if crl not in crls:
            crls.append(crl)
    return crls, ocsps


async def _crls_for(
    path: Sequence[x509.Certificate], source: LongTermSource, now: dt.datetime, *, required: bool
) -> list[x509.CertificateRevocationList]:
    """CRLs only (callers that carry no OCSP responses)."""
    crls, _ = await _revocation_for(
        path, dataclasses.replace(source, ocsp=None), now, required=required
    )
    return crls


async def path_validation_data(
    leaf: x509.Certificate,
    pool: Sequence[x509.Certificate],
    source: LongTermSource,
    now: dt.datetime,
) -> ValidationData:
    """The issuers of ``leaf`` (from ``pool``) and the revocation evidence over its path."""
    path = _path(leaf, pool)
    crls, ocsps = await _revocation_for(path, source, now, required=True)
    return ValidationData(certs=list(path[1:]), crls=crls, ocsps=ocsps)


async def signer_validation_data(
    chain: Sequence[x509.Certificate], source: LongTermSource, now: dt.datetime
) -> ValidationData:
    """The signer's issuers and the CRLs over its path (fetched before the key is used)."""
    return await path_validation_data(chain[0], chain[1:], source, now)


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
    ocsps: list[bytes] = []
    for child, issuer in itertools.pairwise(path):
        answer = await source.ocsp_answer(child, issuer, now)
        if answer is not None and answer.status in ("good", "revoked") and answer.der:
            # A revoked TSA is embedded as such: the verifier refuses its timestamp.
            ocsps.append(answer.der)
            continue
        crl, why = await source.crls.current_crl(child, issuer, now)
        if crl is not None:
            crls.append(crl)
        elif "did not answer" in why:
            raise RevocationUnavailable(
                f"no current CRL of {issuer.subject.rfc4514_string()} for the TSA: {why}; "
                "nothing was returned"
            )
    return ValidationData(certs=path, crls=crls, ocsps=ocsps)


def _new_id(sample: bool, kind: str, uid: str) -> str:
    return f"id{ids.token_hex(4)}" if sample else f"{kind}-{uid}"


def _values(parent: etree._Element, data: ValidationData, *, sample: bool, uid: str) -> None:
    cv = etree.SubElement(parent, _XA + "CertificateValues")
    cv.set("Id", _new_id(sample, "certificate-values", uid))
    for c in data.certs:
        etree.SubElement(cv, _XA + "EncapsulatedX509Certificate").text = _der(c)
    if data.crls or data.ocsps:
        rv = etree.SubElement(parent, _XA + "RevocationValues")
        rv.set("Id", _new_id(sample, "revocation-values", uid))
        if data.crls:
            crl_values = etree.SubElement(rv, _XA + "CRLValues")
            for crl in data.crls:
                etree.SubElement(crl_values, _XA + "EncapsulatedCRLValue").text = _der(crl)
        if data.ocsps:  # after CRLValues: the XAdES schema's order
            ocsp_values = etree.SubElement(rv, _XA + "OCSPValues")
            for der in data.ocsps:
                etree.SubElement(
                    ocsp_values, _XA + "EncapsulatedOCSPValue"
                ).text = base64.b64encode(der).decode("ascii")


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
    ats.set("Id", _new_id(sample, "archive-ts", uid + ids.token_hex(2)))
    etree.SubElement(ats, _DS + "CanonicalizationMethod").set("Algorithm", C14N10)
    etree.SubElement(ats, _XA + "EncapsulatedTimeStamp").text = base64.b64encode(token).decode()
    _timestamp_validation_data(usp, ats, tsa_data, sample=sample, uid=uid + ids.token_hex(2))


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
