"""The HPKI signing-certificate profile: read it from real certificates, check it, build it.

The profile is the one decoded from a real MEDIS certificate (design/HPKI.md §2): the role sits
in an ISO 17090 ``hcRole`` attribute inside ``subjectDirectoryAttributes``, the signing policy
is a critical ``certificatePolicies`` OID under the HPKI signing CP, and ``keyUsage`` is critical
with ``nonRepudiation`` only. The gateway must accept exactly such certificates for signing
and must produce exactly such certificates in its test world, so parser and builder share the
ASN.1 definitions below.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from asn1crypto import core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtensionOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from gateway.errors import PkiError

__all__ = [
    "HCROLE_ATTRIBUTE_OID",
    "HCROLE_CODING_SCHEME_OID",
    "HPKI_AUTH_CP_PREFIX",
    "HPKI_SIGNING_CP_PREFIX",
    "HPKI_SIGNING_EE_POLICY",
    "MIN_RSA_BITS",
    "SIGNING_CA_POLICY",
    "SUBJECT_DIRECTORY_ATTRIBUTES_OID",
    "Attribute",
    "AttributeValues",
    "CodedData",
    "HCActor",
    "HCActorData",
    "HpkiCertificateInfo",
    "SubjectDirectoryAttributes",
    "build_hcrole_extension_value",
    "check_signing_profile",
    "default_trust",
    "inspect_certificate",
    "load_bundled_anchors",
    "parse_hcroles",
    "verify_chain",
]

HCROLE_ATTRIBUTE_OID = "1.0.17090.0.1"
HCROLE_CODING_SCHEME_OID = "1.2.392.100495.1.6.1.1"
HPKI_SIGNING_EE_POLICY = "1.2.392.100495.1.5.1.1.0.1"
HPKI_SIGNING_CP_PREFIX = "1.2.392.100495.1.5.1.1"
HPKI_AUTH_CP_PREFIX = "1.2.392.100495.1.5.1.2"
SIGNING_CA_POLICY = "1.2.392.100495.1.5.1.1.3.1"
SUBJECT_DIRECTORY_ATTRIBUTES_OID = x509.ObjectIdentifier("2.5.29.9")
MIN_RSA_BITS = 2048

# --------------------------------------------------------------------------------------------
# ISO 17090 hcRole, as asn1crypto classes.
#
# Checked against the real DER in HPKI.md §2. One deviation from the usual textbook rendering:
# the attribute value is a SET (tag 0x31), i.e. ``HCActorData ::= SET OF HCActor`` as in
# ISO 17090-3, not a SEQUENCE OF; reading it as a SEQUENCE OF would reject every real
# certificate.
# --------------------------------------------------------------------------------------------


class CodedData(core.Set):  # type: ignore[misc]  # asn1crypto is untyped
    """``CodedData ::= SET { codingSchemeReference [0], codeDataValue [1],
    codeDataFreeText [2] }`` (all EXPLICIT)."""

    _fields = [  # noqa: RUF012 - asn1crypto's class-level spec
        ("coding_scheme_reference", core.ObjectIdentifier, {"explicit": 0}),
        ("code_data_value", core.UTF8String, {"explicit": 1, "optional": True}),
        ("code_data_free_text", asn1_x509.DirectoryString, {"explicit": 2, "optional": True}),
    ]

    def _set_contents(self, force: bool = False) -> None:
        # asn1crypto 1.5's Set encoder sorts children by tag and crashes on absent optional
        # fields (their tag is None). The fields above are declared in ascending tag order,
        # which is the DER order for a SET, so the plain SEQUENCE encoder is correct here.
        core.Sequence._set_contents(self, force)


class HCActor(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped
    """``HCActor ::= SEQUENCE { codedData [0] EXPLICIT CodedData OPTIONAL }``."""

    _fields = [  # noqa: RUF012
        ("coded_data", CodedData, {"explicit": 0, "optional": True}),
    ]


class HCActorData(core.SetOf):  # type: ignore[misc]  # asn1crypto is untyped
    """The value of the hcRole attribute: ``SET OF HCActor`` (see the module note)."""

    _child_spec = HCActor


class AttributeValues(core.SetOf):  # type: ignore[misc]  # asn1crypto is untyped
    _child_spec = core.Any


class Attribute(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped
    """X.501 ``Attribute``; values stay opaque so that foreign attributes never break parsing."""

    _fields = [  # noqa: RUF012
        ("type", core.ObjectIdentifier),
        ("values", AttributeValues),
    ]


class SubjectDirectoryAttributes(core.SequenceOf):  # type: ignore[misc]  # asn1crypto is untyped
    """``SubjectDirectoryAttributes ::= SEQUENCE SIZE (1..MAX) OF Attribute`` (RFC 5280)."""

    _child_spec = Attribute


class _HCRoleValues(core.SetOf):  # type: ignore[misc]  # asn1crypto is untyped
    _child_spec = HCActorData


# Teach asn1crypto's own certificate classes (used by pyHanko and the CMS code) the hcRole
# attribute, the way pyHanko registers its OIDs (pyhanko/sign/ades/asn1_util.py). Without a
# spec asn1crypto reads the value as a bare SET with no fields, which it cannot re-encode:
# `dump(force=True)` of any HPKI certificate then raises "does not match any of the field
# definitions". asn1crypto 1.5 also forces that re-encoding by itself on a plain `dump()` of
# any parsed value whose DER length ends in the byte 0x80 (it takes it for a BER indefinite
# length), so a CMS or certificate that happens to be 0x..80 bytes long could not be written.
asn1_x509.SubjectDirectoryAttributeId._map.setdefault(HCROLE_ATTRIBUTE_OID, "hc_role")
asn1_x509.SubjectDirectoryAttribute._oid_specs.setdefault("hc_role", _HCRoleValues)


def build_hcrole_extension_value(role: str) -> bytes:
    """DER of a ``subjectDirectoryAttributes`` value carrying one hcRole, as MEDIS encodes it.

    The role travels as ``codeDataFreeText`` (UTF8String) under the HPKI coding scheme with no
    ``codeDataValue``: that is what the real certificates do, and relying parties match on it.
    """
    if not role:
        raise PkiError("an hcRole must not be empty")
    coded = CodedData(
        {
            "coding_scheme_reference": HCROLE_CODING_SCHEME_OID,
            "code_data_free_text": asn1_x509.DirectoryString(name="utf8_string", value=role),
        }
    )
    actor_data = HCActorData([HCActor({"coded_data": coded})])
    attribute = Attribute(
        {
            "type": HCROLE_ATTRIBUTE_OID,
            "values": AttributeValues([core.Any.load(actor_data.dump())]),
        }
    )
    der: bytes = SubjectDirectoryAttributes([attribute]).dump()
    return der


def _hcroles_from_extension_value(der: bytes) -> list[str]:
    return list(_hcroles_of(der))


@functools.lru_cache(maxsize=1024)
def _hcroles_of(der: bytes) -> tuple[str, ...]:
    """Memoized: every document a signer signs checks the same certificate's roles, and the
    asn1crypto parse costs more than the rest of the check (a malformed value raises anew)."""
    roles: list[str] = []
    try:
        attributes = SubjectDirectoryAttributes.load(der, strict=True)
        for attribute in attributes:
            if attribute["type"].dotted != HCROLE_ATTRIBUTE_OID:
                continue
            for value in attribute["values"]:
                actors = HCActorData.load(value.dump(), strict=True)
                for actor in actors:
                    coded = actor["coded_data"]
                    if isinstance(coded, core.Void):
                        continue
                    if coded["coding_scheme_reference"].dotted != HCROLE_CODING_SCHEME_OID:
                        continue
                    text = coded["code_data_free_text"]
                    if isinstance(text, core.Void):
                        raise PkiError(
                            "hcRole under the HPKI coding scheme has no codeDataFreeText"
                        )
                    roles.append(str(text.native))
    except PkiError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise PkiError(f"malformed subjectDirectoryAttributes / hcRole DER: {e}") from e
    return tuple(roles)


def parse_hcroles(cert: x509.Certificate) -> list[str]:
    """The hcRole texts of ``cert`` under the HPKI coding scheme; empty when it carries none.

    Attributes other than hcRole, and hcRoles under other coding schemes, are skipped rather
    than rejected: ISO 17090 lets an issuer add them and they do not concern HPKI signing.
    """
    try:
        ext = cert.extensions.get_extension_for_oid(SUBJECT_DIRECTORY_ATTRIBUTES_OID)
    except x509.ExtensionNotFound:
        return []
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover - future parsing
        raise PkiError("subjectDirectoryAttributes was parsed into an unexpected type")
    return _hcroles_from_extension_value(value.value)


# --------------------------------------------------------------------------------------------
# Inspection and the signing profile
# --------------------------------------------------------------------------------------------

_NAME_OVERRIDES = {NameOID.SERIAL_NUMBER: "serialNumber"}

_KEY_USAGE_NAMES = (
    ("digital_signature", "digitalSignature"),
    ("content_commitment", "nonRepudiation"),
    ("key_encipherment", "keyEncipherment"),
    ("data_encipherment", "dataEncipherment"),
    ("key_agreement", "keyAgreement"),
    ("key_cert_sign", "keyCertSign"),
    ("crl_sign", "cRLSign"),
)


def _name_str(name: x509.Name) -> str:
    # serialNumber spelled out: RFC 4514 only knows short names for a few attributes, and the
    # HPKI serialNumber (e.g. "Test117120") should read as such, not as 2.5.4.5.
    return name.rfc4514_string(_NAME_OVERRIDES)


def _general_name_str(gn: x509.GeneralName) -> str:
    if isinstance(gn, x509.DirectoryName):
        return f"DirName:{_name_str(gn.value)}"
    if isinstance(gn, x509.DNSName):
        return f"DNS:{gn.value}"
    if isinstance(gn, x509.IPAddress):
        return f"IP:{gn.value}"
    if isinstance(gn, x509.UniformResourceIdentifier):
        return f"URI:{gn.value}"
    if isinstance(gn, x509.RFC822Name):
        return f"email:{gn.value}"
    if isinstance(gn, x509.RegisteredID):
        return f"RID:{gn.value.dotted_string}"
    if isinstance(gn, x509.OtherName):
        return f"otherName:{gn.type_id.dotted_string}"
    return str(gn)  # pragma: no cover - exhaustive above


def _key_usage_names(ku: x509.KeyUsage) -> list[str]:
    names = [label for attr, label in _KEY_USAGE_NAMES if getattr(ku, attr)]
    if ku.key_agreement:
        if ku.encipher_only:
            names.append("encipherOnly")
        if ku.decipher_only:
            names.append("decipherOnly")
    return names


def _ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension[Any] | None:
    try:
        return cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None


def _crl_urls(cert: x509.Certificate) -> list[str]:
    ext = _ext(cert, ExtensionOID.CRL_DISTRIBUTION_POINTS)
    if ext is None:
        return []
    urls: list[str] = []
    for dp in ext.value:
        for gn in dp.full_name or ():
            if isinstance(gn, x509.UniformResourceIdentifier):
                urls.append(gn.value)
    return urls


def check_signing_profile(cert: x509.Certificate) -> list[str]:
    """Why ``cert`` is not an HPKI signing certificate; empty when it conforms.

    A list rather than an exception: the registry shows every deviation at once when an
    operator imports a certificate, and callers decide which of them are fatal.
    """
    problems: list[str] = []

    try:
        roles = parse_hcroles(cert)
    except PkiError as e:
        problems.append(e.description)
    else:
        if not roles:
            problems.append("no hcRole (subjectDirectoryAttributes 1.0.17090.0.1) present")
        elif len(roles) > 1:
            problems.append(f"exactly one hcRole expected, found {len(roles)}: {roles}")

    cp = _ext(cert, ExtensionOID.CERTIFICATE_POLICIES)
    if cp is None:
        problems.append("certificatePolicies missing")
    else:
        if not cp.critical:
            problems.append("certificatePolicies must be critical")
        oids = [p.policy_identifier.dotted_string for p in cp.value]
        if not any(_under(oid, HPKI_SIGNING_CP_PREFIX) for oid in oids):
            problems.append(
                f"no policy under the HPKI signing CP {HPKI_SIGNING_CP_PREFIX} (found {oids})"
            )

    ku = _ext(cert, ExtensionOID.KEY_USAGE)
    if ku is None:
        problems.append("keyUsage missing")
    else:
        if not ku.critical:
            problems.append("keyUsage must be critical")
        names = _key_usage_names(ku.value)
        if names != ["nonRepudiation"]:
            problems.append(f"keyUsage must be nonRepudiation only, found {names}")

    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        problems.append(f"HPKI signing keys are RSA, found {type(key).__name__}")
    elif key.key_size < MIN_RSA_BITS:
        problems.append(f"RSA key of {key.key_size} bits, at least {MIN_RSA_BITS} required")

    bc = _ext(cert, ExtensionOID.BASIC_CONSTRAINTS)
    if bc is not None and bc.value.ca:
        problems.append("a CA certificate cannot be a signing certificate")

    return problems


def _under(oid: str, prefix: str) -> bool:
    return oid == prefix or oid.startswith(prefix + ".")


@dataclass(frozen=True, kw_only=True)
class HpkiCertificateInfo:
    """What the gateway records and shows about a signer certificate."""

    subject: str
    issuer: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    hc_roles: list[str]
    policies: list[str]
    key_usage: list[str]
    subject_alt_names: list[str]
    crl_urls: list[str]
    profile_problems: list[str]

    @property
    def serial_hex(self) -> str:
        """Upper-case hex with an even number of digits, as ``openssl x509`` and CRLs show it."""
        digits = f"{self.serial:X}"
        return digits if len(digits) % 2 == 0 else "0" + digits

    @property
    def conforms_to_signing_profile(self) -> bool:
        return not self.profile_problems

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready; the serial is a decimal string since 128-bit serials overflow JS numbers."""
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": str(self.serial),
            "serial_hex": self.serial_hex,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "hc_roles": list(self.hc_roles),
            "policies": list(self.policies),
            "key_usage": list(self.key_usage),
            "subject_alt_names": list(self.subject_alt_names),
            "crl_urls": list(self.crl_urls),
            "profile_problems": list(self.profile_problems),
            "conforms_to_signing_profile": self.conforms_to_signing_profile,
        }


