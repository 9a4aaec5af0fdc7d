"""Extend signed documents to a higher level without touching the signer's signature (as EU DSS
``extendDocument`` does): XAdES (incl. e-prescriptions and dispensing results) to ES-T, ES-XL
or ES-A, and renew an ES-A with a further archive timestamp.

Only signatures that no other signature covers are extended: in a dispensing result, the
embedded prescription's signature is inside the pharmacist's signed ``#Dispensing`` and stays
as it is (changing it would break the pharmacist's signature).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from lxml import etree

from gateway.clock import Clock, system_clock
from gateway.errors import InvalidRequest
from gateway.hsm.api import DigestAlgorithm
from gateway.sign import ids
from gateway.sign import timestamp as ts
from gateway.sign.eprescription import profile_for_document
from gateway.sign.xades import (
    DS,
    EXC_C14N,
    XADES,
    c14n,
    parse_untrusted,
    unsigned_signature_properties,
)
from gateway.sign.xades_ltv import (
    LongTermSource,
    add_archive_timestamp,
    add_validation_data,
    path_validation_data,
    tsa_validation_data,
)

__all__ = ["TARGETS", "ExtendResult", "extend_document", "extend_xml", "needs_renewal"]

_DS = "{%s}" % DS  # noqa: UP031
_XA = "{%s}" % XADES  # noqa: UP031
_XA141 = "{http://uri.etsi.org/01903/v1.4.1#}"
#: Accepted target levels (CSC conformance_level names and the XAdES forms).
TARGETS = {
    "AdES-B-T": "ES-T",
    "AdES-B-LT": "ES-XL",
    "AdES-B-LTA": "ES-A",
    "ES-T": "ES-T",
    "ES-XL": "ES-XL",
    "ES-A": "ES-A",
    "T": "ES-T",
    "XL": "ES-XL",
    "A": "ES-A",
}
_ORDER = ["ES-BES", "ES-T", "ES-XL", "ES-A"]


@dataclass(frozen=True)
class ExtendResult:
    document: bytes
    #: Per extended signature: its Id, the form before and after.
    changes: list[tuple[str, str, str]]


def _form(sig: etree._Element) -> str:
    usp = sig.find(
        f"{_DS}Object/{_XA}QualifyingProperties/{_XA}UnsignedProperties/"
        f"{_XA}UnsignedSignatureProperties"
    )
    if usp is None or usp.find(_XA + "SignatureTimeStamp") is None:
        return "ES-BES"
    if usp.find(_XA141 + "ArchiveTimeStamp") is not None:
        return "ES-A"
    if usp.find(_XA + "CertificateValues") is not None:
        return "ES-XL"
    return "ES-T"


def _covered_elsewhere(sig: etree._Element, sigs: Sequence[etree._Element]) -> bool:
    """Whether another signature's reference covers ``sig`` (then it must stay as it is)."""
    from gateway.verify.xml_refs import id_index

    index, _ = id_index(sig.getroottree().getroot())
    for other in sigs:
        if other is sig:
            continue
        for ref in other.iterfind(f"{_DS}SignedInfo/{_DS}Reference"):
            uri = ref.get("URI") or ""
            target = sig.getroottree().getroot() if uri == "" else index.get(uri[1:])
            if target is not None and any(a is target for a in (sig, *sig.iterancestors())):
                return True
    return False


def _extendable(sig: etree._Element, target: str) -> x509.Certificate:
    """The signer's certificate when ``sig`` is a XAdES signature this can extend to
    ``target``; InvalidRequest otherwise, before any timestamp is asked for.

    Only a real signature is extended: one with the elements of ES-BES whose SignatureValue
    the certificate its binding names verifies (no trust decided; that is /verify's job).
    Anything else (a ds:Signature without xades:QualifyingProperties, a certificate that does
    not parse, a SignatureValue nobody made) would only get the TSA's timestamp over junk."""
    from gateway.verify.xml import signature_signer  # the verifier imports this package

    name = sig.get("Id") or "(without Id)"
    try:
        signer = signature_signer(sig)
    except (ValueError, TypeError, KeyError, etree.C14NError) as e:
        raise InvalidRequest(f"the signature {name} cannot be extended: {e}") from e
    if target == "ES-A":
        for ref in sig.iterfind(f"{_DS}SignedInfo/{_DS}Reference"):
            uri = ref.get("URI")
            if uri is not None and uri != "" and not uri.startswith("#"):
                raise InvalidRequest(
                    f"the signature {name} is detached ({uri!r}): the archive timestamp of "
                    "B-LTA covers the signed content, which /extend does not take"
                )
    return signer


async def _add_signature_timestamp(
    sig: etree._Element, tsa: ts.TimestampClient, *, sample: bool
) -> bytes:
    sv = sig.find(_DS + "SignatureValue")
    if sv is None:
        raise InvalidRequest("the signature has no SignatureValue")
    exclusive = not sample
    token = await tsa.timestamp(
        hashlib.sha256(c14n(sv, exclusive=exclusive)).digest(), DigestAlgorithm.SHA256
    )
    usp = unsigned_signature_properties(sig)
    sts = etree.Element(_XA + "SignatureTimeStamp")
    sts.set("Id", f"id{ids.token_hex(4)}" if sample else f"ts-id-{ids.token_hex(8)}")
    if not sample:
        etree.SubElement(sts, _DS + "CanonicalizationMethod").set("Algorithm", EXC_C14N)
    etree.SubElement(sts, _XA + "EncapsulatedTimeStamp").text = base64.b64encode(token).decode()
    usp.insert(0, sts)
    return token


