"""CMS signatures: CAdES, and the CMS inside PAdES (integrity, then the common checks)."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from asn1crypto import cms, core, ocsp, pem
from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.errors import InvalidRequest
from gateway.sign import cades_lta
from gateway.sign import timestamp as ts
from gateway.verify.report import INDETERMINATE, TOTAL_FAILED, SignatureReport
from gateway.verify.trust import Evidence, TimestampEvidence, TrustConfig, check_common, signer_info

__all__ = ["load_cms", "verify_cms_signed_data"]

#: Digests accepted for CMS content, signatures and signing-certificate bindings.
_STRONG_DIGESTS = ("sha256", "sha384", "sha512")


def load_cert(der: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _cms_certs(sd: Any) -> list[x509.Certificate]:
    out = []
    for c in sd["certificates"] or []:
        if c.name == "certificate":
            cert = load_cert(c.chosen.dump())
            if cert is not None:
                out.append(cert)
    return out


def _cms_crls(sd: Any) -> list[x509.CertificateRevocationList]:
    out = []
    for c in sd["crls"] or []:
        if c.name == "crl":
            try:
                out.append(x509.load_der_x509_crl(c.chosen.dump()))
            except ValueError:
                continue
    return out


def _cms_ocsps(sd: Any) -> list[bytes]:
    """OCSP responses in SignedData's crls (RFC 5940 other revocation info, id-ri-ocsp-response)."""
    out = []
    for c in sd["crls"] or []:
        if c.name == "other" and c.chosen["other_rev_info_format"].native == "ocsp_response":
            out.append(c.chosen["other_rev_info"].dump())
    return out


#: CAdES-X-L's unsigned attributes (ETSI TS 101 733 §6.3.3-6.3.4; EN 319 122-1 keeps them for
#: B-LT): the path and its revocation data beside the signature instead of in SignedData.
OID_CERTIFICATE_VALUES = "1.2.840.113549.1.9.16.2.23"
OID_REVOCATION_VALUES = "1.2.840.113549.1.9.16.2.24"


# Written here because asn1crypto has no spec for these two attributes (pyHanko neither); the
# ASN.1 module of TS 101 733 is EXPLICIT TAGS.
class _CertificateValues(core.SequenceOf):  # type: ignore[misc]
    _child_spec = asn1_x509.Certificate


class _CrlValues(core.SequenceOf):  # type: ignore[misc]
    _child_spec = asn1_crl.CertificateList


class _OcspValues(core.SequenceOf):  # type: ignore[misc]
    _child_spec = ocsp.BasicOCSPResponse


class _RevocationValues(core.Sequence):  # type: ignore[misc]
    _fields = [  # noqa: RUF012 - asn1crypto's declaration style
        ("crl_vals", _CrlValues, {"explicit": 0, "optional": True}),
        ("ocsp_vals", _OcspValues, {"explicit": 1, "optional": True}),
        ("other_rev_vals", core.Any, {"explicit": 2, "optional": True}),
    ]


def _values_attributes(
    si: Any,
) -> tuple[list[x509.Certificate], list[x509.CertificateRevocationList], list[bytes]]:
    """The certificates, CRLs and OCSP responses of a SignerInfo's certificate-values and
    revocation-values attributes (a CAdES-X-L from another signer); unreadable ones are left
    out, as unreadable entries of SignedData are."""
    certs: list[x509.Certificate] = []
    crls: list[x509.CertificateRevocationList] = []
    ocsps: list[bytes] = []
    attrs = si["unsigned_attrs"]
    if isinstance(attrs, core.Void):
        return certs, crls, ocsps
    for a in attrs:
        oid = a["type"].dotted
        if oid not in (OID_CERTIFICATE_VALUES, OID_REVOCATION_VALUES):
            continue
        for value in a["values"]:
            try:
                raw = value.dump()
                if oid == OID_CERTIFICATE_VALUES:
                    for c in _CertificateValues.load(raw):
                        cert = load_cert(c.dump())
                        if cert is not None:
                            certs.append(cert)
                    continue
                values = _RevocationValues.load(raw)
                for c in values["crl_vals"] or []:
                    crls.append(x509.load_der_x509_crl(c.dump()))
                for basic in values["ocsp_vals"] or []:
                    # The verifier reads whole OCSPResponses (as RFC 5940 carries them).
                    response = ocsp.OCSPResponse(
                        {
                            "response_status": "successful",
                            "response_bytes": {
                                "response_type": "basic_ocsp_response",
                                "response": basic,
                            },
                        }
                    )
                    ocsps.append(response.dump())
            except (ValueError, TypeError, KeyError):
                continue
    return certs, crls, ocsps


