"""The few ISO 7816-15 (PKCS#15) structures an HPKI card's signing application carries.

EF.OD lists the directory files (``privateKeys [0]``, ``certificates [4]`` and
``authObjects [8]``, each a path); a PrKDF entry ties a key iD to the key's file and names its
PIN by an authId; a CDF entry ties the same iD to the certificate's file; an AODF entry gives
the PIN of that authId its reference (the VERIFY P2). Tags follow what OpenSC reads and
writes (pkcs15-prkey.c, pkcs15-cert.c, pkcs15-pin.c): the typeAttributes ``[1]`` and the OD
choices wrap their SEQUENCE; the optional subClassAttributes ``[0]`` are read past.

asn1crypto has no ISO 7816-15 module; these are declared with its core types (the parsing
itself is asn1crypto's), covering only the fields an RSA signing key and its certificate use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asn1crypto import core, parser


class Path(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped
    _fields = [  # noqa: RUF012
        ("path", core.OctetString),
        ("index", core.Integer, {"optional": True}),
        ("length", core.Integer, {"implicit": 0, "optional": True}),
    ]


class CommonObjectAttributes(core.Sequence):  # type: ignore[misc]
    _fields = [  # noqa: RUF012
        ("label", core.UTF8String, {"optional": True}),
        ("flags", core.BitString, {"optional": True}),
        ("auth_id", core.OctetString, {"optional": True}),
    ]


class CommonKeyAttributes(core.Sequence):  # type: ignore[misc]
    _fields = [  # noqa: RUF012
        ("id", core.OctetString),
        ("usage", core.BitString),
        ("native", core.Boolean, {"default": True}),
        ("access_flags", core.BitString, {"optional": True}),
        ("key_reference", core.Integer, {"optional": True}),
    ]


class PrivateRsaKeyAttributes(core.Sequence):  # type: ignore[misc]
    _fields = [("value", Path), ("modulus_length", core.Integer)]  # noqa: RUF012


class PrivateRsaKeyObject(core.Sequence):  # type: ignore[misc]
    _fields = [  # noqa: RUF012
        ("common", CommonObjectAttributes),
        ("key", CommonKeyAttributes),
        # CommonPrivateKeyAttributes (subject name, key identifiers): read past, not used.
        ("sub_class", core.Sequence, {"implicit": 0, "optional": True}),
        ("type", PrivateRsaKeyAttributes, {"explicit": 1}),
    ]


class CommonCertificateAttributes(core.Sequence):  # type: ignore[misc]
    _fields = [  # noqa: RUF012
        ("id", core.OctetString),
        ("authority", core.Boolean, {"default": False}),
    ]


class X509CertificateAttributes(core.Sequence):  # type: ignore[misc]
    _fields = [("value", Path)]  # noqa: RUF012


class CertificateObject(core.Sequence):  # type: ignore[misc]
    _fields = [  # noqa: RUF012
        ("common", CommonObjectAttributes),
        ("cert", CommonCertificateAttributes),
        ("sub_class", core.Sequence, {"implicit": 0, "optional": True}),
        ("type", X509CertificateAttributes, {"explicit": 1}),
    ]


class CommonAuthenticationObjectAttributes(core.Sequence):  # type: ignore[misc]
    _fields = [("auth_id", core.OctetString)]  # noqa: RUF012


class PasswordType(core.Enumerated):  # type: ignore[misc]
    _map = {0: "bcd", 1: "ascii-numeric", 2: "utf8", 3: "half-nibble-bcd", 4: "iso9564-1"}  # noqa: RUF012


class PasswordAttributes(core.Sequence):  # type: ignore[misc]
    _fields = [  # noqa: RUF012
        ("flags", core.BitString),
        ("type", PasswordType),
        ("min_length", core.Integer),
        ("stored_length", core.Integer),
        ("max_length", core.Integer, {"optional": True}),
        ("reference", core.Integer, {"implicit": 0, "default": 0}),
        ("pad_char", core.OctetString, {"optional": True}),
    ]


class AuthenticationObject(core.Sequence):  # type: ignore[misc]
    """A PasswordAuthenticationObject (the AODF's ``pwd`` choice, a SEQUENCE)."""

    _fields = [  # noqa: RUF012
        ("common", CommonObjectAttributes),
        ("auth", CommonAuthenticationObjectAttributes),
        ("sub_class", core.Sequence, {"implicit": 0, "optional": True}),
        ("type", PasswordAttributes, {"explicit": 1}),
    ]


class OdEntry(core.Choice):  # type: ignore[misc]
    _alternatives = [  # noqa: RUF012
        ("private_keys", Path, {"explicit": 0}),
        ("public_keys", Path, {"explicit": 1}),
        ("trusted_public_keys", Path, {"explicit": 2}),
        ("secret_keys", Path, {"explicit": 3}),
        ("certificates", Path, {"explicit": 4}),
        ("trusted_certificates", Path, {"explicit": 5}),
        ("useful_certificates", Path, {"explicit": 6}),
        ("data_objects", Path, {"explicit": 7}),
        ("auth_objects", Path, {"explicit": 8}),
    ]


# KeyUsageFlags bit 2 = sign, 9 = nonRepudiation; KeyAccessFlags: sensitive(0),
# extractable(1), alwaysSensitive(2), neverExtractable(3), local(4).
_USAGE_SIGN_NR = (1, 0, 1, 0, 0, 0, 0, 0, 0, 1)
ACCESS_FLAGS = ("sensitive", "extractable", "alwaysSensitive", "neverExtractable", "local")


def _path(fid: int) -> Path:
    return Path({"path": fid.to_bytes(2, "big")})


def _fid(path: Path) -> int:
    raw = bytes(path["path"].native)
    if len(raw) < 2:
        raise ValueError("an ISO 7816-15 path of less than two bytes")
    return int.from_bytes(raw[-2:], "big")  # the EF is the last file id of the path


def build_od(*, prkdf_fid: int, cdf_fid: int, aodf_fid: int | None = None) -> bytes:
    pk: bytes = OdEntry(name="private_keys", value=_path(prkdf_fid)).dump()
    certs: bytes = OdEntry(name="certificates", value=_path(cdf_fid)).dump()
    auth: bytes = (
        OdEntry(name="auth_objects", value=_path(aodf_fid)).dump() if aodf_fid is not None else b""
    )
    return pk + certs + auth


def build_prkdf(
    *,
    label: str,
    key_id: bytes,
    key_fid: int,
    key_ref: int | None,
    modulus_bits: int,
    auth_id: bytes,
) -> bytes:
    key: dict[str, Any] = {"id": key_id, "usage": _USAGE_SIGN_NR, "access_flags": (1, 0, 1, 1, 1)}
    if key_ref is not None:
        key["key_reference"] = key_ref
    der: bytes = PrivateRsaKeyObject(
        {
            "common": {"label": label, "auth_id": auth_id},
            "key": key,
            "type": {"value": _path(key_fid), "modulus_length": modulus_bits},
        }
    ).dump()
    return der


def build_cdf(*, label: str, key_id: bytes, cert_fid: int) -> bytes:
    der: bytes = CertificateObject(
        {"common": {"label": label}, "cert": {"id": key_id}, "type": {"value": _path(cert_fid)}}
    ).dump()
    return der


def build_aodf(*, label: str, auth_id: bytes, reference: int) -> bytes:
    """One PIN (4-16 UTF-8 characters, as an HPKI card's) with its VERIFY reference."""
    der: bytes = AuthenticationObject(
        {
            "common": {"label": label},
            "auth": {"auth_id": auth_id},
            "type": {
                "flags": (0, 1, 0, 0, 1),  # local, initialized
                "type": "utf8",
                "min_length": 4,
                "stored_length": 16,
                "max_length": 16,
                "reference": reference,
            },
        }
    ).dump()
    return der


def parse_aodf(data: bytes) -> dict[bytes, int]:
    """EF.AODF -> {authId: the PIN's reference (VERIFY P2)}: the PrKD's authId names its PIN
    here, it is not the reference itself (ISO 7816-15; a JAHIS card: authId 08, reference
    0x88). Entries of other kinds (biometric, external) are skipped."""
    out: dict[bytes, int] = {}
    for raw in _objects(data):
        if raw[0] != 0x30:  # biometricTemplate [1], authKey [2], external [3]
            continue
        a = AuthenticationObject.load(raw)
        out.setdefault(bytes(a["auth"]["auth_id"].native), int(a["type"]["reference"].native))
    return out


def _objects(data: bytes) -> list[bytes]:
    """The DER objects concatenated in a directory file (trailing 00/FF padding ignored)."""
    out, i = [], 0
    while i < len(data) and data[i] not in (0x00, 0xFF):
        n = parser.parse(data[i:])  # (class, method, tag, header, contents, trailer)
        length = len(n[3]) + len(n[4]) + len(n[5])
        out.append(data[i : i + length])
        i += length
    return out


@dataclass(frozen=True)
class SigningKeyInfo:
    """What the directory files say about the signing key and its certificate."""

    key_id: bytes
    key_fid: int
    key_ref: int | None
    auth_id: bytes | None  # names the PIN in the AODF
    modulus_bits: int
    cert_fid: int
    access: dict[str, bool]


def parse_od(data: bytes) -> dict[str, int]:
    """EF.OD -> {"private_keys": fid, "certificates": fid, ...}."""
    out: dict[str, int] = {}
    for raw in _objects(data):
        try:
            entry = OdEntry.load(raw)
            out.setdefault(entry.name, _fid(entry.chosen))
        except (ValueError, TypeError):
            continue  # an entry kind this reader does not know
    return out


def find_signing_key(prkdf: bytes, cdf: bytes) -> SigningKeyInfo:
    """The first RSA key with the nonRepudiation usage and the certificate sharing its iD."""
    certs: dict[bytes, int] = {}
    for raw in _objects(cdf):
        c = CertificateObject.load(raw)
        certs.setdefault(bytes(c["cert"]["id"].native), _fid(c["type"]["value"]))
    for raw in _objects(prkdf):
        if raw[0] != 0x30:  # another key type (EC, DH...): not an HPKI signing key
            continue
        k = PrivateRsaKeyObject.load(raw)
        usage: Any = k["key"]["usage"].native
        if "nonRepudiation" not in _usage_names(usage):
            continue
        key_id = bytes(k["key"]["id"].native)
        if key_id not in certs:
            continue
        flags = k["key"]["access_flags"].native
        auth = k["common"]["auth_id"].native
        ref = k["key"]["key_reference"].native
        return SigningKeyInfo(
            key_id=key_id,
            key_fid=_fid(k["type"]["value"]),
            key_ref=int(ref) if ref is not None else None,
            auth_id=bytes(auth) if auth else None,
            modulus_bits=int(k["type"]["modulus_length"].native),
            cert_fid=certs[key_id],
            access={
                name: bool(flags is not None and i < len(flags) and flags[i])
                for i, name in enumerate(ACCESS_FLAGS)
            },
        )
    raise ValueError("the card's PrKDF names no RSA non-repudiation key with a certificate")


def _usage_names(bits: Any) -> set[str]:
    names = {
        0: "encrypt",
        1: "decrypt",
        2: "sign",
        3: "signRecover",
        4: "wrap",
        5: "unwrap",
        6: "verify",
        7: "verifyRecover",
        8: "derive",
        9: "nonRepudiation",
    }
    return {names[i] for i, b in enumerate(bits or ()) if b and i in names}
