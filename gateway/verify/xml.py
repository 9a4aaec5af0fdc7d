"""XML signatures: XAdES (generic envelopes) and the e-prescription / dispensing documents.

Per signature, in the order that decides the sub-indication: the required elements of its form
(FORMAT_FAILURE), a signing-certificate binding (NO_SIGNING_CERTIFICATE_FOUND), algorithms,
every reference digest (HASH_FAILURE), the document profile's fixed paths (signature
wrapping), the signature value (SIG_CRYPTO_FAILURE), that the binding names the signer, the
XAdES schema, then the unsigned properties and the checks shared by all formats.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from lxml import etree

from gateway.errors import InvalidRequest
from gateway.sign.xades import (
    C14N10,
    DS,
    EXC_C14N,
    SIGNED_PROPERTIES_TYPE,
    XADES,
    c14n,
    parse_untrusted,
)
from gateway.verify.cms import load_cert
from gateway.verify.report import INDETERMINATE, TOTAL_FAILED, SignatureReport
from gateway.verify.schema import schema_problem
from gateway.verify.trust import Evidence, TrustConfig, check_common, signer_info
from gateway.verify.xml_profile import misplaced_problem, placement_problem, slot_for
from gateway.verify.xml_refs import XADES141, b64_text, element_path, id_index, reference_octets
from gateway.verify.xml_values import ES_LEVELS, read_unsigned, structure_problem

__all__ = ["integrity_problem", "signature_signer", "verify_xml"]

_DIGEST_URIS = {
    "http://www.w3.org/2001/04/xmlenc#sha256": "sha256",
    "http://www.w3.org/2001/04/xmldsig-more#sha384": "sha384",
    "http://www.w3.org/2001/04/xmlenc#sha512": "sha512",
}
_SIG_URIS: dict[str, hashes.HashAlgorithm] = {
    "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256": hashes.SHA256(),
    "http://www.w3.org/2001/04/xmldsig-more#rsa-sha384": hashes.SHA384(),
    "http://www.w3.org/2001/04/xmldsig-more#rsa-sha512": hashes.SHA512(),
}
_DS = "{%s}" % DS  # noqa: UP031
_XA = "{%s}" % XADES  # noqa: UP031
_TIMESTAMPS = (
    _XA + "SignatureTimeStamp",
    f"{{{XADES141}}}ArchiveTimeStamp",
    _XA + "ArchiveTimeStamp",
)
#: Further faults named after the one that decided (each timestamp may have one).
_MAX_ALSO = 5
_SSP = f"{_DS}Object/{_XA}QualifyingProperties/{_XA}SignedProperties/{_XA}SignedSignatureProperties"


@dataclass
class _Doc:
    tree: etree._ElementTree
    index: dict[str, etree._Element]
    dupes: set[str]
    content: bytes | None


@dataclass
class _Binding:
    """What names the signer: (algorithm, digest) of SigningCertificate(V2), or the issuer and
    serial of a signed KeyInfo's X509IssuerSerial."""

    digest: tuple[str, bytes] | None = None
    serial: int | None = None
    issuer: str = ""
    candidates: list[x509.Certificate] = field(default_factory=list)

    def matches(self, cert: x509.Certificate) -> bool:
        if self.digest is not None:
            der = cert.public_bytes(serialization.Encoding.DER)
            return hashlib.new(self.digest[0], der).digest() == self.digest[1]
        return (
            self.serial is not None
            and cert.serial_number == self.serial
            and _same_name(self.issuer, cert.issuer)
        )


#: Attribute types XML-DSig producers write that RFC 4514 parsing does not know by name.
_NAME_ALIASES = {
    "E": NameOID.EMAIL_ADDRESS,
    "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
}


def _same_name(text: str, name: x509.Name) -> bool:
    """Whether an X509IssuerName (RFC 2253/4514 text; producers put spaces after the commas)
    is ``name``; anything unreadable is not."""
    for form in (text.strip(), re.sub(r"\s*,\s*", ",", text.strip())):
        if form == name.rfc4514_string():
            return True
        try:
            if x509.Name.from_rfc4514_string(form, _NAME_ALIASES) == name:
                return True
        except ValueError:
            continue
    return False


