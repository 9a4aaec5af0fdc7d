"""CAdES B-LTA (ETSI EN 319 122-1 §5.5.3): the archive-time-stamp-v3 attribute and its
ats-hash-index-v3.

An archive-time-stamp-v3 is an unsigned attribute of the SignerInfo whose value is an RFC 3161
TimeStampToken. Its message imprint is the hash of the concatenation of

1. ``SignedData.encapContentInfo.eContentType`` (DER, tag included);
2. the hash of the signed content (what messageDigest covers), with the imprint's algorithm;
3. the SignerInfo's ``version``, ``sid``, ``digestAlgorithm``, ``signedAttrs`` (as encoded, [0]),
   ``signatureAlgorithm`` and ``signature``, in that order, as encoded;
4. the DER of the ``ATSHashIndexV3`` that the token carries in its own unsigned attribute
   ats-hash-index-v3: the hashes of each of SignedData's certificates and CRLs (each
   CertificateChoices / RevocationInfoChoice as encoded) and of each value of each unsigned
   attribute of the SignerInfo (``attrType || AttributeValue``, both as encoded; EN 319 122-1
   V1.1.1 §5.5.2).

The index lets validation data be added after the archive timestamp (the next archive timestamp
covers it): a verifier checks that everything the index names is still in the signature, and
that the imprint covers the index.

asn1crypto and pyHanko know neither attribute, so both are registered here (pyHanko registers
its CAdES attributes the same way, ``pyhanko.sign.ades.asn1_util``; importing it here would
load pyHanko into every worker).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from asn1crypto import algos, cms, core

from gateway.hsm.api import DigestAlgorithm
from gateway.sign import timestamp as ts

__all__ = [
    "ATSHashIndexV3",
    "ArchiveToken",
    "add_archive_timestamp",
    "archive_imprint_input",
    "archive_tokens",
    "hash_index",
]

OID_ARCHIVE_TIME_STAMP_V3 = "0.4.0.1733.2.4"  # id-aa-ets-archiveTimestampV3
OID_ATS_HASH_INDEX_V3 = "0.4.0.19122.1.5"  # id-aa-ATSHashIndex-v3


class _OctetStrings(core.SequenceOf):  # type: ignore[misc]  # asn1crypto is untyped
    _child_spec = core.OctetString


class ATSHashIndexV3(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped
    """EN 319 122-1 §5.5.2."""

    _fields = [  # noqa: RUF012 - asn1crypto's declaration style
        ("hash_ind_algorithm", algos.DigestAlgorithm, {"default": {"algorithm": "sha256"}}),
        ("certificates_hash_index", _OctetStrings),
        ("crls_hash_index", _OctetStrings),
        ("unsigned_attr_values_hash_index", _OctetStrings),
    ]


class _RawIndex(core.SequenceOf):  # type: ignore[misc]  # asn1crypto is untyped
    """ATSHashIndexV3 as it is read: its optional first field and the next one are both
    SEQUENCEs, which asn1crypto's field matching cannot tell apart, so the fields are told by
    their count (four: the algorithm is given; three: SHA-256), as EU DSS reads it too."""

    _child_spec = core.Any


def _decode_index(raw: Any) -> tuple[str, list[bytes], list[bytes], list[bytes]]:
    items = list(raw)
    if len(items) not in (3, 4):
        raise ValueError(f"ATSHashIndexV3 with {len(items)} fields")
    alg = "sha256"
    if len(items) == 4:
        alg = algos.DigestAlgorithm.load(items[0].dump())["algorithm"].native
        items = items[1:]
    lists = [_OctetStrings.load(i.dump()).native for i in items]
    return alg, lists[0], lists[1], lists[2]


def _register(dotted: str, name: str, spec: type) -> None:
    set_of = type("SetOf" + spec.__name__, (core.SetOf,), {"_child_spec": spec})
    cms.CMSAttributeType._map.setdefault(dotted, name)
    # asn1crypto builds the name -> OID map once, on the first encoding by name: a process
    # that encoded a CMS attribute before this module was imported has it built already.
    if cms.CMSAttributeType._reverse_map is not None:
        cms.CMSAttributeType._reverse_map.setdefault(name, dotted)
    cms.CMSAttribute._oid_specs.setdefault(name, set_of)


_register(OID_ARCHIVE_TIME_STAMP_V3, "archive_time_stamp_v3", cms.ContentInfo)
_register(OID_ATS_HASH_INDEX_V3, "ats_hash_index_v3", _RawIndex)

_HASHES = ("sha256", "sha384", "sha512")


def _h(alg: str, data: bytes) -> bytes:
    return hashlib.new(alg, data).digest()


def _unsigned(si: Any) -> list[Any]:
    attrs = si["unsigned_attrs"]
    if isinstance(attrs, core.Void) or not len(attrs):
        return []
    return list(attrs)


def _attr_value_hashes(si: Any, alg: str, skip: Any = None) -> list[bytes]:
    out = []
    for attr in _unsigned(si):
        if skip is not None and attr is skip:
            continue
        t = attr["type"].dump()
        for value in attr["values"]:
            out.append(_h(alg, t + value.dump()))
    return out


def hash_index(sd: Any, si: Any, alg: str = "sha256") -> ATSHashIndexV3:
    """The index of everything the signature holds now (certificates, CRLs, unsigned attribute
    values)."""
    fields: dict[str, Any] = {
        "certificates_hash_index": [_h(alg, c.dump()) for c in sd["certificates"] or []],
        "crls_hash_index": [_h(alg, c.dump()) for c in sd["crls"] or []],
        "unsigned_attr_values_hash_index": _attr_value_hashes(si, alg),
    }
    if alg != "sha256":  # DER leaves out a DEFAULT value
        fields["hash_ind_algorithm"] = {"algorithm": alg}
    return ATSHashIndexV3(fields)


def archive_imprint_input(sd: Any, si: Any, index_der: bytes, content_digest: bytes) -> bytes:
    """What the archive timestamp's imprint is computed over (see the module docstring);
    ``content_digest``: the signed content hashed with the imprint's algorithm."""
    return b"".join(
        [
            sd["encap_content_info"]["content_type"].dump(),
            content_digest,
            si["version"].dump(),
            si["sid"].dump(),
            si["digest_algorithm"].dump(),
            si["signed_attrs"].dump(),
            si["signature_algorithm"].dump(),
            si["signature"].dump(),
            index_der,
        ]
    )


