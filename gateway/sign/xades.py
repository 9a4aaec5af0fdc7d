"""XAdES baseline signatures (ETSI EN 319 132-1) B-B and B-T, built with lxml.

The same builder makes the e-prescription signature (``gateway.sign.eprescription``) and the
generic signDoc envelopes (enveloped, enveloping, detached). Exclusive C14N, RSA-SHA256,
SHA-256 digests, XAdES 1.3.2 with SigningTime (JST) and SigningCertificateV2.

Why the B-T part is written here by hand: no Python library adds a XAdES SignatureTimeStamp
correctly (signxml 5 stops at B-B; xmlsec does not know XAdES). The time-stamp's message
imprint is the SHA-256 of the exclusive C14N of the ``ds:SignatureValue`` *element*
(EN 319 132-1 §5.3), and the C14N algorithm is stated inside the SignatureTimeStamp so a
verifier can recompute it.

Untrusted XML (documents to sign enveloped, documents to verify) goes through
:func:`parse_untrusted`, which refuses DTDs (entity bombs, external entities) before the
parser sees them and stops at a nesting limit while parsing.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from asn1crypto import tsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree

from gateway.errors import InvalidRequest
from gateway.hsm.api import DigestAlgorithm, KeyHandle
from gateway.sign import ids
from gateway.sign.timestamp import TimestampClient

if TYPE_CHECKING:
    from gateway.sign.xades_ltv import LongTerm

__all__ = [
    "DS",
    "ENVELOPED",
    "EPRESCRIPTION_STYLE",
    "EXC_C14N",
    "GENERIC_STYLE",
    "JST",
    "XADES",
    "DataReference",
    "XadesBuilder",
    "XadesStyle",
    "c14n",
    "parse_untrusted",
    "unsigned_signature_properties",
]

DS = "http://www.w3.org/2000/09/xmldsig#"
XADES = "http://uri.etsi.org/01903/v1.3.2#"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
C14N10 = "http://www.w3.org/TR/2001/REC-xml-c14n-20010315"
RSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"
ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
SIGNED_PROPERTIES_TYPE = "http://uri.etsi.org/01903#SignedProperties"
BASE64_ENCODING = "http://www.w3.org/2000/09/xmldsig#base64"
JST = dt.timezone(dt.timedelta(hours=9), "JST")

_DS = "{%s}" % DS  # noqa: UP031 - lxml Clark notation
_XA = "{%s}" % XADES  # noqa: UP031


def c14n(node: etree._Element | etree._ElementTree, *, exclusive: bool = True) -> bytes:
    """(Exclusive) C14N 1.0 without comments, as the signature algorithms here require."""
    out: bytes = etree.tostring(node, method="c14n", exclusive=exclusive, with_comments=False)
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- untrusted XML ---------------------------------------------------------------------------


#: Untrusted XML limits beyond depth. Canonicalisation and signing cost grows with attributes
#: per element and with namespace declarations in scope (each is copied to every element that
#: c14n renders), far faster than with the document's size: 200,000 attributes on one element
#: (2.3 MB) took 83 s to sign. Real prescriptions have a handful of each.
MAX_XML_ATTRIBUTES = 256
MAX_XML_NAMESPACES = 64  # declared on one element
MAX_XML_NODES = 200_000


def parse_untrusted(
    data: bytes,
    *,
    max_depth: int,
    what: str = "document",
    max_attributes: int = MAX_XML_ATTRIBUTES,
    max_namespaces: int = MAX_XML_NAMESPACES,
    max_nodes: int = MAX_XML_NODES,
) -> etree._ElementTree:
    """Parse XML from a client: no DTD, no entities, no network, bounded depth, attributes and
    namespace declarations per element, and elements (each an InvalidRequest, 400).

    A DOCTYPE is refused by a byte scan before parsing (the entity-expansion and external
    entity attacks all need one) and again from the parsed tree's docinfo (the byte scan cannot
    see it in UTF-16/UTF-32); depth is checked while parsing, so a deeply nested document stops
    at ``max_depth`` instead of building the whole tree first.
    """
    head = data.lstrip()[:3]
    if head.startswith(b"\xef\xbb\xbf"):
        head = data.lstrip()[3:6]
    if not head.startswith(b"<"):
        raise InvalidRequest(f"{what} is not XML")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise InvalidRequest(f"{what}: XML with a DTD or entity declarations is refused")
    parser_kwargs = {
        "events": ("start", "end", "start-ns"),
        "resolve_entities": False,
        "no_network": True,
        "load_dtd": False,
        "huge_tree": False,
        "remove_blank_text": False,
    }
    depth = nodes = namespaces = 0
    try:
        context = etree.iterparse(io.BytesIO(data), **parser_kwargs)
        for event, el in context:
            if event == "start":
                depth += 1
                nodes += 1
                if depth > max_depth:
                    raise InvalidRequest(f"{what}: XML nested deeper than {max_depth} levels")
                if nodes > max_nodes:
                    raise InvalidRequest(f"{what}: XML with more than {max_nodes} elements")
                if len(el.attrib) > max_attributes:
                    raise InvalidRequest(
                        f"{what}: an XML element with more than {max_attributes} attributes"
                    )
                namespaces = 0  # start-ns events come just before their element's start
            elif event == "start-ns":
                namespaces += 1
                if namespaces > max_namespaces:
                    raise InvalidRequest(
                        f"{what}: an XML element with more than {max_namespaces} namespace "
                        "declarations"
                    )
            else:
                depth -= 1
        root = context.root
    except etree.XMLSyntaxError as e:
        raise InvalidRequest(f"{what} is not well-formed XML: {e.msg}") from e
    if root is None:
        raise InvalidRequest(f"{what} is not XML")
    tree: etree._ElementTree = root.getroottree()
    # The byte scan above misses encodings other than ASCII-compatible ones (UTF-16 without a
    # BOM, UTF-32): ask the parsed tree too. Entities were not resolved (resolve_entities=False),
    # so refusing here is in time.
    info = tree.docinfo
    doctype: str = getattr(info, "doctype", "")  # not in the lxml stubs ("" without one)
    dtds: list[object | None] = [info.internalDTD, info.externalDTD]
    if doctype or info.public_id or any(d is not None for d in dtds):
        raise InvalidRequest(f"{what}: XML with a DTD or entity declarations is refused")
    if any(True for _ in root.iter(etree.Entity)):
        raise InvalidRequest(f"{what}: XML with entity references is refused")
    return tree


# -- building ----------------------------------------------------------------------------------


@dataclass
class DataReference:
    """A ds:Reference to a signed data object, its digest computed by the caller."""

    uri: str
    digest: bytes
    ref_id: str | None = None
    transforms: Sequence[str] = (EXC_C14N,)
    mime_type: str | None = None  # DataObjectFormat (generic XAdES B-B); None: omitted


@dataclass(frozen=True)
class XadesStyle:
    """How a signature is written where formats differ in more than values.

    The generic signDoc envelopes keep the gateway's historical shape; the e-prescription
    style is the one of the national service's samples (HPKI.md §3): ``xs``/``xa`` prefixes,
    SigningTime in UTC, SigningCertificateV2 with CertDigest only, references in the order
    document, KeyInfo, SignedProperties, an Id on every ds/XAdES element, and a
    SignatureTimeStamp without CanonicalizationMethod (its imprint is then over the inclusive
    C14N 1.0 of the SignatureValue element, the XAdES default).
    """

    ds_prefix: str = "ds"
    xades_prefix: str = "xades"
    signing_time_utc: bool = False
    issuer_serial_v2: bool = True
    keyinfo_reference_first: bool = False
    sample_ids: bool = False
    timestamp_c14n: str | None = EXC_C14N


GENERIC_STYLE = XadesStyle()
EPRESCRIPTION_STYLE = XadesStyle(
    ds_prefix="xs",
    xades_prefix="xa",
    signing_time_utc=True,
    issuer_serial_v2=False,
    keyinfo_reference_first=True,
    sample_ids=True,
    timestamp_c14n=None,
)


_BARE_ID_KINDS = frozenset(
    {
        "SignatureTimeStamp",
        "ArchiveTimeStamp",
        "TimeStampValidationData",
        "CertificateValues",
        "RevocationValues",
    }
)


class _Ids:
    """Element Ids: the generic ``<kind>-id-<uid>`` or the samples' ``id<8 hex>-<Kind>``."""

    def __init__(self, uid: str, sample: bool) -> None:
        self.uid, self.sample = uid, sample

    def __call__(self, kind: str) -> str:
        if self.sample:
            # The samples name most Ids after their element, but not the timestamps' and
            # the validation data's.
            bare = kind in _BARE_ID_KINDS
            return f"id{ids.token_hex(4)}" + ("" if bare else f"-{kind}")
        return {
            "SignatureValue": f"value-id-{self.uid}",
            "KeyInfo": f"keyInfo-id-{self.uid}",
            "SignedProperties": f"xades-id-{self.uid}",
            "SignatureTimeStamp": f"ts-id-{self.uid}",
        }.get(kind, f"{kind}-{self.uid}")