def _signed_key_info(sig: etree._Element) -> bool:
    """Whether a reference of the signature points at its KeyInfo (its digest is checked with
    the others; a duplicated Id is refused there)."""
    ki = sig.find(_DS + "KeyInfo")
    if ki is None:
        return False
    ids = {f"#{v}" for v in (ki.get("Id"), ki.get("ID"), ki.get("id")) if v}
    return any(ref.get("URI") in ids for ref in sig.iterfind(f"{_DS}SignedInfo/{_DS}Reference"))


def _binding(sig: etree._Element, candidates: list[x509.Certificate]) -> _Binding | None:
    """SigningCertificateV2 or SigningCertificate in the SignedProperties, or else the
    X509IssuerSerial of a signed KeyInfo (None: nothing signed names the signer). An unsigned
    KeyInfo names nothing: it can be swapped for another certificate of the same key."""
    for prop in ("SigningCertificateV2", "SigningCertificate"):
        cd = sig.find(f"{_SSP}/{_XA}{prop}/{_XA}Cert/{_XA}CertDigest")
        if cd is not None:
            dm = cd.find(_DS + "DigestMethod")
            alg = _DIGEST_URIS.get(dm.get("Algorithm", "") if dm is not None else "")
            if alg is None:
                raise ValueError(f"{prop} uses an unsupported digest method")
            value = b64_text(cd.find(_DS + "DigestValue"), f"{prop} CertDigest")
            return _Binding(digest=(alg, value), candidates=candidates)
    iss = sig.find(f"{_DS}KeyInfo/{_DS}X509Data/{_DS}X509IssuerSerial")
    if iss is None or not _signed_key_info(sig):
        return None
    serial = (iss.findtext(_DS + "X509SerialNumber") or "").strip()
    issuer = (iss.findtext(_DS + "X509IssuerName") or "").strip()
    if not serial.isdigit() or not issuer:
        return None
    return _Binding(serial=int(serial), issuer=issuer, candidates=candidates)


def _unbound_reason(sig: etree._Element) -> str:
    if sig.find(f"{_DS}KeyInfo/{_DS}X509Data/{_DS}X509IssuerSerial") is not None and (
        not _signed_key_info(sig)
    ):
        return (
            "no signing certificate: neither SigningCertificateV2 nor SigningCertificate is in "
            "the SignedProperties, and the KeyInfo's X509IssuerSerial does not count: no "
            "reference signs the KeyInfo"
        )
    return (
        "no signing certificate: neither SigningCertificateV2, SigningCertificate nor a signed "
        "KeyInfo's X509IssuerSerial (issuer and serial) names it"
    )


def _candidates(sig: etree._Element) -> list[x509.Certificate]:
    out = []
    paths = (
        f"{_DS}KeyInfo/{_DS}X509Data/{_DS}X509Certificate",
        f"{_DS}Object/{_XA}QualifyingProperties/{_XA}UnsignedProperties/"
        f"{_XA}UnsignedSignatureProperties/{_XA}CertificateValues/{_XA}EncapsulatedX509Certificate",
    )
    for path in paths:
        for el in sig.iterfind(path):
            c = load_cert(b64_text(el, "certificate"))
            if c is not None:
                out.append(c)
    return out


