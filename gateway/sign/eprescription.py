"""The e-prescription profile: a prescription CSV in, the signed e-prescription XML out.

Structure (HPKI.md §3)::

    <Document id="Document" xsi:noNamespaceSchemaLocation="EP.xsd">
     <Prescription>
      <PrescriptionManagement id="PrescriptionManagement"><Version Value="EPS1.0"/></...>
      <PrescriptionDocument id="PrescriptionDocument">BASE64(CSV bytes)</PrescriptionDocument>
      <PrescriptionSign><ds:Signature Id="PrescriptionSign">...</ds:Signature></PrescriptionSign>

The CSV bytes are embedded exactly as sent (Base64), after checking that they decode in the
declared encoding. The dispensing result (``jp-dispensing``) has the same shape with element
names from the settings, signed by a pharmacist. Which hcRole may sign which document type is
configuration (:class:`RolePolicy`).
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import io
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from lxml import etree

from gateway.errors import InvalidRequest, PkiError, RoleNotPermitted
from gateway.hsm.api import KeyHandle
from gateway.pki import hpki
from gateway.sign.timestamp import TimestampClient
from gateway.sign.xades import DataReference, XadesBuilder, c14n

__all__ = [
    "DISPENSING",
    "PRESCRIPTION",
    "PROFILES",
    "EPrescriptionProfile",
    "RolePolicy",
    "build_document",
    "decode_csv",
    "profile_for_root",
    "sign_eprescription",
]

XSI = "http://www.w3.org/2001/XMLSchema-instance"
ENCODINGS = {
    "utf-8": "utf-8",
    "utf8": "utf-8",
    "shift_jis": "cp932",
    "sjis": "cp932",
    "cp932": "cp932",
    "shift-jis": "cp932",
}


@dataclass(frozen=True, kw_only=True)
class EPrescriptionProfile:
    """Element names and document type of one profile (the dispensing names are a parameter)."""

    name: str
    document_type: str
    root: str = "Document"
    container: str = "Prescription"
    management: str = "PrescriptionManagement"
    version_value: str = "EPS1.0"
    document: str = "PrescriptionDocument"
    sign: str = "PrescriptionSign"
    schema_location: str = "EP.xsd"


PRESCRIPTION = EPrescriptionProfile(name="jp-eprescription", document_type="prescription")
DISPENSING = EPrescriptionProfile(
    name="jp-dispensing",
    document_type="dispensing",
    container="Dispensing",
    management="DispensingManagement",
    version_value="EDS1.0",
    document="DispensingDocument",
    sign="DispensingSign",
    schema_location="ED.xsd",
)
PROFILES = {p.name: p for p in (PRESCRIPTION, DISPENSING)}


def profile_for_root(
    container_name: str, profiles: Sequence[EPrescriptionProfile]
) -> EPrescriptionProfile | None:
    for p in profiles:
        if p.container == container_name:
            return p
    return None


@dataclass(frozen=True)
class RolePolicy:
    """hcRole texts allowed per document type (settings ``signing.role_document_types``)."""

    allowed: Mapping[str, Sequence[str]]

    def check(self, cert: x509.Certificate, document_type: str) -> str:
        """The signer's role when it may sign ``document_type``; RoleNotPermitted otherwise."""
        try:
            roles = hpki.parse_hcroles(cert)
        except PkiError as e:
            raise RoleNotPermitted(f"the signer certificate's hcRole is unreadable: {e}") from e
        allowed = list(self.allowed.get(document_type, ()))
        for role in roles:
            if role in allowed:
                return role
        shown = ", ".join(roles) or "none"
        raise RoleNotPermitted(
            f"hcRole {shown} may not sign a {document_type} document "
            f"(allowed: {', '.join(allowed) or 'nobody'})"
        )

    def permits(self, roles: Sequence[str], document_type: str) -> bool:
        allowed = set(self.allowed.get(document_type, ()))
        return any(r in allowed for r in roles)


def decode_csv(data: bytes, encoding: str = "utf-8") -> list[list[str]]:
    """Check the CSV decodes in the declared encoding and parses; the rows (for display).

    The bytes embedded in the XML stay exactly as sent; this only refuses what is not what
    its sender says it is.
    """
    codec = ENCODINGS.get(encoding.lower())
    if codec is None:
        raise InvalidRequest(f"unknown CSV encoding {encoding!r}; valid: utf-8, shift_jis")
    if not data.strip():
        raise InvalidRequest("the prescription CSV is empty")
    if b"\x00" in data:
        raise InvalidRequest("the prescription CSV contains NUL bytes: not a text file")
    body = data[3:] if codec == "utf-8" and data.startswith(b"\xef\xbb\xbf") else data
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as e:
        raise InvalidRequest(
            f"the prescription CSV is not valid {encoding} (byte {e.start}: "
            f"{body[e.start : e.start + 4].hex()})"
        ) from e
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise InvalidRequest(f"the prescription CSV does not parse: {e}") from e
    return rows


def build_document(
    csv_bytes: bytes, profile: EPrescriptionProfile = PRESCRIPTION
) -> etree._ElementTree:
    """The unsigned e-prescription document tree (the Sign element is still empty)."""
    p = profile
    root = etree.Element(p.root, nsmap={"xsi": XSI})
    root.set("id", p.root)
    root.set(f"{{{XSI}}}noNamespaceSchemaLocation", p.schema_location)
    container = etree.SubElement(root, p.container)
    mgmt = etree.SubElement(container, p.management)
    mgmt.set("id", p.management)
    etree.SubElement(mgmt, "Version").set("Value", p.version_value)
    doc = etree.SubElement(container, p.document)
    doc.set("id", p.document)
    doc.text = base64.b64encode(csv_bytes).decode("ascii")
    etree.SubElement(container, p.sign)
    return root.getroottree()


async def sign_eprescription(
    *,
    key: KeyHandle,
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
    csv_bytes: bytes,
    profile: EPrescriptionProfile = PRESCRIPTION,
    roles: RolePolicy,
    signing_time: dt.datetime,
    tsa: TimestampClient | None = None,
    encoding: str = "utf-8",
    builder: XadesBuilder | None = None,
) -> bytes:
    """The signed e-prescription (or dispensing result) XML; refuses a role that may not sign.

    The role is checked before the key is touched, so a refused signer signs nothing.
    """
    roles.check(certificate, profile.document_type)
    decode_csv(csv_bytes, encoding)
    tree = build_document(csv_bytes, profile)
    root = tree.getroot()
    container = root.find(profile.container)
    assert container is not None
    doc_el = container.find(profile.document)
    sign_el = container.find(profile.sign)
    assert doc_el is not None and sign_el is not None
    uid = secrets.token_hex(8)
    refs = [
        DataReference(
            uri=f"#{profile.document}",
            ref_id=f"id-ref-{profile.document}",
            digest=hashlib.sha256(c14n(doc_el)).digest(),
        )
    ]
    xb = builder or XadesBuilder(certificate=certificate, chain=chain)
    sig = xb.skeleton(signature_id=profile.sign, uid=uid, signing_time=signing_time, data_refs=refs)
    sign_el.append(sig)
    await xb.complete(sig, key, uid=uid, data_refs=refs, tsa=tsa)
    out: bytes = etree.tostring(tree, xml_declaration=True, encoding="UTF-8")
    return out