async def add_archive_timestamp(
    sd: Any, si: Any, *, tsa: ts.TimestampClient, content_digest: bytes
) -> bytes:
    """Add an archive-time-stamp-v3 (SHA-256) to ``si`` in place; return the token as added.

    ``content_digest``: SHA-256 of the signed content. The TSA's answer is taken as it came
    (its signature covers only its TSTInfo and signed attributes); the ats-hash-index-v3 goes
    into the token's own unsigned attributes, where EN 319 122-1 puts it.
    """
    index = hash_index(sd, si, "sha256")
    data = archive_imprint_input(sd, si, index.dump(), content_digest)
    token_der = await tsa.timestamp(hashlib.sha256(data).digest(), DigestAlgorithm.SHA256)
    token = cms.ContentInfo.load(token_der)
    tsi = token["content"]["signer_infos"][0]
    index_attr = cms.CMSAttribute(
        {"type": "ats_hash_index_v3", "values": [_RawIndex.load(index.dump())]}
    )
    tsi["unsigned_attrs"] = cms.CMSAttributes([*_unsigned(tsi), index_attr])
    attr = cms.CMSAttribute({"type": "archive_time_stamp_v3", "values": [token]})
    si["unsigned_attrs"] = cms.CMSAttributes([*_unsigned(si), attr])
    out: bytes = token.dump()
    return out


@dataclass(frozen=True)
class ArchiveToken:
    """One archive-time-stamp-v3 of a SignerInfo, with what its imprint must cover."""

    token_der: bytes
    #: The imprint input, or None with ``problem`` set.
    imprint_data: bytes | None
    problem: str | None = None
    #: The problem is a covered element missing or changed (HASH_FAILURE), not unreadable.
    changed: bool = False


def _index_of(token: Any) -> Any:
    """The token's ats-hash-index-v3 value (raw, see ``_RawIndex``), or None."""
    tsi = token["content"]["signer_infos"][0]
    for attr in _unsigned(tsi):
        if attr["type"].native == "ats_hash_index_v3":
            return attr["values"][0]
    return None


def _missing(listed: Sequence[bytes], present: Sequence[bytes]) -> int:
    have = list(present)
    missing = 0
    for h in listed:
        if h in have:
            have.remove(h)
        else:
            missing += 1
    return missing