def _references(
    rep: SignatureReport, sig: etree._Element, doc: _Doc
) -> list[etree._Element] | None:
    """Every reference digest; the elements covered (None: the report failed)."""
    si = sig.find(_DS + "SignedInfo")
    assert si is not None
    sp = sig.find(f"{_DS}Object/{_XA}QualifyingProperties/{_XA}SignedProperties")
    covered: list[etree._Element] = []
    covered_sp = False
    for ref in si.iterfind(_DS + "Reference"):
        uri = ref.get("URI")
        dm = ref.find(_DS + "DigestMethod")
        alg = _DIGEST_URIS.get(dm.get("Algorithm", "") if dm is not None else "")
        if alg is None:
            rep.fail(
                TOTAL_FAILED,
                "FORMAT_FAILURE",
                f"reference {uri}: unsupported or missing DigestMethod",
            )
            return None
        expected = b64_text(ref.find(_DS + "DigestValue"), f"DigestValue of reference {uri}")
        if uri and uri.startswith("#") and uri[1:] in doc.dupes:
            rep.fail(
                TOTAL_FAILED,
                "FORMAT_FAILURE",
                f"Id {uri[1:]!r} occurs more than once (signature wrapping)",
            )
            return None
        try:
            octets, target = reference_octets(ref, sig, doc.tree, doc.index, doc.content)
        except KeyError:
            rep.fail(INDETERMINATE, "SIGNED_DATA_NOT_FOUND", f"reference {uri} not found")
            return None
        if octets is None:
            rep.fail(
                INDETERMINATE,
                "SIGNED_DATA_NOT_FOUND",
                f"detached reference {uri!r}: give the signed content (--content)",
            )
            return None
        if target is None:
            rep.signed_elements.append(f"detached content {uri!r}")
        else:
            covered.append(target)
            whole = target is doc.tree.getroot() and uri == ""
            rep.signed_elements.append("/ (the whole document)" if whole else element_path(target))
            if target is sp and ref.get("Type") == SIGNED_PROPERTIES_TYPE:
                covered_sp = True
        if hashlib.new(alg, octets).digest() != expected:
            rep.fail(
                TOTAL_FAILED,
                "HASH_FAILURE",
                f"digest of reference {uri or '(document)'} does not match: "
                "the signed data was changed",
            )
            return None
    if not covered_sp:
        rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", "SignedProperties is not signed")
        return None
    return covered


def _signature_value(sig: etree._Element, cert: x509.Certificate) -> str | None:
    si = sig.find(_DS + "SignedInfo")
    assert si is not None
    cm = si.find(_DS + "CanonicalizationMethod")
    sm = si.find(_DS + "SignatureMethod")
    c14n_alg = cm.get("Algorithm") if cm is not None else None
    sig_alg = sm.get("Algorithm") if sm is not None else None
    if c14n_alg not in (EXC_C14N, C14N10) or sig_alg not in _SIG_URIS:
        raise ValueError(f"unsupported algorithms (C14N {c14n_alg}, signature {sig_alg})")
    signature = b64_text(sig.find(_DS + "SignatureValue"), "SignatureValue")
    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey) and len(signature) != (public.key_size + 7) // 8:
        return (
            f"the SignatureValue decodes to {len(signature)} bytes, not the {public.key_size}-bit "
            "key's: its Base64 or value is broken"
        )
    try:
        if not isinstance(public, rsa.RSAPublicKey):
            raise InvalidSignature
        public.verify(
            signature,
            c14n(si, exclusive=c14n_alg == EXC_C14N),
            padding.PKCS1v15(),
            _SIG_URIS[sig_alg],
        )
    except InvalidSignature:
        return "the signature value does not verify with the signer's public key"
    return None


def signature_signer(sig: etree._Element) -> x509.Certificate:
    """The certificate whose key made ``sig``'s SignatureValue over its SignedInfo, which the
    signature's signing-certificate binding names; ValueError saying what is wrong otherwise
    (the elements of ES-BES, the binding, the algorithms, the value). No trust is decided and
    the references are not followed (a detached signature's content is not at hand): used
    before a signature is extended, so that only a real signature gets a timestamp."""
    problem = structure_problem(sig)
    if problem is not None:
        raise ValueError(problem)
    candidates = _candidates(sig)
    binding = _binding(sig, candidates)
    signer = next((c for c in candidates if binding and binding.matches(c)), None)
    if signer is None:
        raise ValueError("no certificate in the signature matches its signing-certificate binding")
    problem = _signature_value(sig, signer)
    if problem is not None:
        raise ValueError(problem)
    return signer


