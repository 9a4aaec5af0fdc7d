"""Extend CMS (CAdES) and PDF (PAdES) signatures without touching them.

CAdES: to B-T, a signature-time-stamp unsigned attribute over the signature value; to B-LT,
the signer's issuers, the TSA's chain and their CRLs in SignedData's certificates and crls
(EN 319 122-1 §5.5.1); to B-LTA, then an archive-time-stamp-v3 (``cades_lta.py``), and with
``renew`` another one over it all. The SignerInfo's signed attributes and signature value stay
as they are (asn1crypto re-encodes only what changes).

PAdES: to B-LT, a document timestamp first when the signature has no timestamp (PAdES B-T by
document timestamp), then a DSS with the signer's chain and CRLs (and the TSA's) as an
incremental update; to B-LTA, then a document timestamp over all that (pyHanko). A PDF is not
extended to B-T alone: ask for B-LT.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

from asn1crypto import cms, core, pem
from asn1crypto import crl as asn1_crl
from asn1crypto import ocsp as asn1_ocsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.errors import InvalidRequest
from gateway.hsm.api import DigestAlgorithm
from gateway.sign import timestamp as ts
from gateway.sign.xades_ltv import (
    LongTermSource,
    ValidationData,
    _path,
    path_validation_data,
    tsa_validation_data,
)

__all__ = ["extend_cms", "extend_pdf"]

_DER = serialization.Encoding.DER


async def _signer_data(
    signer: x509.Certificate, pool: list[x509.Certificate], source: LongTermSource, now: Any
) -> ValidationData:
    if len(_path(signer, [*pool, *source.certs])) < 2:
        raise InvalidRequest(
            f"the issuer of {signer.subject.rfc4514_string()} is not among the configured "
            "HPKI anchors and intermediates: its chain cannot be added"
        )
    return await path_validation_data(signer, [*pool, *source.certs], source, now)


def _attr(attrs: Any, name: str) -> Any:
    if attrs is None or not attrs.native:
        return None
    for a in attrs:
        if a["type"].native == name:
            return a["values"][0]
    return None


_CMS_ORDER = ["B-B", "B-T", "B-LT", "B-LTA"]
_CMS_TARGET = {"ES-T": "B-T", "ES-XL": "B-LT", "ES-A": "B-LTA"}


def _cms_level(si: Any, sd: Any) -> str:
    """Where a SignerInfo stands: B-B, B-T (a signature timestamp), B-LT (and validation data
    in the SignedData), B-LTA (and an archive-time-stamp-v3)."""
    has_ts = _attr(si["unsigned_attrs"], "signature_time_stamp_token") is not None
    has_ats = _attr(si["unsigned_attrs"], "archive_time_stamp_v3") is not None
    has_lt = has_ts and bool(len(sd["crls"] or []))
    return "B-LTA" if has_ats and has_lt else "B-LT" if has_lt else "B-T" if has_ts else "B-B"


def _encapsulated(sd: Any) -> bytes | None:
    """The signed content when the SignedData carries it; None when detached."""
    content = sd["encap_content_info"]["content"]
    if isinstance(content, core.Void) or content is None:
        return None
    native = content.native
    return native if isinstance(native, bytes) else bytes(content.contents)


def _extendable(
    si: Any, certs: list[x509.Certificate], content: bytes | None, *, name: str
) -> x509.Certificate:
    """Only a real signature is extended: its signer's certificate is in the SignedData and
    verifies its signature over the signed attributes (and, when the content is carried, the
    messageDigest matches it). Anything else would get the TSA's timestamp over junk. No trust
    is decided (that is /verify's job); the signer, or 400 before any timestamp is asked for."""
    signer = ts._find_signer_cert(si, certs)
    if signer is None:
        raise InvalidRequest("the signer certificate is not in the CMS signature")
    problem = ts.verify_signer_info(si, signer, content_digest_of=content)
    if problem is not None:
        raise InvalidRequest(f"the {name} cannot be extended: {problem}")
    return signer


async def extend_cms(
    data: bytes,
    form: str,
    *,
    tsa: ts.TimestampClient,
    source: LongTermSource,
    now: Any,
    renew: bool = False,
) -> tuple[bytes, list[tuple[str, str, str]]]:
    from gateway.sign.cades_lta import archive_signed_data

    if pem.detect(data):
        _, _, data = pem.unarmor(data)
    ci = cms.ContentInfo.load(data)
    sd = ci["content"]
    certs = [
        x509.load_der_x509_certificate(c.chosen.dump())
        for c in sd["certificates"] or []
        if c.name == "certificate"
    ]
    target = _CMS_TARGET[form]
    # (SignerInfo, its level, its signer when it is to be extended)
    plan: list[tuple[Any, str, x509.Certificate | None]] = []
    for i, si in enumerate(sd["signer_infos"]):
        before = _cms_level(si, sd)
        renewing = renew and target == "B-LTA" and before == "B-LTA"
        signer = None
        if _CMS_ORDER.index(before) < _CMS_ORDER.index(target) or renewing:
            # every one checked before the first timestamp is asked for
            signer = _extendable(si, certs, _encapsulated(sd), name=f"SignerInfo {i + 1}")
        plan.append((si, before, signer))
    changes: list[tuple[str, str, str]] = []
    extra_certs: list[x509.Certificate] = []
    extra_crls: list[x509.CertificateRevocationList] = []
    extra_ocsps: list[bytes] = []
    to_archive: list[Any] = []
    for i, (si, before, signer) in enumerate(plan):
        name = f"SignerInfo {i + 1}"
        if signer is None:
            changes.append((name, before, before))
            continue
        has_ts = before != "B-B"
        has_lt = before in ("B-LT", "B-LTA")
        if not has_ts:
            token = await tsa.timestamp(
                hashlib.sha256(si["signature"].native).digest(), DigestAlgorithm.SHA256
            )
            attr = cms.CMSAttribute(
                {"type": "signature_time_stamp_token", "values": [cms.ContentInfo.load(token)]}
            )
            existing = list(si["unsigned_attrs"]) if si["unsigned_attrs"].native else []
            si["unsigned_attrs"] = cms.CMSAttributes([*existing, attr])
        else:
            token = _attr(si["unsigned_attrs"], "signature_time_stamp_token").dump()
        if target != "B-T" and not has_lt:
            data_s = await _signer_data(signer, certs, source, now)
            data_t = await tsa_validation_data(token, source, now)
            extra_certs += [*data_s.certs, *data_t.certs]
            extra_crls += [*data_s.crls, *data_t.crls]
            extra_ocsps += [*data_s.ocsps, *data_t.ocsps]
        if target == "B-LTA":
            to_archive.append(si)
        changes.append((name, before, target))
    if extra_certs or extra_crls or extra_ocsps:
        from gateway.sign.cades_lta import _add_validation_data

        _add_validation_data(
            sd,
            [c.public_bytes(_DER) for c in extra_certs],
            [c.public_bytes(_DER) for c in extra_crls],
            extra_ocsps,
        )
    if to_archive:
        content = sd["encap_content_info"]["content"]
        if isinstance(content, core.Void) or content is None:
            raise InvalidRequest(
                "a detached CAdES signature needs its content for B-LTA: the archive timestamp "
                "covers it"
            )
        await archive_signed_data(
            sd,
            tsa=tsa,
            content_digest=hashlib.sha256(content.contents).digest(),
            source=source,
            now=now,
            signer_infos=to_archive,
        )
    out: bytes = ci.dump()
    return out, changes


async def extend_pdf(
    data: bytes,
    form: str,
    *,
    tsa: ts.TimestampClient,
    source: LongTermSource,
    now: Any,
    renew: bool = False,
) -> tuple[bytes, list[tuple[str, str, str]]]:
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.signers.pdf_signer import PdfTimeStamper
    from pyhanko.sign.validation.dss import DocumentSecurityStore

    from gateway.sign.pades import GatewayTimeStamper

    if form == "ES-T":
        raise InvalidRequest(
            "a PDF signature timestamp is made when signing: extend a PDF to B-LT or B-LTA"
        )
    if not isinstance(tsa, ts.Rfc3161Client):
        raise InvalidRequest("PAdES timestamps need the RFC 3161 HTTP timestamp authority")
    reader = PdfFileReader(io.BytesIO(data), strict=False)
    sigs = reader.embedded_regular_signatures
    if not sigs:
        raise InvalidRequest("the PDF has no signature to extend")
    certs: list[x509.Certificate] = []
    crls: list[x509.CertificateRevocationList] = []
    ocsps: list[bytes] = []
    changes = []
    for emb in sigs:
        signer = x509.load_der_x509_certificate(emb.signer_cert.dump())
        pool = [x509.load_der_x509_certificate(c.dump()) for c in emb.other_embedded_certs]
        got = await _signer_data(signer, pool, source, now)
        certs += got.certs
        crls += got.crls
        ocsps += got.ocsps
        token = _attr(emb.signer_info["unsigned_attrs"], "signature_time_stamp_token")
        if token is not None:
            tsa_data = await tsa_validation_data(token.dump(), source, now)
            certs += tsa_data.certs
            crls += tsa_data.crls
            ocsps += tsa_data.ocsps
        changes.append((emb.field_name, "B-T" if token is not None else "B-B", "B-LT"))
    stamper = PdfTimeStamper(GatewayTimeStamper(tsa))

    async def document_timestamp(pdf: bytes) -> bytes:
        out = io.BytesIO()
        writer = IncrementalPdfFileWriter(io.BytesIO(pdf), strict=False)
        await stamper.async_timestamp_pdf(writer, "sha256", output=out)
        return out.getvalue()

    pdf = data
    if any(before == "B-B" for _, before, _ in changes):
        # PAdES B-T by a document timestamp (EN 319 142-1 §5.3): the proof of existence that
        # the validation data added next needs.
        pdf = await document_timestamp(pdf)
    stream = io.BytesIO(pdf)
    DocumentSecurityStore.add_dss(
        stream,
        None,
        certs=[asn1_x509.Certificate.load(c.public_bytes(_DER)) for c in certs],
        crls=[asn1_crl.CertificateList.load(c.public_bytes(_DER)) for c in crls],
        ocsps=[asn1_ocsp.OCSPResponse.load(d) for d in dict.fromkeys(ocsps)],
        force_write=True,
    )
    if form == "ES-A":
        changes = [(name, before, "B-LTA") for name, before, _ in changes]
        return await document_timestamp(stream.getvalue()), changes
    return stream.getvalue(), changes
