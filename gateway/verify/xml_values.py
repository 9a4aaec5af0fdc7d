"""The unsigned XAdES properties: timestamps, validation data (ES-T, ES-XL, ES-A), and the
elements each level requires."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from lxml import etree

from gateway.sign.xades import C14N10, DS, EXC_C14N, SIGNED_PROPERTIES_TYPE, XADES, c14n
from gateway.verify.trust import TimestampEvidence
from gateway.verify.xml_refs import XADES141, ArchiveInputs, b64_text

__all__ = ["ES_LEVELS", "UnsignedValues", "read_unsigned", "structure_problem"]

_DS = "{%s}" % DS  # noqa: UP031
_XA = "{%s}" % XADES  # noqa: UP031
_XA141 = "{%s}" % XADES141  # noqa: UP031
#: Baseline level -> the XAdES (TS 101 903) form, as HPKI documents name them.
ES_LEVELS = {"B-B": "ES-BES", "B-T": "ES-T", "B-LT": "ES-XL", "B-LTA": "ES-A"}


@dataclass
class UnsignedValues:
    timestamps: list[TimestampEvidence] = field(default_factory=list)
    certs: list[x509.Certificate] = field(default_factory=list)
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)
    ocsps: list[bytes] = field(default_factory=list)
    has_values: bool = False


def _usp(sig: etree._Element) -> etree._Element | None:
    return sig.find(
        f"{_DS}Object/{_XA}QualifyingProperties/{_XA}UnsignedProperties/"
        f"{_XA}UnsignedSignatureProperties"
    )


def structure_problem(sig: etree._Element) -> str | None:
    """The first required element missing for the form the signature claims (TS 101 903 §4.4:
    ES-BES, then ES-T, ES-XL, ES-A add to it), or a reference without its Type."""
    if not sig.get("Id"):
        return "the ds:Signature has no Id attribute"
    required = [
        f"{_DS}SignedInfo",
        f"{_DS}SignedInfo/{_DS}CanonicalizationMethod",
        f"{_DS}SignedInfo/{_DS}SignatureMethod",
        f"{_DS}SignedInfo/{_DS}Reference",
        f"{_DS}SignatureValue",
        f"{_DS}Object/{_XA}QualifyingProperties",
        f"{_DS}Object/{_XA}QualifyingProperties/{_XA}SignedProperties",
        f"{_DS}Object/{_XA}QualifyingProperties/{_XA}SignedProperties/"
        f"{_XA}SignedSignatureProperties",
    ]
    for path in required:
        if sig.find(path) is None:
            shown = path.replace(_DS, "ds:").replace(_XA, "xades:")
            return f"required element missing (ES-BES): {shown}"
    sp = sig.find(f"{_DS}Object/{_XA}QualifyingProperties/{_XA}SignedProperties")
    assert sp is not None
    sp_id = sp.get("Id")
    for ref in sig.iterfind(f"{_DS}SignedInfo/{_DS}Reference"):
        if sp_id and ref.get("URI") == f"#{sp_id}" and ref.get("Type") != SIGNED_PROPERTIES_TYPE:
            return (
                f"the reference to SignedProperties has Type {ref.get('Type')!r}, "
                f"not {SIGNED_PROPERTIES_TYPE}"
            )
    usp = _usp(sig)
    if usp is None:
        return None
    has = {etree.QName(p).localname for p in usp if isinstance(p.tag, str)}
    if ({"CertificateValues", "RevocationValues"} & has or "ArchiveTimeStamp" in has) and (
        "SignatureTimeStamp" not in has
    ):
        return "required element missing (ES-T): xades:SignatureTimeStamp"
    if "ArchiveTimeStamp" in has:
        for name in ("CertificateValues", "RevocationValues"):
            if name not in has:
                return f"required element missing (ES-XL, before ES-A): xades:{name}"
    return None


def _certs(parent: etree._Element | None, what: str) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    if parent is None:
        return out
    for el in parent.iter(_XA + "EncapsulatedX509Certificate"):
        out.append(x509.load_der_x509_certificate(b64_text(el, what)))
    return out


def _crls(parent: etree._Element | None, what: str) -> list[x509.CertificateRevocationList]:
    out: list[x509.CertificateRevocationList] = []
    if parent is None:
        return out
    for el in parent.iter(_XA + "EncapsulatedCRLValue"):
        out.append(x509.load_der_x509_crl(b64_text(el, what)))
    return out


def _ocsps(parent: etree._Element | None, what: str) -> list[bytes]:
    """OCSPValues/EncapsulatedOCSPValue: DER OCSPResponses (checked where they are used)."""
    if parent is None:
        return []
    return [b64_text(el, what) for el in parent.iter(_XA + "EncapsulatedOCSPValue")]


def _ts_c14n(ts_el: etree._Element) -> bool:
    """Whether the timestamp's input is exclusive C14N (its CanonicalizationMethod; default
    inclusive C14N 1.0)."""
    cm = ts_el.find(_DS + "CanonicalizationMethod")
    alg = cm.get("Algorithm") if cm is not None else C14N10
    if alg not in (EXC_C14N, C14N10):
        raise ValueError(f"unsupported timestamp canonicalization {alg}")
    return alg == EXC_C14N


def read_unsigned(
    sig: etree._Element,
    tree: etree._ElementTree,
    index: dict[str, etree._Element],
    content: bytes | None,
) -> UnsignedValues:
    """Timestamps with what they stamp, and the validation data; ValueError when unreadable."""
    out = UnsignedValues()
    usp = _usp(sig)
    if usp is None:
        return out
    sv = sig.find(_DS + "SignatureValue")
    assert sv is not None
    validation: dict[
        str, tuple[list[x509.Certificate], list[x509.CertificateRevocationList], list[bytes]]
    ] = {}
    for prop in usp.iterfind(_XA141 + "TimeStampValidationData"):
        uri = (prop.get("URI") or "").lstrip("#")
        validation[uri] = (
            _certs(prop.find(_XA + "CertificateValues"), "TimeStampValidationData certificate"),
            _crls(prop.find(_XA + "RevocationValues"), "TimeStampValidationData CRL"),
            _ocsps(prop.find(_XA + "RevocationValues"), "TimeStampValidationData OCSP"),
        )
    archive = ArchiveInputs(sig, tree, index, content=content)
    for prop in usp.iterchildren("*"):
        name = etree.QName(prop).localname
        if prop.tag == _XA + "SignatureTimeStamp":
            kind = "signature"
            exclusive = _ts_c14n(prop)
            imprint = c14n(sv, exclusive=exclusive)
        elif prop.tag in (_XA141 + "ArchiveTimeStamp", _XA + "ArchiveTimeStamp"):
            kind = "archive"
            exclusive = _ts_c14n(prop)
            imprint = archive.input(prop, exclusive=exclusive)
        elif prop.tag == _XA + "CertificateValues":
            out.certs += _certs(prop, "CertificateValues certificate")
            out.has_values = True
            continue
        elif prop.tag == _XA + "RevocationValues":
            out.crls += _crls(prop, "RevocationValues CRL")
            out.ocsps += _ocsps(prop, "RevocationValues OCSP response")
            continue
        else:
            continue
        ev = TimestampEvidence(kind, None, imprint)
        try:
            ev.token_der = b64_text(prop.find(_XA + "EncapsulatedTimeStamp"), f"{name} token")
        except ValueError as e:
            ev.error = str(e)
        certs, crls, ocsps = validation.get(prop.get("Id") or "", ([], [], []))
        ev.certs, ev.crls, ev.ocsps = certs, crls, ocsps
        out.timestamps.append(ev)
    has_revocation = usp.find(_XA + "RevocationValues") is not None
    out.has_values = out.has_values and has_revocation
    return out