def _attr(attrs: Any, name: str) -> Any:
    if isinstance(attrs, core.Void):
        return None
    for a in attrs:
        if a["type"].native == name:
            return a["values"][0]
    return None


def _cms_binding(si: Any, cert: x509.Certificate) -> str | None:
    """None when signingCertificateV2 names ``cert`` with SHA-256/384/512; else why not.

    The ESS signingCertificate (v1) binds with SHA-1 only and is not accepted; neither is a
    signingCertificateV2 whose hash is SHA-1 or MD5.
    """
    der = cert.public_bytes(serialization.Encoding.DER)
    v2 = _attr(si["signed_attrs"], "signing_certificate_v2")
    if v2 is not None:
        first = v2["certs"][0]
        alg = first["hash_algorithm"]["algorithm"].native
        if alg not in _STRONG_DIGESTS:
            return f"signingCertificateV2 uses {alg}; only SHA-256/384/512 are accepted"
        if hashlib.new(alg, der).digest() != first["cert_hash"].native:
            return "signingCertificateV2 names another certificate than the one that signed"
        return None
    if _attr(si["signed_attrs"], "signing_certificate") is not None:
        return (
            "the signer certificate is bound only by signingCertificate (SHA-1), which is not "
            "accepted: signingCertificateV2 with SHA-256/384/512 is required"
        )
    return "no signingCertificateV2 attribute binds the signer certificate"


def _embedded_content(sd: Any) -> bytes | None:
    """The content the SignedData carries (None: detached)."""
    embedded_content = sd["encap_content_info"]["content"]
    if isinstance(embedded_content, core.Void) or embedded_content is None:
        return None
    attached = embedded_content.native
    return attached if isinstance(attached, bytes) else bytes(embedded_content.contents)


def _content_type_problem(si: Any, econtent_type: str) -> str | None:
    """RFC 5652 §11.1: with signed attributes, exactly one content-type attribute of one value,
    equal to the encapsulated content's type; else why not."""
    attrs = si["signed_attrs"]
    found = [] if isinstance(attrs, core.Void) else [
        a for a in attrs if a["type"].native == "content_type"
    ]  # fmt: skip
    if not found:
        return "no content-type signed attribute"
    if len(found) > 1 or len(found[0]["values"]) != 1:
        return "more than one content-type signed attribute value"
    if found[0]["values"][0].native != econtent_type:
        return (
            f"the content-type signed attribute ({found[0]['values'][0].native}) is not the "
            f"encapsulated content's type ({econtent_type})"
        )
    return None


def _integrity(
    rep: SignatureReport,
    si: Any,
    cert: x509.Certificate,
    content: bytes | None,
    digest: bytes | None,
) -> bool:
    """messageDigest, the signature value and the certificate binding; False: failed."""
    digest_alg = si["digest_algorithm"]["algorithm"].native
    md = _attr(si["signed_attrs"], "message_digest")
    if md is None:
        rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", "no messageDigest signed attribute")
        return False
    if digest_alg not in _STRONG_DIGESTS:
        rep.fail(
            TOTAL_FAILED,
            "FORMAT_FAILURE",
            f"unsupported digest {digest_alg} (only SHA-256/384/512 are accepted)",
        )
        return False
    if digest is None:
        if content is None:
            rep.fail(
                INDETERMINATE,
                "SIGNED_DATA_NOT_FOUND",
                "detached signature: give the signed content (--content / content)",
            )
            return False
        digest = hashlib.new(digest_alg, content).digest()
    if md.native != digest:
        rep.fail(
            TOTAL_FAILED,
            "HASH_FAILURE",
            "the signed content does not match the signature's messageDigest",
        )
        return False
    problem = ts.verify_signer_info(si, cert, content_digest=digest)
    if problem is not None:
        rep.fail(TOTAL_FAILED, "SIG_CRYPTO_FAILURE", problem)
        return False
    binding = _cms_binding(si, cert)
    if binding is not None:
        rep.fail(INDETERMINATE, "NO_SIGNING_CERTIFICATE_FOUND", binding)
        return False
    return True