def _existing_token(sig: etree._Element) -> bytes:
    el = sig.find(
        f"{_DS}Object/{_XA}QualifyingProperties/{_XA}UnsignedProperties/"
        f"{_XA}UnsignedSignatureProperties/{_XA}SignatureTimeStamp/{_XA}EncapsulatedTimeStamp"
    )
    assert el is not None
    return base64.b64decode("".join((el.text or "").split()))


async def _extend_one(
    sig: etree._Element,
    target: str,
    *,
    signer: x509.Certificate,
    tsa: ts.TimestampClient,
    source: LongTermSource,
    now: dt.datetime,
    sample: bool,
    renew: bool,
) -> str:
    before = _form(sig)
    form = before
    if _ORDER.index(form) < _ORDER.index("ES-T") <= _ORDER.index(target):
        await _add_signature_timestamp(sig, tsa, sample=sample)
        form = "ES-T"
    if _ORDER.index(form) < _ORDER.index("ES-XL") <= _ORDER.index(target):
        signer_data = await path_validation_data(signer, [*source.certs], source, now)
        if not signer_data.certs:
            raise InvalidRequest(
                f"the issuer of {signer.subject.rfc4514_string()} is not among the configured "
                "HPKI anchors and intermediates: its chain cannot be added"
            )
        tsa_data = await tsa_validation_data(_existing_token(sig), source, now)
        add_validation_data(
            sig, signer=signer_data, tsa=tsa_data, sample=sample, uid=ids.token_hex(8)
        )
        form = "ES-XL"
    if target == "ES-A" and (form != "ES-A" or renew):
        await add_archive_timestamp(
            sig, tsa=tsa, source=source, sample=sample, uid=ids.token_hex(8), now=now
        )
        form = "ES-A"
    return form


async def extend_xml(
    data: bytes,
    level: str,
    *,
    tsa: ts.TimestampClient,
    source: LongTermSource,
    now: dt.datetime | None = None,
    renew: bool = False,
    max_depth: int = 64,
    clock: Clock = system_clock,
) -> ExtendResult:
    """``data`` with its outermost signatures raised to ``level`` (never lowered); with
    ``renew``, an ES-A gets one more archive timestamp."""
    target = TARGETS.get(level)
    if target is None:
        raise InvalidRequest(f"unknown level {level!r}; valid: AdES-B-T, AdES-B-LT, AdES-B-LTA")
    now = clock() if now is None else now
    tree = parse_untrusted(data, max_depth=max_depth)
    root = tree.getroot()
    sigs = [root] if root.tag == _DS + "Signature" else list(root.iter(_DS + "Signature"))
    if not sigs:
        raise InvalidRequest("the document has no XML signature to extend")
    sample = profile_for_document(root) is not None
    plan: list[tuple[etree._Element, str, x509.Certificate | None]] = []
    for sig in sigs:
        if _covered_elsewhere(sig, sigs):
            continue
        before = _form(sig)
        if _ORDER.index(before) > _ORDER.index(target) or (before == target and not renew):
            plan.append((sig, before, None))
        else:  # every signature checked before the first timestamp is asked for
            plan.append((sig, before, _extendable(sig, target)))
    changes = []
    for sig, before, signer in plan:
        if signer is None:
            changes.append((sig.get("Id") or "", before, before))
            continue
        after = await _extend_one(
            sig,
            target,
            signer=signer,
            tsa=tsa,
            source=source,
            now=now,
            sample=sample,
            renew=renew,
        )
        changes.append((sig.get("Id") or "", before, after))
    out: bytes = etree.tostring(tree, xml_declaration=True, encoding="UTF-8")
    return ExtendResult(out, changes)


async def extend_document(
    data: bytes,
    level: str,
    *,
    tsa: ts.TimestampClient,
    source: LongTermSource,
    now: dt.datetime | None = None,
    renew: bool = False,
    max_depth: int = 64,
    clock: Clock = system_clock,
) -> ExtendResult:
    """Any signed document: XAdES (:func:`extend_xml`), CAdES or PAdES
    (:mod:`gateway.sign.extend_binary`)."""
    from gateway.sign import extend_binary
    from gateway.verify import detect_format

    target = TARGETS.get(level)
    if target is None:
        raise InvalidRequest(f"unknown level {level!r}; valid: AdES-B-T, AdES-B-LT, AdES-B-LTA")
    now = clock() if now is None else now
    fmt = detect_format(data)
    if fmt == "XAdES":
        return await extend_xml(
            data, level, tsa=tsa, source=source, now=now, renew=renew, max_depth=max_depth
        )
    from pyhanko.pdf_utils.misc import PdfError

    extend = extend_binary.extend_pdf if fmt == "PAdES" else extend_binary.extend_cms
    try:
        out, changes = await extend(data, target, tsa=tsa, source=source, now=now, renew=renew)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError, PdfError) as e:
        # What asn1crypto and pyHanko raise on a document they cannot read (as signDoc's
        # MALFORMED in gateway/signing/core.py, plus pyHanko's PdfReadError).
        raise InvalidRequest(f"the {fmt} signature cannot be read: {e}") from e
    return ExtendResult(out, changes)


def needs_renewal(data: bytes, *, within: dt.timedelta, now: dt.datetime) -> bool:
    """Whether the last archive timestamp's TSA certificate expires within ``within``
    (an ES-A must get a new one before then); False for documents without ES-A."""
    tree = parse_untrusted(data, max_depth=256)
    last = None
    for el in tree.getroot().iter(_XA141 + "ArchiveTimeStamp"):
        last = el
    if last is None:
        return False
    enc = last.find(_XA + "EncapsulatedTimeStamp")
    token = ts.parse_token(
        base64.b64decode("".join((enc.text or "").split()) if enc is not None else "")
    )
    signer = ts._find_signer_cert(token.signed_data["signer_infos"][0], token.certificates)
    if signer is None:
        return True
    return signer.not_valid_after_utc - now < within