def integrity_problem(sig: etree._Element, tree: etree._ElementTree) -> str | None:
    """Whether the signature's references and value hold (no trust decided): used before a
    dispensing result is signed around an embedded prescription."""
    index, dupes = id_index(tree.getroot())
    rep = SignatureReport(format="XAdES")
    try:
        problem = structure_problem(sig)
        if problem is not None:
            return problem
        candidates = _candidates(sig)
        binding = _binding(sig, candidates)
        signer = next((c for c in candidates if binding and binding.matches(c)), None)
        if signer is None:
            return "no certificate in the signature matches its signing-certificate binding"
        if _references(rep, sig, _Doc(tree, index, dupes, None)) is None:
            return rep.reason
        return _signature_value(sig, signer)
    except (ValueError, KeyError, TypeError) as e:
        return str(e)


async def verify_xml(
    data: bytes, *, content: bytes | None, trust: TrustConfig, now: dt.datetime
) -> list[SignatureReport]:
    tree = parse_untrusted(data, max_depth=trust.max_xml_depth)
    root = tree.getroot()
    sigs = [root] if root.tag == _DS + "Signature" else list(root.iter(_DS + "Signature"))
    if len(sigs) > trust.max_signatures:
        raise InvalidRequest(
            f"the document has {len(sigs)} signatures; at most {trust.max_signatures} are "
            "verified (signing.verify_max_signatures)"
        )
    index, dupes = id_index(root)
    doc = _Doc(tree, index, dupes, content)
    reports = []
    for sig in sigs:
        rep = SignatureReport(format="XAdES", location=element_path(sig))
        reports.append(rep)
        try:
            await _verify_one(rep, sig, doc, trust, now)
        except (ValueError, KeyError, TypeError) as e:
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", f"malformed signature: {e}")
        if rep.decided and rep.level is None:
            # Stopped before the unsigned properties: name their own faults too, as the
            # reference verifier reports each of its checks.
            checks = _timestamp_prechecks(sig, limit=trust.max_timestamps)
            extra = [p for p in dict.fromkeys(checks) if p not in rep.reason]
            try:
                unbound = _binding(sig, []) is None
            except ValueError:
                unbound = True
            if unbound and "signing certificate" not in rep.reason:
                extra.append("no signing certificate is named (SigningCertificateV2, ...)")
            if extra:
                shown = extra[:_MAX_ALSO]
                if len(extra) > _MAX_ALSO:
                    shown.append(f"and {len(extra) - _MAX_ALSO} more")
                rep.reason += "; also: " + "; ".join(shown)
    return reports


def _timestamps(sig: etree._Element) -> Iterator[etree._Element]:
    """The signature's timestamps that are read: SignatureTimeStamp, ArchiveTimeStamp (1.4.1
    and 1.3.2)."""
    return sig.iter(*_TIMESTAMPS)


def _timestamp_prechecks(sig: etree._Element, *, limit: int) -> list[str]:
    """Faults of the (first ``limit``) timestamps that need no trust: unreadable tokens, a
    signature timestamp that does not cover the SignatureValue."""
    from gateway.sign import timestamp as ts

    out: list[str] = []
    sv = sig.find(_DS + "SignatureValue")
    for el in itertools.islice(_timestamps(sig), limit):
        name = etree.QName(el).localname
        try:
            token = ts.parse_token(
                b64_text(el.find(_XA + "EncapsulatedTimeStamp"), f"{name} token")
            )
        except (ValueError, TypeError, KeyError) as e:
            out.append(str(e) if str(e).startswith(name) else f"{name} token unreadable: {e}")
            continue
        if name == "SignatureTimeStamp" and sv is not None:
            cm = el.find(_DS + "CanonicalizationMethod")
            exclusive = cm is not None and cm.get("Algorithm") == EXC_C14N
            imprint = token.info["message_imprint"]
            alg = imprint["hash_algorithm"]["algorithm"].native
            if hashlib.new(alg, c14n(sv, exclusive=exclusive)).digest() != (
                imprint["hashed_message"].native
            ):
                out.append(
                    "signature timestamp: its imprint does not match the SignatureValue "
                    f"canonicalized with {'exclusive' if exclusive else 'inclusive'} C14N"
                )
    return out