def _timestamps(
    si: Any,
    sd: Any,
    content: bytes | None,
    digest: bytes | None,
    certs: list[x509.Certificate],
    crls: list[x509.CertificateRevocationList],
    ocsps: list[bytes],
) -> list[TimestampEvidence]:
    """The signature timestamp and the archive-time-stamp-v3s (B-LTA), each with the
    certificates and CRLs of SignedData as its TSA's validation data."""
    out = []
    token = _attr(si["unsigned_attrs"], "signature_time_stamp_token")
    if token is not None:
        out.append(
            TimestampEvidence(
                "signature",
                token.dump(),
                si["signature"].native,
                certs=certs,
                crls=crls,
                ocsps=ocsps,
            )
        )
    for a in cades_lta.archive_tokens(sd, si, content, digest):
        out.append(
            TimestampEvidence(
                "archive",
                a.token_der,
                a.imprint_data or b"",
                error=None if a.changed or a.problem is None else a.problem,
                hash_problem=a.problem if a.changed else None,
                certs=certs,
                crls=crls,
                ocsps=ocsps,
            )
        )
    return out


async def verify_cms_signed_data(
    sd: Any,
    *,
    fmt: str,
    content: bytes | None,
    content_digest: bytes | None,
    trust: TrustConfig,
    now: dt.datetime,
    extra_crls: list[x509.CertificateRevocationList] | None = None,
    extra_certs: list[x509.Certificate] | None = None,
    archive: list[TimestampEvidence] | None = None,
    extra_ocsps: list[bytes] | None = None,
) -> list[SignatureReport]:
    """Every SignerInfo of ``sd``; ``extra_*``: validation data found outside the CMS (the
    PDF's DSS) and archive timestamps over it (PDF document timestamps)."""
    attached = _embedded_content(sd)
    # A content given beside a signature that carries its own must be that content: the
    # caller would otherwise read "valid" for bytes that were never signed.
    given_differs = content is not None and attached is not None and content != attached
    content = attached if attached is not None else content
    econtent_type = sd["encap_content_info"]["content_type"].native
    if len(sd["signer_infos"]) > trust.max_signatures:
        raise InvalidRequest(
            f"the signature has {len(sd['signer_infos'])} SignerInfos; at most "
            f"{trust.max_signatures} are verified (signing.verify_max_signatures)"
        )
    certs = _cms_certs(sd)
    crls = _cms_crls(sd) + list(extra_crls or [])
    ocsps = _cms_ocsps(sd) + list(extra_ocsps or [])
    reports = []
    for si in sd["signer_infos"]:
        rep = SignatureReport(format=fmt)
        reports.append(rep)
        cert = ts._find_signer_cert(si, certs)
        if cert is None:
            rep.fail(
                INDETERMINATE,
                "NO_SIGNING_CERTIFICATE_FOUND",
                "the signer certificate is not in the signature",
            )
            continue
        rep.signer = signer_info(cert)
        if given_differs:
            rep.fail(
                TOTAL_FAILED,
                "HASH_FAILURE",
                "the content given differs from the content the signature carries",
            )
            continue
        problem = _content_type_problem(si, econtent_type)
        if problem is not None:
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", problem)
            continue
        if not _integrity(rep, si, cert, content, content_digest):
            continue
        st = _attr(si["signed_attrs"], "signing_time")
        x_certs, x_crls, x_ocsps = _values_attributes(si)
        si_certs, si_crls, si_ocsps = certs + x_certs, crls + x_crls, ocsps + x_ocsps
        stamps = _timestamps(si, sd, content, content_digest, si_certs, si_crls, si_ocsps)
        stamps += list(archive or [])
        found = Evidence(
            cert=cert,
            embedded=si_certs + list(extra_certs or []),
            signing_time=st.native if st is not None else None,
            timestamps=stamps,
            crls=si_crls,
            ocsps=si_ocsps,
            has_validation_data=bool(si_crls or si_ocsps),
        )
        await check_common(rep, found, trust, now)
    return reports


def load_cms(data: bytes) -> Any:
    if pem.detect(data):
        _, _, data = pem.unarmor(data)
    ci = cms.ContentInfo.load(data, strict=True)
    if ci["content_type"].native != "signed_data":
        raise ValueError("CMS content is not SignedData")
    sd = ci["content"]
    # Parse the parts we read now, so malformed input fails here. Not ``sd.native``: that
    # would decode the certificates with asn1crypto, which misreads the hcRole extension
    # (certificates are read with cryptography instead).
    for si in sd["signer_infos"]:
        si["signed_attrs"].native  # noqa: B018
        si["unsigned_attrs"].contents  # noqa: B018
    sd["encap_content_info"].native  # noqa: B018
    return sd