@dataclass
class _CertInfo:
    cert_b64: str
    digest_b64: str
    issuer_serial_v2_b64: str


#: ds:Reference templates by (ds prefix, with an Id, Type, transforms): a handful of shapes.
_REFERENCE_TEMPLATES: dict[
    tuple[str | None, bool, str | None, tuple[str, ...]], etree._Element
] = {}


def _reference_template(
    prefix: str, with_id: bool, ref_type: str | None, transforms: tuple[str, ...]
) -> etree._Element:
    """A ds:Reference with its values empty, under a parent declaring ``prefix``; attributes
    in the order they are written (Id, Type, URI)."""
    parent = etree.Element(_DS + "SignedInfo", nsmap={prefix: DS})
    ref = etree.SubElement(parent, _DS + "Reference")
    if with_id:
        ref.set("Id", "")
    if ref_type:
        ref.set("Type", ref_type)
    ref.set("URI", "")
    if transforms:
        tr = etree.SubElement(ref, _DS + "Transforms")
        for t in transforms:
            etree.SubElement(tr, _DS + "Transform").set("Algorithm", t)
    etree.SubElement(ref, _DS + "DigestMethod").set("Algorithm", SHA256)
    etree.SubElement(ref, _DS + "DigestValue")
    return ref


@dataclass
class XadesBuilder:
    """Signs with a KeyHandle; holds the certificate-derived values, computed once."""

    certificate: x509.Certificate
    chain: Sequence[x509.Certificate] = ()
    include_chain: bool = False
    _cert: _CertInfo = field(init=False)
    _templates: dict[XadesStyle, etree._Element] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        a_cert = asn1_x509.Certificate.load(der)
        issuer_serial = tsp.IssuerSerial(
            {
                "issuer": [asn1_x509.GeneralName(name="directory_name", value=a_cert.issuer)],
                "serial_number": a_cert.serial_number,
            }
        )
        self._cert = _CertInfo(
            cert_b64=_b64(der),
            digest_b64=_b64(hashlib.sha256(der).digest()),
            issuer_serial_v2_b64=_b64(issuer_serial.dump()),
        )

    def skeleton(
        self,
        *,
        signature_id: str,
        uid: str,
        signing_time: dt.datetime,
        data_refs: Sequence[DataReference],
        style: XadesStyle = GENERIC_STYLE,
    ) -> etree._Element:
        """ds:Signature with SignedInfo still empty of references and no SignatureValue.

        A copy of this builder's template for ``style`` with this signature's Ids, signing
        time and data object formats: lxml copies a tree several times faster than it
        builds one element by element, and the rest (the certificate, its digest, the
        algorithms) is the same in every signature of the builder.
        """
        template = self._templates.get(style)
        if template is None:
            template = self._templates[style] = self._template(style)
        sig = copy.copy(template)  # lxml copies an element with its subtree (no memo)
        ids = _Ids(uid, style.sample_ids)
        sig.set("Id", signature_id)
        si, sv, ki, obj = sig[0], sig[1], sig[2], sig[3]
        if style.sample_ids:
            si.set("Id", ids("SignedInfo"))
        sv.set("Id", ids("SignatureValue"))
        ki.set("Id", ids("KeyInfo"))
        qp = obj[0]
        if style.sample_ids:
            qp.set("Id", ids("QualifyingProperties"))
        qp.set("Target", f"#{signature_id}")
        sp = qp[0]
        sp.set("Id", ids("SignedProperties"))
        sp[0][0].text = (  # SignedSignatureProperties/SigningTime
            signing_time.astimezone(dt.UTC if style.signing_time_utc else JST)
            .replace(microsecond=0)
            .isoformat()
        )
        formats = [r for r in data_refs if r.mime_type and r.ref_id]
        if formats:
            sdop = etree.SubElement(sp, _XA + "SignedDataObjectProperties")
            for r in formats:
                dof = etree.SubElement(sdop, _XA + "DataObjectFormat")
                dof.set("ObjectReference", f"#{r.ref_id}")
                etree.SubElement(dof, _XA + "MimeType").text = r.mime_type
        return sig

    def _template(self, style: XadesStyle) -> etree._Element:
        """The skeleton without its per-signature values: each attribute that
        :meth:`skeleton` fills in is already there, empty, so that attributes keep the
        order in which they are written."""
        sig = etree.Element(_DS + "Signature", nsmap={style.ds_prefix: DS})
        sig.set("Id", "")
        si = etree.SubElement(sig, _DS + "SignedInfo")
        if style.sample_ids:
            si.set("Id", "")
        etree.SubElement(si, _DS + "CanonicalizationMethod").set("Algorithm", EXC_C14N)
        etree.SubElement(si, _DS + "SignatureMethod").set("Algorithm", RSA_SHA256)
        etree.SubElement(sig, _DS + "SignatureValue").set("Id", "")
        ki = etree.SubElement(sig, _DS + "KeyInfo")
        ki.set("Id", "")
        x509data = etree.SubElement(ki, _DS + "X509Data")
        etree.SubElement(x509data, _DS + "X509Certificate").text = self._cert.cert_b64
        if self.include_chain:
            for c in self.chain:
                etree.SubElement(x509data, _DS + "X509Certificate").text = _b64(
                    c.public_bytes(serialization.Encoding.DER)
                )
        if style.sample_ids:
            obj = etree.SubElement(sig, _DS + "Object", nsmap={style.xades_prefix: XADES})
            qp = etree.SubElement(obj, _XA + "QualifyingProperties")
            qp.set("Id", "")
        else:
            obj = etree.SubElement(sig, _DS + "Object")
            qp = etree.SubElement(obj, _XA + "QualifyingProperties", nsmap={"xades": XADES})
        qp.set("Target", "")
        sp = etree.SubElement(qp, _XA + "SignedProperties")
        sp.set("Id", "")
        ssp = etree.SubElement(sp, _XA + "SignedSignatureProperties")
        etree.SubElement(ssp, _XA + "SigningTime")
        scv2 = etree.SubElement(ssp, _XA + "SigningCertificateV2")
        cert = etree.SubElement(scv2, _XA + "Cert")
        cd = etree.SubElement(cert, _XA + "CertDigest")
        etree.SubElement(cd, _DS + "DigestMethod").set("Algorithm", SHA256)
        etree.SubElement(cd, _DS + "DigestValue").text = self._cert.digest_b64
        if style.issuer_serial_v2:
            etree.SubElement(cert, _XA + "IssuerSerialV2").text = self._cert.issuer_serial_v2_b64
        return sig

    @staticmethod
    def _add_reference(
        si: etree._Element,
        *,
        uri: str,
        digest: bytes,
        ref_id: str | None = None,
        ref_type: str | None = None,
        transforms: Sequence[str] = (EXC_C14N,),
    ) -> None:
        """A ds:Reference appended to ``si``: a copy of a template of its shape (Id or not,
        Type, transforms) with its Id, URI and digest (see :meth:`skeleton`)."""
        assert si.prefix is not None  # the gateway's signatures declare their ds prefix
        shape = (si.prefix, ref_id is not None, ref_type, tuple(transforms))
        template = _REFERENCE_TEMPLATES.get(shape)
        if template is None:
            template = _REFERENCE_TEMPLATES[shape] = _reference_template(*shape)
        ref = copy.copy(template)
        if ref_id:
            ref.set("Id", ref_id)
        ref.set("URI", uri)
        ref[-1].text = _b64(digest)  # DigestValue
        si.append(ref)

    async def complete(
        self,
        sig: etree._Element,
        key: KeyHandle,
        *,
        uid: str,
        data_refs: Sequence[DataReference],
        tsa: TimestampClient | None,
        style: XadesStyle = GENERIC_STYLE,
    ) -> bytes | None:
        """Add the references, sign SignedInfo, then (B-T) add the SignatureTimeStamp; the
        timestamp token (None without ``tsa``).

        ``sig`` must already sit where it will stay in its document: nothing about the
        signed bytes changes afterwards. The data references come first, then the
        SignedProperties and the KeyInfo (or KeyInfo then SignedProperties: ``style``).
        """
        si = sig.find(_DS + "SignedInfo")
        sv = sig.find(_DS + "SignatureValue")
        ki = sig.find(_DS + "KeyInfo")
        sp = sig.find(f"{_DS}Object/{_XA}QualifyingProperties/{_XA}SignedProperties")
        assert si is not None and sv is not None and ki is not None and sp is not None
        for r in data_refs:
            self._add_reference(
                si, uri=r.uri, digest=r.digest, ref_id=r.ref_id, transforms=r.transforms
            )
        n = len(data_refs)
        sp_ref = {
            "uri": f"#{sp.get('Id')}",
            "ref_type": SIGNED_PROPERTIES_TYPE,
            "digest": hashlib.sha256(c14n(sp)).digest(),
        }
        ki_ref = {"uri": f"#{ki.get('Id')}", "digest": hashlib.sha256(c14n(ki)).digest()}
        if style.keyinfo_reference_first:
            ki_ref["ref_id"] = f"id{ids.token_hex(4)}-Reference{n + 1}-KeyInfo"
            sp_ref["ref_id"] = f"id{ids.token_hex(4)}-Reference{n + 2}-SignedProperties"
            ordered = [ki_ref, sp_ref]
        else:
            ordered = [sp_ref, ki_ref]
        for ref in ordered:
            self._add_reference(si, **ref)  # type: ignore[arg-type]
        signature = await key.sign_digest(hashlib.sha256(c14n(si)).digest(), DigestAlgorithm.SHA256)
        sv.text = _b64(signature)
        if tsa is not None:
            exclusive = style.timestamp_c14n == EXC_C14N
            token = await tsa.timestamp(
                hashlib.sha256(c14n(sv, exclusive=exclusive)).digest(), DigestAlgorithm.SHA256
            )
            usp = unsigned_signature_properties(sig)
            sts = etree.SubElement(usp, _XA + "SignatureTimeStamp")
            sts.set("Id", _Ids(uid, style.sample_ids)("SignatureTimeStamp"))
            if style.timestamp_c14n is not None:
                etree.SubElement(sts, _DS + "CanonicalizationMethod").set(
                    "Algorithm", style.timestamp_c14n
                )
            etree.SubElement(sts, _XA + "EncapsulatedTimeStamp").text = _b64(token)
            return token
        return None

    # -- the three signDoc envelopes -------------------------------------------------------

    async def sign(
        self,
        key: KeyHandle,
        *,
        document: bytes,
        envelope: str,
        signing_time: dt.datetime,
        tsa: TimestampClient | None,
        max_depth: int = 64,
        long_term: LongTerm | None = None,
    ) -> bytes:
        """XAdES over ``document``; ``envelope``: Enveloped, Enveloping or Detached."""
        uid = ids.token_hex(8)
        sig_id = f"Signature-{uid}"
        ref_id = f"id-ref-{uid}"
        if envelope == "Enveloped":
            tree = parse_untrusted(document, max_depth=max_depth)
            # URI="" with the enveloped-signature transform: the digest of the document as it
            # is before the signature goes in equals the digest with the signature removed.
            digest = hashlib.sha256(c14n(tree)).digest()
            refs = [
                DataReference(
                    uri="",
                    digest=digest,
                    ref_id=ref_id,
                    transforms=(ENVELOPED, EXC_C14N),
                    mime_type="text/xml",
                )
            ]
            sig = self.skeleton(
                signature_id=sig_id, uid=uid, signing_time=signing_time, data_refs=refs
            )
            tree.getroot().append(sig)
            token = await self.complete(sig, key, uid=uid, data_refs=refs, tsa=tsa)
            await _long_term(sig, token, long_term, tsa, uid, signing_time, None)
            return _serialize(tree)
        if envelope == "Enveloping":
            obj_id = f"object-{uid}"
            obj = etree.Element(_DS + "Object", nsmap={"ds": DS})
            obj.set("Id", obj_id)
            is_xml = document.lstrip().startswith(b"<")
            if is_xml:
                obj.append(parse_untrusted(document, max_depth=max_depth).getroot())
            else:
                obj.set("Encoding", BASE64_ENCODING)
                obj.set("MimeType", "application/octet-stream")
                obj.text = _b64(document)
            refs = [
                DataReference(
                    uri=f"#{obj_id}",
                    digest=b"",
                    ref_id=ref_id,
                    mime_type="text/xml" if is_xml else "application/octet-stream",
                )
            ]
            sig = self.skeleton(
                signature_id=sig_id, uid=uid, signing_time=signing_time, data_refs=refs
            )
            sig.append(obj)
            refs[0].digest = hashlib.sha256(c14n(obj)).digest()
            token = await self.complete(sig, key, uid=uid, data_refs=refs, tsa=tsa)
            await _long_term(sig, token, long_term, tsa, uid, signing_time, None)
            return _serialize(sig.getroottree())
        if envelope == "Detached":
            refs = [
                DataReference(
                    uri=DETACHED_URI,
                    digest=hashlib.sha256(document).digest(),
                    ref_id=ref_id,
                    transforms=(),
                    mime_type="application/octet-stream",
                )
            ]
            sig = self.skeleton(
                signature_id=sig_id, uid=uid, signing_time=signing_time, data_refs=refs
            )
            token = await self.complete(sig, key, uid=uid, data_refs=refs, tsa=tsa)
            await _long_term(sig, token, long_term, tsa, uid, signing_time, document)
            return _serialize(sig.getroottree())
        raise InvalidRequest(
            f"unknown XAdES signed_envelope_property {envelope!r}; "
            "valid: Enveloped, Enveloping, Detached"
        )