def inspect_certificate(cert: x509.Certificate) -> HpkiCertificateInfo:
    """Describe ``cert``; never raises for profile deviations, they land in profile_problems."""
    try:
        roles = parse_hcroles(cert)
    except PkiError:
        roles = []  # the reason is reported by check_signing_profile below
    cp = _ext(cert, ExtensionOID.CERTIFICATE_POLICIES)
    ku = _ext(cert, ExtensionOID.KEY_USAGE)
    san = _ext(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    return HpkiCertificateInfo(
        subject=_name_str(cert.subject),
        issuer=_name_str(cert.issuer),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        hc_roles=roles,
        policies=[p.policy_identifier.dotted_string for p in cp.value] if cp else [],
        key_usage=_key_usage_names(ku.value) if ku else [],
        subject_alt_names=[_general_name_str(gn) for gn in san.value] if san else [],
        crl_urls=_crl_urls(cert),
        profile_problems=check_signing_profile(cert),
    )


# --------------------------------------------------------------------------------------------
# Chain validation
# --------------------------------------------------------------------------------------------


def _extension_policies() -> tuple[ExtensionPolicy, ExtensionPolicy]:
    """Web-PKI CA rules, relaxed only where HPKI differs; the end entity is left to the profile.

    cryptography's verifier (x509.verification) is the web-PKI profile: by default it requires
    an EKU on the leaf and refuses any critical extension it does not know, and HPKI marks
    certificatePolicies critical on both the CAs and the end entity, while end entities carry
    no EKU. Rather than hand-walk the chain, keep the verifier (path building, signatures,
    validity, basicConstraints/keyUsage/pathLen on the CAs) and declare certificatePolicies as
    accounted for. The end-entity extensions are judged by :func:`check_signing_profile`,
    so the EE policy only has to let them through; unknown *critical* EE extensions are still
    refused.
    """
    cp = x509.CertificatePolicies
    ca_policy = ExtensionPolicy.webpki_defaults_ca().may_be_present(cp, Criticality.AGNOSTIC, None)
    ee_policy = ExtensionPolicy.permit_all().may_be_present(cp, Criticality.AGNOSTIC, None)
    return ca_policy, ee_policy


def verify_chain(
    cert: x509.Certificate,
    *,
    intermediates: list[x509.Certificate],
    trust_anchors: list[x509.Certificate],
    moment: dt.datetime,
) -> list[x509.Certificate]:
    """The validated path, leaf first and anchor last, at ``moment``; PkiError when there is none.

    Offline and without revocation: HPKI publishes CRLs only, on the public internet, and
    revocation is checked separately against fetched and cached CRLs.
    """
    if moment.tzinfo is None:
        raise PkiError("verify_chain needs a timezone-aware moment")
    if not trust_anchors:
        raise PkiError("no trust anchors configured")
    moment = moment.astimezone(dt.UTC)

    # A clear reason for the most common failure, before the verifier's generic message.
    if moment < cert.not_valid_before_utc:
        raise PkiError(
            f"certificate {_name_str(cert.subject)} is not valid before "
            f"{cert.not_valid_before_utc.isoformat()} (checked at {moment.isoformat()})"
        )
    if moment > cert.not_valid_after_utc:
        raise PkiError(
            f"certificate {_name_str(cert.subject)} expired at "
            f"{cert.not_valid_after_utc.isoformat()} (checked at {moment.isoformat()})"
        )

    ca_policy, ee_policy = _extension_policies()
    verifier = (
        PolicyBuilder()
        .store(Store(trust_anchors))
        .time(moment)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()  # the "client" flavour: no server name to match
    )
    try:
        result = verifier.verify(cert, intermediates)
    except VerificationError as e:
        raise PkiError(
            f"no valid path from {_name_str(cert.subject)} to a trust anchor: {e}"
        ) from e
    return list(result.chain)


# --------------------------------------------------------------------------------------------
# Bundled public CA certificates
# --------------------------------------------------------------------------------------------


def load_bundled_anchors() -> dict[str, x509.Certificate]:
    """The public HPKI/JPKI CA certificates shipped in ``gateway/pki/anchors``, by file stem.

    Not all of them are trust anchors: ``mhlw_hpki_root_ca_v2`` and ``jpki_sign_ca01..03`` are
    self-signed roots, ``medis_sign_ca`` / ``medis_auth_ca`` are intermediates bundled so that
    paths can be built without fetching (see anchors/README.md).
    """
    out: dict[str, x509.Certificate] = {}
    directory = resources.files("gateway.pki").joinpath("anchors")
    for entry in sorted(directory.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".pem"):
            out[entry.name.removesuffix(".pem")] = x509.load_pem_x509_certificate(
                entry.read_bytes()
            )
    return out


# Which bundled certificates a purpose trusts (file stems in gateway/pki/anchors). A signer's
# certificate is an HPKI signing certificate: only the MHLW root and the MEDIS signing CA may
# vouch for it. Verification also meets JPKI signatures and MEDIS authentication chains.
_DEFAULT_TRUST = {
    "signer": {"mhlw_hpki_root_ca_v2", "medis_sign_ca"},
    "verify": None,  # every bundled certificate
}


def default_trust(
    purpose: Literal["signer", "verify"],
) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """The secure default when no trust is configured: ``(anchors, intermediates)``.

    The bundled self-signed roots are the anchors, the bundled issuing CAs the intermediates,
    so that a chain is always checked, offline; ``purpose`` narrows them (``_DEFAULT_TRUST``).
    """
    wanted = _DEFAULT_TRUST[purpose]
    bundled = [c for stem, c in load_bundled_anchors().items() if wanted is None or stem in wanted]
    return (
        [c for c in bundled if c.subject == c.issuer],
        [c for c in bundled if c.subject != c.issuer],
    )