async def _verify_one(
    rep: SignatureReport, sig: etree._Element, doc: _Doc, trust: TrustConfig, now: dt.datetime
) -> None:
    si = sig.find(_DS + "SignedInfo")
    if si is not None and len(si.findall(_DS + "Reference")) > trust.max_references:
        rep.fail(
            TOTAL_FAILED,
            "FORMAT_FAILURE",
            f"the signature has {len(si.findall(_DS + 'Reference'))} references; at most "
            f"{trust.max_references} are verified (signing.verify_max_references)",
        )
        return
    n = sum(1 for _ in _timestamps(sig))
    if n > trust.max_timestamps:
        rep.fail(
            TOTAL_FAILED,
            "FORMAT_FAILURE",
            f"the signature has {n} timestamps; at most {trust.max_timestamps} are verified "
            "(signing.verify_max_timestamps)",
        )
        return
    profile, slot = slot_for(sig, trust.profiles, doc.index)
    if profile is not None:
        rep.format = f"XAdES ({profile.name})"
        rep.document_type = slot.document_type if slot is not None else profile.document_type
        if slot is None:
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", misplaced_problem(profile, sig))
            return
    problem = structure_problem(sig)
    if problem is not None:
        rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", problem)
        return
    if len(list(sig.iter(_XA + "SignedProperties"))) > 1:
        rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", "more than one xades:SignedProperties")
        return
    candidates = _candidates(sig)
    binding = _binding(sig, candidates)
    if binding is None:
        rep.fail(INDETERMINATE, "NO_SIGNING_CERTIFICATE_FOUND", _unbound_reason(sig))
        return
    cert = next((c for c in candidates if binding.matches(c)), None)
    verifier = cert or (candidates[0] if candidates else None)
    if cert is None and verifier is not None:
        rep.signer = signer_info(verifier)
    covered = _references(rep, sig, doc)
    if covered is None:
        return
    if verifier is None:
        rep.fail(
            INDETERMINATE,
            "NO_SIGNING_CERTIFICATE_FOUND",
            "no signing certificate: no certificate in KeyInfo or CertificateValues",
        )
        return
    if profile is not None and slot is not None:
        problem = placement_problem(profile, slot, doc.tree.getroot(), covered)
        if problem is not None:
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", problem)
            return
    await _after_references(rep, sig, doc, trust, now, cert, verifier)


async def _after_references(
    rep: SignatureReport,
    sig: etree._Element,
    doc: _Doc,
    trust: TrustConfig,
    now: dt.datetime,
    cert: x509.Certificate | None,
    verifier: x509.Certificate,
) -> None:
    problem = _signature_value(sig, verifier)
    if problem is not None:
        rep.fail(TOTAL_FAILED, "SIG_CRYPTO_FAILURE", problem)
        return
    if cert is None:
        rep.fail(
            INDETERMINATE,
            "NO_SIGNING_CERTIFICATE_FOUND",
            "the signing-certificate binding names another certificate than the one that signed",
        )
        return
    if trust.xml_schema:
        problem = schema_problem(sig)
        if problem is not None:
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", f"XAdES schema: {problem[:300]}")
            return
    st_el = sig.find(f"{_SSP}/{_XA}SigningTime")
    signing_time = None
    if st_el is not None and st_el.text:
        try:
            signing_time = dt.datetime.fromisoformat(st_el.text.strip())
        except ValueError:
            rep.notes.append("SigningTime is not an xs:dateTime")
    values = read_unsigned(sig, doc.tree, doc.index, doc.content)
    found = Evidence(
        cert=cert,
        embedded=_candidates(sig) + [c for t in values.timestamps for c in t.certs],
        signing_time=signing_time,
        timestamps=values.timestamps,
        crls=values.crls,
        ocsps=values.ocsps,
        has_validation_data=values.has_values,
        format_levels=ES_LEVELS,
    )
    await check_common(rep, found, trust, now)
