"""Extend CMS (CAdES) and PDF (PAdES) signatures without touching them.

CAdES: to B-T, a signature-time-stamp unsigned attribute over the signature value; to B-LT,
the signer's issuers, the TSA's chain and their CRLs in SignedData's certificates and crls
(EN 319 122-1 §5.5.1). The SignerInfo's signed attributes and signature value stay as they are
(asn1crypto re-encodes only what changes). CAdES B-LTA (archive-time-stamp-v3) is not built.

PAdES: to B-LT, a document timestamp first when the signature has no timestamp (PAdES B-T by
document timestamp), then a DSS with the signer's chain and CRLs (and the TSA's) as an
incremental update; to B-LTA, then a document timestamp over all that (pyHanko). A PDF is not
extended to B-T alone: ask for B-LT.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

from asn1crypto import cms, pem
from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.errors import InvalidRequest
from gateway.hsm.api import DigestAlgorithm
from gateway.sign import timestamp as ts
from gateway.sign.xades_ltv import (
    LongTermSource,
    ValidationData,
    _crls_for,
    _path,
    tsa_validation_data,
)

__all__ = ["extend_cms", "extend_pdf"]

_DER = serialization.Encoding.DER


async def _signer_data(
    signer: x509.Certificate, pool: list[x509.Certificate], source: LongTermSource, now: Any
) -> ValidationData:
    path = _path(signer, [*pool, *source.certs])
    if len(path) < 2:
        raise InvalidRequest(
            f"the issuer of {signer.subject.rfc4514_string()} is not among the configured "
            "HPKI anchors and intermediates: its chain cannot be added"
        )
    return ValidationData(certs=path[1:], crls=await _crls_for(path, source, now, required=True))


def _attr(attrs: Any, name: str) -> Any:
    if attrs is None or not attrs.native:
        return None
    for a in attrs:
        if a["type"].native == name:
            return a["values"][0]
    return None


async def extend_cms(
    data: bytes, form: str, *, tsa: ts.TimestampClient, source: LongTermSource, now: Any
) -> tuple[bytes, list[tuple[str, str, str]]]:
    if form == "ES-A":
        raise InvalidRequest("CAdES B-LTA (archive-time-stamp-v3) is not built; extend to B-LT")
    if pem.detect(data):
        _, _, data = pem.unarmor(data)
    ci = cms.ContentInfo.load(data)
    sd = ci["content"]
    certs = [
        x509.load_der_x509_certificate(c.chosen.dump())
        for c in sd["certificates"] or []
        if c.name == "certificate"
    ]
    changes: list[tuple[str, str, str]] = []
    extra_certs: list[x509.Certificate] = []
    extra_crls: list[x509.CertificateRevocationList] = []
    for i, si in enumerate(sd["signer_infos"]):
        has_ts = _attr(si["unsigned_attrs"], "signature_time_stamp_token") is not None
        before = "B-LT" if has_ts and len(sd["crls"] or []) else "B-T" if has_ts else "B-B"
        token = None
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
        after = "B-T"
        if form == "ES-XL":
            signer = ts._find_signer_cert(si, certs)
            if signer is None:
                raise InvalidRequest("the signer certificate is not in the CMS signature")
            data_s = await _signer_data(signer, certs, source, now)
            data_t = await tsa_validation_data(token, source, now)
            extra_certs += [*data_s.certs, *data_t.certs]
            extra_crls += [*data_s.crls, *data_t.crls]
            after = "B-LT"
        changes.append((f"SignerInfo {i + 1}", before, after if before != "B-LT" else before))
    if extra_certs or extra_crls:
        have = {c.dump() for c in sd["certificates"] or []}
        new_certs = [
            cms.CertificateChoices(name="certificate", value=asn1_x509.Certificate.load(d))
            for d in dict.fromkeys(c.public_bytes(_DER) for c in extra_certs)
            if cms.CertificateChoices(
                name="certificate", value=asn1_x509.Certificate.load(d)
            ).dump()
            not in have
        ]
        sd["certificates"] = cms.CertificateSet([*(sd["certificates"] or []), *new_certs])
        crl_ders = dict.fromkeys(c.public_bytes(_DER) for c in extra_crls)
        sd["crls"] = cms.RevocationInfoChoices(
            [cms.RevocationInfoChoice(name="crl", value=asn1_crl.CertificateList.load(d))
             for d in crl_ders]
        )  # fmt: skip
    out: bytes = ci.dump()
    return out, changes


async def extend_pdf(
    data: bytes, form: str, *, tsa: ts.TimestampClient, source: LongTermSource, now: Any
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
    changes = []
    for emb in sigs:
        signer = x509.load_der_x509_certificate(emb.signer_cert.dump())
        pool = [x509.load_der_x509_certificate(c.dump()) for c in emb.other_embedded_certs]
        got = await _signer_data(signer, pool, source, now)
        certs += got.certs
        crls += got.crls
        token = _attr(emb.signer_info["unsigned_attrs"], "signature_time_stamp_token")
        if token is not None:
            tsa_data = await tsa_validation_data(token.dump(), source, now)
            certs += tsa_data.certs
            crls += tsa_data.crls
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
        force_write=True,
    )
    if form == "ES-A":
        changes = [(name, before, "B-LTA") for name, before, _ in changes]
        return await document_timestamp(stream.getvalue()), changes
    return stream.getvalue(), changes
