"""The few ISO 7816-15 (PKCS#15) structures an HPKI card's signing application carries.

EF.OD lists the directory files (``privateKeys [0]`` and ``certificates [4]``, each a path);
a PrKDF entry ties a key iD to the key's file and its PIN; a CDF entry ties the same iD to
the certificate's file. Tags follow what OpenSC reads and writes (pkcs15-prkey.c,
pkcs15-cert.c): the typeAttributes ``[1]`` and the OD choices wrap their SEQUENCE.

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
        ("type", X509CertificateAttributes, {"explicit": 1}),
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


def build_od(*, prkdf_fid: int, cdf_fid: int) -> bytes:
    pk: bytes = OdEntry(name="private_keys", value=_path(prkdf_fid)).dump()
    certs: bytes = OdEntry(name="certificates", value=_path(cdf_fid)).dump()
    return pk + certs


def build_prkdf(
    *, label: str, key_id: bytes, key_fid: int, key_ref: int, modulus_bits: int, pin_ref: int
) -> bytes:
    der: bytes = PrivateRsaKeyObject(
        {
            "common": {"label": label, "auth_id": bytes((pin_ref,))},
            "key": {
                "id": key_id,
                "usage": _USAGE_SIGN_NR,
                "access_flags": (1, 0, 1, 1, 1),
                "key_reference": key_ref,
            },
            "type": {"value": _path(key_fid), "modulus_length": modulus_bits},
        }
    ).dump()
    return der


def build_cdf(*, label: str, key_id: bytes, cert_fid: int) -> bytes:
    der: bytes = CertificateObject(
        {"common": {"label": label}, "cert": {"id": key_id}, "type": {"value": _path(cert_fid)}}
    ).dump()
    return der


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
    pin_ref: int | None
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
            pin_ref=auth[-1] if auth else None,
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