def archive_tokens(
    sd: Any, si: Any, content: bytes | None, digest: bytes | None
) -> list[ArchiveToken]:
    """Each archive-time-stamp-v3 of ``si`` with its imprint input, after checking that what
    its ats-hash-index-v3 names is still in the signature. ``content`` the signed content, or
    ``digest`` its SHA-256 (detached signatures given by digest)."""
    out: list[ArchiveToken] = []
    for attr in _unsigned(si):
        if attr["type"].native != "archive_time_stamp_v3":
            continue
        for token in attr["values"]:
            der = token.dump()
            try:
                index = _index_of(token)
                info = ts.parse_token(der).info
                if index is None:
                    out.append(
                        ArchiveToken(der, None, "no ats-hash-index-v3 in the archive timestamp")
                    )
                    continue
                alg, cert_hashes, crl_hashes, attr_hashes = _decode_index(index)
            except (ValueError, TypeError, KeyError) as e:
                out.append(ArchiveToken(der, None, f"unreadable ({e})"))
                continue
            imprint_alg = info["message_imprint"]["hash_algorithm"]["algorithm"].native
            if alg not in _HASHES or imprint_alg not in _HASHES:
                out.append(ArchiveToken(der, None, f"unsupported hash {alg} / {imprint_alg}"))
                continue
            gone = {
                "certificates": _missing(
                    cert_hashes,
                    [_h(alg, c.dump()) for c in sd["certificates"] or []],
                ),
                "CRLs": _missing(
                    crl_hashes,
                    [_h(alg, c.dump()) for c in sd["crls"] or []],
                ),
                "unsigned attributes": _missing(
                    attr_hashes,
                    _attr_value_hashes(si, alg, skip=attr),
                ),
            }
            if any(gone.values()):
                what = ", ".join(f"{n} {k}" for k, n in gone.items() if n)
                out.append(
                    ArchiveToken(
                        der,
                        None,
                        f"it covers {what} no longer in the signature (removed or changed)",
                        changed=True,
                    )
                )
                continue
            if content is not None:
                content_digest = _h(imprint_alg, content)
            elif digest is not None and imprint_alg == "sha256":
                content_digest = digest
            else:
                out.append(ArchiveToken(der, None, "the signed content is needed to check it"))
                continue
            out.append(
                ArchiveToken(der, archive_imprint_input(sd, si, index.dump(), content_digest))
            )
    return out


def _add_validation_data(
    sd: Any, certs: Sequence[bytes], crls: Sequence[bytes], ocsps: Sequence[bytes] = ()
) -> None:
    """Certificates, CRLs and OCSP responses (DER) into SignedData, each once; what is there
    stays as it is. OCSP responses go into crls as other revocation info (RFC 5940)."""
    from asn1crypto import crl as asn1_crl
    from asn1crypto import ocsp as asn1_ocsp
    from asn1crypto import x509 as asn1_x509

    have_certs = {c.chosen.dump() for c in sd["certificates"] or [] if c.name == "certificate"}
    new_certs = [
        cms.CertificateChoices(name="certificate", value=asn1_x509.Certificate.load(d))
        for d in dict.fromkeys(certs)
        if d not in have_certs
    ]
    if new_certs:
        sd["certificates"] = cms.CertificateSet([*(sd["certificates"] or []), *new_certs])
    have_crls = {c.chosen.dump() for c in sd["crls"] or [] if c.name == "crl"}
    have_crls |= {
        c.chosen["other_rev_info"].dump()
        for c in sd["crls"] or []
        if c.name == "other" and c.chosen["other_rev_info_format"].native == "ocsp_response"
    }
    new_crls = [
        cms.RevocationInfoChoice(name="crl", value=asn1_crl.CertificateList.load(d))
        for d in dict.fromkeys(crls)
        if d not in have_crls
    ] + [
        cms.RevocationInfoChoice(
            name="other",
            value={
                "other_rev_info_format": "ocsp_response",
                "other_rev_info": asn1_ocsp.OCSPResponse.load(d),
            },
        )
        for d in dict.fromkeys(ocsps)
        if d not in have_crls
    ]
    if new_crls:
        sd["crls"] = cms.RevocationInfoChoices([*(sd["crls"] or []), *new_crls])


async def archive_signed_data(
    sd: Any,
    *,
    tsa: ts.TimestampClient,
    content_digest: bytes,
    source: Any,
    now: Any,
    signer_infos: Sequence[Any] | None = None,
) -> None:
    """Give each SignerInfo (or those given) an archive-time-stamp-v3, then add the archive
    TSA's chain and CRLs to SignedData (covered by the next archive timestamp, and what a
    verifier needs for this one's TSA)."""
    from cryptography.hazmat.primitives import serialization

    from gateway.sign.xades_ltv import tsa_validation_data

    der = serialization.Encoding.DER
    for si in list(signer_infos if signer_infos is not None else sd["signer_infos"]):
        token = await add_archive_timestamp(sd, si, tsa=tsa, content_digest=content_digest)
        data = await tsa_validation_data(token, source, now)
        _add_validation_data(
            sd,
            [c.public_bytes(der) for c in data.certs],
            [c.public_bytes(der) for c in data.crls],
            data.ocsps,
        )