#: The URI of the one external data object of a detached XAdES signature; a verifier is
#: given the content separately (``verify --content``).
DETACHED_URI = "urn:hpki-gateway:detached-document"


async def _long_term(
    sig: etree._Element,
    token: bytes | None,
    long_term: LongTerm | None,
    tsa: TimestampClient | None,
    uid: str,
    now: dt.datetime,
    content: bytes | None,
) -> None:
    if long_term is None:
        return
    from gateway.sign.xades_ltv import finish_long_term

    assert tsa is not None
    await finish_long_term(
        sig, token, long_term, tsa=tsa, sample=False, uid=uid, now=now, content=content
    )


def unsigned_signature_properties(sig: etree._Element) -> etree._Element:
    """The signature's xades:UnsignedSignatureProperties, created when missing."""
    qp = sig.find(f"{_DS}Object/{_XA}QualifyingProperties")
    if qp is None:
        raise ValueError("the signature has no xades:QualifyingProperties")
    up = qp.find(_XA + "UnsignedProperties")
    if up is None:
        up = etree.SubElement(qp, _XA + "UnsignedProperties")
    usp = up.find(_XA + "UnsignedSignatureProperties")
    if usp is None:
        usp = etree.SubElement(up, _XA + "UnsignedSignatureProperties")
    return usp


def _serialize(tree: etree._ElementTree) -> bytes:
    out: bytes = etree.tostring(tree, xml_declaration=True, encoding="UTF-8")
    return out
