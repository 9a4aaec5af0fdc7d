"""Verification of CAdES, XAdES (incl. the e-prescription) and PAdES signatures.

Result: an ETSI EN 319 102-1 indication (TOTAL-PASSED, TOTAL-FAILED, INDETERMINATE) with a
sub-indication from that standard and a readable reason, per signature and for the document
(the worst signature wins). The checks, in the order that decides the sub-indication:

1. format (parsable, supported algorithms): TOTAL-FAILED / FORMAT_FAILURE
2. data digests (messageDigest, ds:Reference, ByteRange): TOTAL-FAILED / HASH_FAILURE
3. the signature value: TOTAL-FAILED / SIG_CRYPTO_FAILURE
4. signing certificate bound by SigningCertificateV2: INDETERMINATE / NO_SIGNING_CERTIFICATE_FOUND
5. the signature timestamp (imprint, TSA signature and trust)
6. chain to the configured HPKI anchors: INDETERMINATE / NO_CERTIFICATE_CHAIN_FOUND,
   OUT_OF_BOUNDS_NO_POE
7. revocation (OCSP where the certificate has an AIA responder and OCSP is on, else CRLs):
   TOTAL-FAILED / REVOKED; INDETERMINATE / REVOKED_NO_POE, TRY_LATER
8. HPKI signing profile and the hcRole for the document type: INDETERMINATE /
   CHAIN_CONSTRAINTS_FAILURE, SIG_CONSTRAINTS_FAILURE

Integrity is checked here for CMS and XML (the formats the gateway itself writes); PDF
structure (ByteRange, coverage) comes from pyHanko and the CMS inside goes through the same
CMS checks. Nothing here raises on bad input: garbage yields TOTAL-FAILED / FORMAT_FAILURE.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import io
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from asn1crypto import cms, core, pem
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from lxml import etree

from gateway.errors import InvalidRequest, PkiError
from gateway.pki import hpki
from gateway.pki.crl import CrlSource
from gateway.pki.ocsp import OcspClient
from gateway.pki.revocation import revocation_status
from gateway.sign import timestamp as ts
from gateway.sign.eprescription import PROFILES, EPrescriptionProfile, RolePolicy
from gateway.sign.xades import (
    C14N10,
    DETACHED_URI,
    DS,
    ENVELOPED,
    EXC_C14N,
    SIGNED_PROPERTIES_TYPE,
    XADES,
    c14n,
    parse_untrusted,
)

__all__ = ["SignatureReport", "TrustConfig", "VerificationReport", "verify_document"]

_log = logging.getLogger("gateway.sign.verify")

TOTAL_PASSED = "TOTAL-PASSED"
TOTAL_FAILED = "TOTAL-FAILED"
INDETERMINATE = "INDETERMINATE"
_RANK = {TOTAL_PASSED: 0, INDETERMINATE: 1, TOTAL_FAILED: 2}

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


@dataclass
class TrustConfig:
    """What a verifier trusts and checks; built from settings or CLI flags."""

    anchors: list[x509.Certificate]
    intermediates: list[x509.Certificate] = field(default_factory=list)
    tsa_anchors: list[x509.Certificate] = field(default_factory=list)
    crls: CrlSource = field(default_factory=CrlSource)
    #: Set (``[pki] ocsp = true``, CLI ``--ocsp``): certificates with an AIA OCSP URL are asked
    #: there first; None: CRLs only.
    ocsp: OcspClient | None = None
    check_revocation: bool = True
    roles: RolePolicy = field(
        default_factory=lambda: RolePolicy(
            {"prescription": ["Medical Doctor", "Dentist"], "dispensing": ["Pharmacist"]}
        )
    )
    profiles: Sequence[EPrescriptionProfile] = tuple(PROFILES.values())
    max_xml_depth: int = 64
    #: Refused before any digest is computed: more signatures in a document, more references
    #: in one XML signature (each reference may cost a canonicalisation of the whole document).
    max_signatures: int = 10
    max_references: int = 10


@dataclass
class SignatureReport:
    format: str
    indication: str = TOTAL_PASSED
    sub_indication: str | None = None
    reason: str = "the signature is valid"
    level: str | None = None
    signer: dict[str, Any] | None = None
    signing_time: str | None = None
    timestamp: dict[str, Any] | None = None
    chain: dict[str, Any] = field(default_factory=lambda: {"status": "not checked"})
    revocation: dict[str, Any] = field(default_factory=lambda: {"status": "not checked"})
    document_type: str | None = None
    role_permitted: bool | None = None
    notes: list[str] = field(default_factory=list)
    #: What the signature's references cover (element paths, "the whole document", ...).
    signed_elements: list[str] = field(default_factory=list)

    def fail(self, indication: str, sub: str, reason: str) -> SignatureReport:
        if self.indication == TOTAL_PASSED:
            self.indication, self.sub_indication, self.reason = indication, sub, reason
        return self

    @property
    def decided(self) -> bool:
        return self.indication != TOTAL_PASSED

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "level": self.level,
            "indication": self.indication,
            "sub_indication": self.sub_indication,
            "reason": self.reason,
            "signer": self.signer,
            "signing_time": self.signing_time,
            "timestamp": self.timestamp,
            "chain": self.chain,
            "revocation": self.revocation,
            "document_type": self.document_type,
            "role_permitted": self.role_permitted,
            "notes": self.notes,
            "signed_elements": self.signed_elements,
        }


@dataclass
class VerificationReport:
    format: str
    signatures: list[SignatureReport]
    indication: str = TOTAL_PASSED
    sub_indication: str | None = None
    reason: str = ""

    @classmethod
    def of(cls, fmt: str, sigs: list[SignatureReport]) -> VerificationReport:
        if not sigs:
            return cls(fmt, [], TOTAL_FAILED, "FORMAT_FAILURE", "no signature found")
        worst = max(sigs, key=lambda s: _RANK[s.indication])
        reason = worst.reason if len(sigs) == 1 else f"{len(sigs)} signatures; {worst.reason}"
        return cls(fmt, sigs, worst.indication, worst.sub_indication, reason)

    @property
    def passed(self) -> bool:
        return self.indication == TOTAL_PASSED

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "indication": self.indication,
            "sub_indication": self.sub_indication,
            "reason": self.reason,
            "signatures": [s.to_json_dict() for s in self.signatures],
        }


# --------------------------------------------------------------------------------------------
# Shared tail: timestamp, chain, revocation, profile, role


@dataclass
class _Found:
    """What the format-specific part hands to the common checks."""

    cert: x509.Certificate
    embedded: list[x509.Certificate]
    signing_time: dt.datetime | None
    token_der: bytes | None
    imprint_data: bytes | None


def _signer_info(cert: x509.Certificate) -> dict[str, Any]:
    info = hpki.inspect_certificate(cert)
    return {
        "subject": info.subject,
        "issuer": info.issuer,
        "serial_hex": info.serial_hex,
        "hc_roles": info.hc_roles,
        "not_before": info.not_before.isoformat(),
        "not_after": info.not_after.isoformat(),
    }


async def _common(
    rep: SignatureReport, found: _Found, trust: TrustConfig, now: dt.datetime
) -> SignatureReport:
    cert = found.cert
    rep.signer = _signer_info(cert)
    if found.signing_time is not None:
        rep.signing_time = found.signing_time.isoformat()
    poe: dt.datetime | None = None  # proof that the signature existed at this time
    if found.token_der is not None:
        rep.level = "B-T"
        try:
            token = ts.parse_token(found.token_der)
        except (ValueError, TypeError, KeyError) as e:
            return rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", f"signature timestamp unreadable: {e}")
        problem = ts.check_token(
            token, imprint_data=found.imprint_data or b"", trust_anchors=trust.tsa_anchors
        )
        tsa_name = token.certificates[0].subject.rfc4514_string() if token.certificates else None
        rep.timestamp = {
            "time": token.gen_time.isoformat(),
            "tsa": tsa_name,
            "status": "valid" if problem is None else problem.reason,
        }
        if problem is not None:
            if problem.kind == "hash":
                return rep.fail(TOTAL_FAILED, "HASH_FAILURE", problem.reason)
            if problem.kind == "signature":
                return rep.fail(TOTAL_FAILED, "SIG_CRYPTO_FAILURE", problem.reason)
            if problem.kind == "chain":
                return rep.fail(
                    INDETERMINATE,
                    "NO_CERTIFICATE_CHAIN_FOUND",
                    f"signature timestamp: {problem.reason}",
                )
            return rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", problem.reason)
        poe = token.gen_time
    else:
        rep.level = "B-B"

    # Chain: at the time of the timestamp when there is one (the POE), else now.
    moment = poe or now
    intermediates = [*found.embedded, *trust.intermediates]
    try:
        path = hpki.verify_chain(
            cert, intermediates=intermediates, trust_anchors=trust.anchors, moment=moment
        )
    except PkiError as e:
        expired = now > cert.not_valid_after_utc
        rep.chain = {"status": "invalid", "reason": e.description}
        if expired and poe is None:
            return rep.fail(INDETERMINATE, "OUT_OF_BOUNDS_NO_POE", e.description)
        if moment < cert.not_valid_before_utc:
            return rep.fail(TOTAL_FAILED, "NOT_YET_VALID", e.description)
        return rep.fail(INDETERMINATE, "NO_CERTIFICATE_CHAIN_FOUND", e.description)
    rep.chain = {
        "status": "valid",
        "checked_at": moment.isoformat(),
        "path": [c.subject.rfc4514_string() for c in path],
    }
    if poe is not None and found.signing_time is not None and found.signing_time > poe:
        rep.notes.append("claimed signing time is after the timestamp")

    # Revocation of every non-anchor certificate of the path.
    if trust.check_revocation:
        statuses = []
        for child, issuer in itertools.pairwise(path):
            statuses.append(
                await revocation_status(child, issuer, now, crls=trust.crls, ocsp=trust.ocsp)
            )
        revoked = [s for s in statuses if s.status == "revoked"]
        unknown = [s for s in statuses if s.status == "unknown"]
        if revoked:
            r = revoked[0]
            rep.revocation = {"status": "revoked", "reason": r.reason, "source": r.source}
            if poe is not None and r.revocation_time is not None and poe < r.revocation_time:
                rep.notes.append("revoked after the timestamp: the signature predates it")
            elif poe is not None:
                return rep.fail(TOTAL_FAILED, "REVOKED", r.reason)
            else:
                return rep.fail(INDETERMINATE, "REVOKED_NO_POE", r.reason)
        elif unknown:
            u = unknown[0]
            rep.revocation = {"status": "unknown", "reason": u.reason, "source": u.source}
            return rep.fail(INDETERMINATE, "TRY_LATER", u.reason)
        else:
            sources = {s.source for s in statuses}
            checked = " and ".join(
                n for k, n in (("ocsp", "OCSP"), ("crl", "CRLs")) if k in sources
            )
            rep.revocation = {
                "status": "good",
                "reason": f"not revoked ({checked or 'nothing'} checked)",
                # What decided for the signer's own certificate.
                "source": statuses[0].source if statuses else None,
            }
    else:
        rep.revocation = {"status": "not checked", "reason": "revocation checking disabled"}

    problems = hpki.check_signing_profile(cert)
    if problems:
        return rep.fail(
            INDETERMINATE,
            "CHAIN_CONSTRAINTS_FAILURE",
            "not an HPKI signing certificate: " + "; ".join(problems),
        )
    if rep.document_type is not None:
        roles = rep.signer.get("hc_roles", [])
        rep.role_permitted = trust.roles.permits(roles, rep.document_type)
        if not rep.role_permitted:
            allowed = ", ".join(trust.roles.allowed.get(rep.document_type, ())) or "nobody"
            return rep.fail(
                INDETERMINATE,
                "SIG_CONSTRAINTS_FAILURE",
                f"hcRole {', '.join(roles) or 'none'} may not sign a {rep.document_type} "
                f"document (allowed: {allowed})",
            )
    rep.reason = f"valid {rep.format}-{rep.level} signature by {rep.signer['subject']}" + (
        f" ({', '.join(rep.signer['hc_roles'])})" if rep.signer["hc_roles"] else ""
    )
    return rep


# --------------------------------------------------------------------------------------------
# CMS (CAdES, and the CMS inside PAdES)


def _load_cert(der: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _cms_certs(sd: Any) -> list[x509.Certificate]:
    out = []
    for c in sd["certificates"] or []:
        if c.name == "certificate":
            cert = _load_cert(c.chosen.dump())
            if cert is not None:
                out.append(cert)
    return out


def _attr(attrs: Any, name: str) -> Any:
    if isinstance(attrs, core.Void):
        return None
    for a in attrs:
        if a["type"].native == name:
            return a["values"][0]
    return None


#: Digests accepted for CMS content, signatures and signing-certificate bindings.
_STRONG_DIGESTS = ("sha256", "sha384", "sha512")


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


async def _verify_cms_signed_data(
    sd: Any,
    *,
    fmt: str,
    content: bytes | None,
    content_digest: bytes | None,
    trust: TrustConfig,
    now: dt.datetime,
) -> list[SignatureReport]:
    reports = []
    eci = sd["encap_content_info"]
    embedded_content = eci["content"]
    if not isinstance(embedded_content, core.Void) and embedded_content is not None:
        attached = embedded_content.native
        attached = attached if isinstance(attached, bytes) else embedded_content.contents
        if content is not None and content != attached:
            pass  # the embedded content is what was signed; --content is ignored for it
        content = attached
    if len(sd["signer_infos"]) > trust.max_signatures:
        raise InvalidRequest(
            f"the signature has {len(sd['signer_infos'])} SignerInfos; at most "
            f"{trust.max_signatures} are verified (signing.verify_max_signatures)"
        )
    certs = _cms_certs(sd)
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
        rep.signer = _signer_info(cert)
        digest_alg = si["digest_algorithm"]["algorithm"].native
        md = _attr(si["signed_attrs"], "message_digest")
        if md is None:
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", "no messageDigest signed attribute")
            continue
        if digest_alg not in _STRONG_DIGESTS:
            rep.fail(
                TOTAL_FAILED,
                "FORMAT_FAILURE",
                f"unsupported digest {digest_alg} (only SHA-256/384/512 are accepted)",
            )
            continue
        if content_digest is None:
            if content is None:
                rep.fail(
                    INDETERMINATE,
                    "SIGNED_DATA_NOT_FOUND",
                    "detached signature: give the signed content (--content / content)",
                )
                continue
            actual = hashlib.new(digest_alg, content).digest()
        else:
            actual = content_digest
        if md.native != actual:
            rep.fail(
                TOTAL_FAILED,
                "HASH_FAILURE",
                "the signed content does not match the signature's messageDigest",
            )
            continue
        problem = ts.verify_signer_info(si, cert, content_digest=actual)
        if problem is not None:
            rep.fail(TOTAL_FAILED, "SIG_CRYPTO_FAILURE", problem)
            continue
        binding = _cms_binding(si, cert)
        if binding is not None:
            rep.fail(INDETERMINATE, "NO_SIGNING_CERTIFICATE_FOUND", binding)
            continue
        st = _attr(si["signed_attrs"], "signing_time")
        token = _attr(si["unsigned_attrs"], "signature_time_stamp_token")
        found = _Found(
            cert=cert,
            embedded=certs,
            signing_time=st.native if st is not None else None,
            token_der=token.dump() if token is not None else None,
            imprint_data=si["signature"].native,
        )
        await _common(rep, found, trust, now)
    return reports


def _load_cms(data: bytes) -> Any:
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


# --------------------------------------------------------------------------------------------
# XML (XAdES, e-prescription)


def _id_index(root: etree._Element) -> tuple[dict[str, etree._Element], set[str]]:
    index: dict[str, etree._Element] = {}
    dupes: set[str] = set()
    for el in root.iter("*"):  # elements only (no comments or PIs)
        for attr in ("Id", "ID", "id"):
            v = el.get(attr)
            if v is not None:
                if v in index and index[v] is not el:
                    dupes.add(v)
                index[v] = el
    return index, dupes


@contextlib.contextmanager
def _detached(el: etree._Element) -> Iterator[None]:
    """Take ``el`` out of its tree for a moment (the enveloped-signature transform), without
    copying the tree: the text after it stays where it was, and everything is put back."""
    parent = el.getparent()
    if parent is None:
        yield
        return
    index = parent.index(el)
    tail = el.tail
    prev = el.getprevious()
    prev_tail = prev.tail if prev is not None else None
    parent_text = parent.text
    if tail:
        if prev is not None:
            prev.tail = (prev_tail or "") + tail
        else:
            parent.text = (parent_text or "") + tail
    parent.remove(el)  # lxml takes the tail along; it was kept just above
    try:
        yield
    finally:
        if prev is not None:
            prev.tail = prev_tail
        else:
            parent.text = parent_text
        el.tail = tail
        parent.insert(index, el)


def _apply_transforms(
    node: etree._Element | etree._ElementTree, transforms: list[str], sig: etree._Element
) -> bytes:
    """Transforms the gateway writes and HPKI uses: enveloped-signature, (exc-)C14N 1.0."""
    c14n_alg = C14N10  # XMLDSig: a node-set becomes octets by inclusive C14N by default
    enveloped = False
    for t in transforms:
        if t == ENVELOPED:
            enveloped = True
        elif t in (EXC_C14N, C14N10):
            c14n_alg = t
        else:
            raise ValueError(f"unsupported transform {t}")
    if enveloped:
        start = node.getroot() if isinstance(node, etree._ElementTree) else node
        if start is sig:
            return b""  # the transform removes the whole node-set
        if any(a is start for a in sig.iterancestors()):
            with _detached(sig):
                return c14n(node, exclusive=c14n_alg == EXC_C14N)
    return c14n(node, exclusive=c14n_alg == EXC_C14N)


def _e_profile(
    sig: etree._Element, trust: TrustConfig
) -> tuple[EPrescriptionProfile | None, str | None]:
    """(profile, problem): whether the document is an e-prescription and the signature sits
    where the profile puts it (Document/<Container>/<Sign>/ds:Signature), the only one there."""
    root = sig.getroottree().getroot()
    for p in trust.profiles:
        if root.tag != p.root:
            continue
        container = root.find(p.container)
        if container is None:
            continue
        where = f"{p.root}/{p.container}/{p.sign}"
        parent = sig.getparent()
        if parent is None or parent.tag != p.sign or parent.getparent() is not container:
            return p, f"the signature is not at {where}"
        slots = container.findall(p.sign)
        if len(slots) != 1 or len(parent.findall(_DS + "Signature")) != 1:
            return p, f"more than one signature slot at {where}"
        return p, None
    return None, None


def _profile_structure(
    root: etree._Element, profile: EPrescriptionProfile, signed: list[etree._Element]
) -> str | None:
    """None when the profile's document element is the one element of its name, at its fixed
    path, and covered by the signature's references (itself or an ancestor); else why not.

    Without this, a signed document element moved elsewhere (where the references still find
    it by Id) next to a forged unsigned one at the fixed path would verify (signature wrapping).
    """
    p = profile
    fixed = f"{p.root}/{p.container}/{p.document}"
    target = root.find(f"{p.container}/{p.document}")
    if target is None:
        return f"no {fixed} element"
    covering = {id(el) for el in signed}
    if not any(id(a) in covering for a in (target, *target.iterancestors())):
        moved = [_path(el) for el in signed if el.tag == p.document]
        return f"the signature does not cover {fixed}" + (
            f" (it covers {', '.join(moved)} instead: signature wrapping)" if moved else ""
        )
    for tag in (p.container, p.document, p.sign):
        n = sum(1 for _ in root.iter(tag))
        if n != 1:
            return f"the document has {n} <{tag}> elements; the {p.name} profile allows one"
    return None


def _path(el: etree._Element) -> str:
    """A readable absolute path of an element (prefix:name, [n] among same-named siblings)."""
    parts = []
    node: etree._Element | None = el
    while node is not None:
        q = etree.QName(node)
        name = f"{node.prefix}:{q.localname}" if node.prefix else q.localname
        parent = node.getparent()
        if parent is not None:
            same = [c for c in parent if c.tag == node.tag]
            if len(same) > 1:
                name += f"[{same.index(node) + 1}]"
        parts.append(name)
        node = parent
    return "/" + "/".join(reversed(parts))


async def _verify_xml(
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
    index, dupes = _id_index(root)
    reports = []
    for sig in sigs:
        rep = SignatureReport(format="XAdES")
        reports.append(rep)
        try:
            await _verify_one_xml(rep, sig, tree, index, dupes, content, trust, now)
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", f"malformed signature: {e}")
    return reports


def _text(el: etree._Element | None) -> str:
    return "".join((el.text or "").split()) if el is not None else ""


async def _verify_one_xml(
    rep: SignatureReport,
    sig: etree._Element,
    tree: etree._ElementTree,
    index: dict[str, etree._Element],
    dupes: set[str],
    content: bytes | None,
    trust: TrustConfig,
    now: dt.datetime,
) -> None:
    si = sig.find(_DS + "SignedInfo")
    sv = sig.find(_DS + "SignatureValue")
    if si is None or sv is None:
        rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", "ds:SignedInfo or ds:SignatureValue missing")
        return
    n_refs = len(si.findall(_DS + "Reference"))
    if n_refs > trust.max_references:
        rep.fail(
            TOTAL_FAILED,
            "FORMAT_FAILURE",
            f"the signature has {n_refs} references; at most {trust.max_references} are "
            "verified (signing.verify_max_references)",
        )
        return
    profile, misplaced = _e_profile(sig, trust)
    if profile is not None:
        rep.format = "XAdES (" + profile.name + ")"
        rep.document_type = profile.document_type
    if misplaced:
        rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", misplaced)
        return
    cm = si.find(_DS + "CanonicalizationMethod")
    sm = si.find(_DS + "SignatureMethod")
    c14n_alg = cm.get("Algorithm") if cm is not None else None
    sig_alg = sm.get("Algorithm") if sm is not None else None
    if c14n_alg not in (EXC_C14N, C14N10) or sig_alg not in _SIG_URIS:
        rep.fail(
            TOTAL_FAILED,
            "FORMAT_FAILURE",
            f"unsupported algorithms (C14N {c14n_alg}, signature {sig_alg})",
        )
        return

    # Certificates in KeyInfo; the signer is the one SigningCertificateV2 names.
    certs = []
    for el in sig.iterfind(f"{_DS}KeyInfo/{_DS}X509Data/{_DS}X509Certificate"):
        c = _load_cert(base64.b64decode(_text(el)))
        if c is not None:
            certs.append(c)
    sps = list(sig.iter(_XA + "SignedProperties"))
    if len(sps) > 1:
        rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", "more than one xades:SignedProperties")
        return
    sp = sig.find(f"{_DS}Object/{_XA}QualifyingProperties/{_XA}SignedProperties")
    cert_digest = None
    if sp is not None:
        cd = sp.find(
            f"{_XA}SignedSignatureProperties/{_XA}SigningCertificateV2/{_XA}Cert/{_XA}CertDigest"
        )
        if cd is None:
            cd = sp.find(
                f"{_XA}SignedSignatureProperties/{_XA}SigningCertificate/{_XA}Cert/{_XA}CertDigest"
            )
        if cd is not None:
            dm = cd.find(_DS + "DigestMethod")
            alg = _DIGEST_URIS.get(dm.get("Algorithm", "") if dm is not None else "")
            cert_digest = (alg, base64.b64decode(_text(cd.find(_DS + "DigestValue"))))
    if sp is None or cert_digest is None or cert_digest[0] is None:
        rep.fail(
            INDETERMINATE,
            "NO_SIGNING_CERTIFICATE_FOUND",
            "no XAdES SignedProperties with SigningCertificateV2",
        )
        return
    cert = None
    for c in certs:
        if (
            hashlib.new(cert_digest[0], c.public_bytes(serialization.Encoding.DER)).digest()
            == (cert_digest[1])
        ):
            cert = c
    if cert is None:
        first = certs[0] if certs else None
        if first is not None:
            rep.signer = _signer_info(first)
        # The signature value decides first whether this is tampering or a foreign cert.
    # References
    covered_sp = False
    covered: list[etree._Element] = []
    for ref in si.iterfind(_DS + "Reference"):
        uri = ref.get("URI")
        transforms = [
            t.get("Algorithm", "") for t in ref.iterfind(f"{_DS}Transforms/{_DS}Transform")
        ]
        dm = ref.find(_DS + "DigestMethod")
        alg = _DIGEST_URIS.get(dm.get("Algorithm", "") if dm is not None else "")
        if alg is None:
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", "unsupported reference digest method")
            return
        expected = base64.b64decode(_text(ref.find(_DS + "DigestValue")))
        if uri is None or uri == DETACHED_URI or not (uri == "" or uri.startswith("#")):
            if content is None:
                rep.fail(
                    INDETERMINATE,
                    "SIGNED_DATA_NOT_FOUND",
                    f"detached reference {uri!r}: give the signed content (--content)",
                )
                return
            octets = content
            rep.signed_elements.append(f"detached content {uri!r}")
        elif uri == "":
            octets = _apply_transforms(tree, transforms, sig)
            covered.append(tree.getroot())
            rep.signed_elements.append("/ (the whole document)")
        else:
            target_id = uri[1:]
            if target_id in dupes:
                rep.fail(
                    TOTAL_FAILED,
                    "FORMAT_FAILURE",
                    f"Id {target_id!r} occurs more than once (signature wrapping)",
                )
                return
            target = index.get(target_id)
            if target is None:
                rep.fail(INDETERMINATE, "SIGNED_DATA_NOT_FOUND", f"reference {uri} not found")
                return
            if target is sp and ref.get("Type") == SIGNED_PROPERTIES_TYPE:
                covered_sp = True
            covered.append(target)
            rep.signed_elements.append(_path(target))
            octets = _apply_transforms(target, transforms, sig)
        if hashlib.new(alg, octets).digest() != expected:
            rep.fail(
                TOTAL_FAILED,
                "HASH_FAILURE",
                f"digest of reference {uri or '(document)'} "
                "does not match: the signed data was changed",
            )
            return
    if profile is not None:
        problem = _profile_structure(tree.getroot(), profile, covered)
        if problem is not None:
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", problem)
            return
    if not covered_sp:
        rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", "SignedProperties is not signed")
        return
    # Signature value
    signature = base64.b64decode(_text(sv))
    signed = c14n(si, exclusive=c14n_alg == EXC_C14N)
    verifier = cert or (certs[0] if certs else None)
    if verifier is None:
        rep.fail(INDETERMINATE, "NO_SIGNING_CERTIFICATE_FOUND", "no certificate in KeyInfo")
        return
    public = verifier.public_key()
    try:
        if not isinstance(public, rsa.RSAPublicKey):
            raise InvalidSignature
        assert sig_alg is not None
        public.verify(signature, signed, padding.PKCS1v15(), _SIG_URIS[sig_alg])
    except InvalidSignature:
        rep.fail(
            TOTAL_FAILED,
            "SIG_CRYPTO_FAILURE",
            "the signature value does not verify with the signer's public key",
        )
        return
    if cert is None:
        rep.fail(
            INDETERMINATE,
            "NO_SIGNING_CERTIFICATE_FOUND",
            "SigningCertificateV2 names another certificate than the one that signed",
        )
        return
    st_el = sp.find(f"{_XA}SignedSignatureProperties/{_XA}SigningTime")
    signing_time = None
    if st_el is not None and st_el.text:
        try:
            signing_time = dt.datetime.fromisoformat(st_el.text.strip())
        except ValueError:
            rep.notes.append("SigningTime is not an xs:dateTime")
    token_der = imprint = None
    sts = sig.find(
        f"{_DS}Object/{_XA}QualifyingProperties/{_XA}UnsignedProperties/"
        f"{_XA}UnsignedSignatureProperties/{_XA}SignatureTimeStamp"
    )
    if sts is not None:
        ts_cm = sts.find(_DS + "CanonicalizationMethod")
        ts_alg = ts_cm.get("Algorithm") if ts_cm is not None else C14N10
        if ts_alg not in (EXC_C14N, C14N10):
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", f"unsupported timestamp C14N {ts_alg}")
            return
        token_der = base64.b64decode(_text(sts.find(_XA + "EncapsulatedTimeStamp")))
        imprint = c14n(sv, exclusive=ts_alg == EXC_C14N)
    found = _Found(
        cert=cert,
        embedded=certs,
        signing_time=signing_time,
        token_der=token_der,
        imprint_data=imprint,
    )
    await _common(rep, found, trust, now)


# --------------------------------------------------------------------------------------------
# PDF


async def _verify_pdf(
    data: bytes, *, trust: TrustConfig, now: dt.datetime
) -> list[SignatureReport]:
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import SignatureCoverageLevel

    reader = PdfFileReader(io.BytesIO(data), strict=False)
    reports = []
    embedded = reader.embedded_signatures
    if len(embedded) > trust.max_signatures:
        raise InvalidRequest(
            f"the PDF has {len(embedded)} signatures; at most {trust.max_signatures} are "
            "verified (signing.verify_max_signatures)"
        )
    for emb in embedded:
        rep = SignatureReport(format="PAdES")
        reports.append(rep)
        try:
            coverage = emb.evaluate_signature_coverage()
            digest = emb.compute_digest()
        except Exception as e:  # noqa: BLE001 - pyHanko raises many types on broken PDFs
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", f"signature ByteRange unusable: {e}")
            continue
        if coverage < SignatureCoverageLevel.ENTIRE_REVISION:
            rep.fail(
                TOTAL_FAILED, "FORMAT_FAILURE", "the signature does not cover its whole revision"
            )
            continue
        if coverage != SignatureCoverageLevel.ENTIRE_FILE:
            rep.notes.append("the file was updated after this signature (incremental update)")
        subs = await _verify_cms_signed_data(
            emb.signed_data, fmt="PAdES", content=None, content_digest=digest, trust=trust, now=now
        )
        sub = subs[0] if subs else rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", "no SignerInfo")
        sub.notes = rep.notes + sub.notes
        reports[-1] = sub
    return reports


# --------------------------------------------------------------------------------------------


def detect_format(data: bytes) -> str:
    head = data[:1024].lstrip()
    if head.startswith(b"%PDF-"):
        return "PAdES"
    if head.startswith((b"<", b"\xef\xbb\xbf<")):
        return "XAdES"
    return "CAdES"


async def verify_document(
    data: bytes,
    *,
    trust: TrustConfig,
    content: bytes | None = None,
    now: dt.datetime | None = None,
) -> VerificationReport:
    """Verify every signature in ``data`` (a signed PDF, signed XML or CMS in DER/PEM).

    Never raises for bad input: anything unreadable is TOTAL-FAILED / FORMAT_FAILURE.
    """
    now = now or dt.datetime.now(dt.UTC)
    fmt = detect_format(data)
    try:
        if fmt == "PAdES":
            sigs = await _verify_pdf(data, trust=trust, now=now)
        elif fmt == "XAdES":
            sigs = await _verify_xml(data, content=content, trust=trust, now=now)
        else:
            try:
                sd = _load_cms(data)
            except (ValueError, TypeError, KeyError, OverflowError) as e:
                return VerificationReport(
                    fmt,
                    [],
                    TOTAL_FAILED,
                    "FORMAT_FAILURE",
                    f"not a PDF, XML or CMS signature ({e})",
                )
            sigs = await _verify_cms_signed_data(
                sd, fmt="CAdES", content=content, content_digest=None, trust=trust, now=now
            )
    except InvalidRequest as e:
        return VerificationReport(fmt, [], TOTAL_FAILED, "FORMAT_FAILURE", e.description)
    except Exception as e:  # noqa: BLE001 - garbage must give a report, never an error
        _log.info("verification of a %s input failed to parse: %r", fmt, e)
        return VerificationReport(
            fmt,
            [],
            TOTAL_FAILED,
            "FORMAT_FAILURE",
            f"unreadable {fmt} signature: {type(e).__name__}",
        )
    return VerificationReport.of(fmt, sigs)
