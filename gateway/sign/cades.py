"""CAdES baseline signatures (ETSI EN 319 122-1): B-B to B-LTA, attached or detached.

Signed attributes (B-B): contentType, signingTime, messageDigest, signingCertificateV2 (ESS,
RFC 5035). B-T adds the signature-time-stamp unsigned attribute over the signature value, B-LT
the validation data in SignedData, B-LTA an archive-time-stamp-v3 (``cades_lta.py``).

Why this is not one ``cms.ContentInfo({...}).dump()`` per request: building the whole
structure with asn1crypto costs ~1.9 ms per signature and pyHanko's generic CMS ~17 ms, while
the HSM signs in ~0.8 ms; CMS assembly would be the ceiling. Everything that depends only on
the credential (certificate set, signer identifier, the ESS attribute) is built ONCE with
asn1crypto when the template is made; per signature only signingTime, messageDigest, the
signature value and the outer lengths change, and those are written with the few DER
length/tag helpers below. The tests re-parse every output with asn1crypto and check that its
strict DER re-encoding is byte-identical, and verify it with ``openssl cms -verify``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from asn1crypto import cms, tsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gateway.hsm.api import DigestAlgorithm, KeyHandle
from gateway.sign.timestamp import TimestampClient
from gateway.sign.xades_ltv import LongTerm

__all__ = ["CadesTemplate", "SignedAttributes", "der_length", "der_tlv", "template_for"]

# -- minimal DER writers (hot path only; see the module docstring) ----------------------------


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def der_tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + der_length(len(content)) + content


# Constant encodings, written out once (each checked against asn1crypto in the unit tests).
OID_DATA = bytes.fromhex("06092a864886f70d010701")
OID_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")
OID_CONTENT_TYPE = bytes.fromhex("06092a864886f70d010903")
OID_MESSAGE_DIGEST = bytes.fromhex("06092a864886f70d010904")
OID_SIGNING_TIME = bytes.fromhex("06092a864886f70d010905")
OID_SIGNATURE_TIME_STAMP = bytes.fromhex("060b2a864886f70d010910020e")
SHA256_ALG_ID = bytes.fromhex("300d06096086480165030402010500")
RSA_ENCRYPTION_ALG_ID = bytes.fromhex("300d06092a864886f70d0101010500")
OID_RI_OCSP_RESPONSE = bytes.fromhex("06082b06010505071002")  # id-ri-ocsp-response (RFC 5940)
INTEGER_1 = b"\x02\x01\x01"


def _utc_time(moment: dt.datetime) -> bytes:
    """RFC 5652 §11.3: UTCTime for 1950-2049, GeneralizedTime otherwise; whole seconds."""
    moment = moment.astimezone(dt.UTC)
    if 1950 <= moment.year < 2050:
        return der_tlv(0x17, moment.strftime("%y%m%d%H%M%SZ").encode())
    return der_tlv(0x18, moment.strftime("%Y%m%d%H%M%SZ").encode())


@dataclass(frozen=True)
class SignedAttributes:
    """The signed attributes of one signature: the DER to hash and the bytes for SignerInfo."""

    set_der: bytes  # tag 0x31: what the signature covers (RFC 5652 §5.4)

    @property
    def implicit_der(self) -> bytes:
        return b"\xa0" + self.set_der[1:]


class CadesTemplate:
    """The constant parts of a credential's CMS SignedData, encoded once.

    Thread- and task-safe: it holds only immutable bytes after construction.
    """

    def __init__(self, *, certificate: x509.Certificate, chain: Sequence[x509.Certificate]):
        self.certificate = certificate
        cert_der = certificate.public_bytes(serialization.Encoding.DER)
        a_cert = asn1_x509.Certificate.load(cert_der)
        chain_der = [c.public_bytes(serialization.Encoding.DER) for c in chain]
        all_certs = [cert_der] + [d for d in chain_der if d != cert_der]
        # certificates [0] IMPLICIT CertificateSet: a SET OF, so DER orders the elements by
        # their encodings. Written directly because asn1crypto's forced re-encoding would
        # re-serialise the certificates themselves (and trip over the hcRole SET).
        self.all_certs_der: list[bytes] = all_certs
        self.certificates_der: bytes = der_tlv(0xA0, b"".join(sorted(all_certs)))
        self.sid_der: bytes = cms.SignerIdentifier(
            name="issuer_and_serial_number",
            value=cms.IssuerAndSerialNumber(
                {"issuer": a_cert.issuer, "serial_number": a_cert.serial_number}
            ),
        ).dump()
        ess = tsp.SigningCertificateV2(
            {
                "certs": [
                    {
                        # hashAlgorithm omitted: SHA-256 is the DEFAULT (RFC 5035), and DER
                        # forbids encoding a default value.
                        "cert_hash": hashlib.sha256(cert_der).digest(),
                        "issuer_serial": {
                            "issuer": [
                                asn1_x509.GeneralName(name="directory_name", value=a_cert.issuer)
                            ],
                            "serial_number": a_cert.serial_number,
                        },
                    }
                ]
            }
        )
        self.ess_attr_der: bytes = cms.CMSAttribute(
            {"type": "signing_certificate_v2", "values": [ess]}
        ).dump()
        self.content_type_attr_der: bytes = der_tlv(
            0x30, OID_CONTENT_TYPE + der_tlv(0x31, OID_DATA)
        )
        self.digest_algorithms_der = der_tlv(0x31, SHA256_ALG_ID)

    # -- per signature ---------------------------------------------------------------------

    def signed_attributes(self, *, message_digest: bytes, signing_time: dt.datetime) -> bytes:
        """DER (tag 0x31) of the four B-B signed attributes."""
        attrs = [
            self.content_type_attr_der,
            der_tlv(0x30, OID_SIGNING_TIME + der_tlv(0x31, _utc_time(signing_time))),
            der_tlv(0x30, OID_MESSAGE_DIGEST + der_tlv(0x31, der_tlv(0x04, message_digest))),
            self.ess_attr_der,
        ]
        attrs.sort()  # DER: a SET OF is ordered by its elements' encodings (X.690 §11.6)
        return der_tlv(0x31, b"".join(attrs))

    def assemble(
        self,
        *,
        signed_attrs: bytes,
        signature: bytes,
        content: bytes | None,
        timestamp_token: bytes | None = None,
        validation: tuple[Sequence[bytes], Sequence[bytes]] | None = None,
        ocsps: Sequence[bytes] = (),
    ) -> bytes:
        """The ContentInfo DER; ``content`` None means detached. ``validation`` (B-LT): DER
        certificates and CRLs added to SignedData's certificates and crls (EN 319 122-1 §5.5.1);
        ``ocsps``: DER OCSP responses, added to crls as other revocation info (RFC 5940)."""
        unsigned = b""
        if timestamp_token is not None:
            attr = der_tlv(0x30, OID_SIGNATURE_TIME_STAMP + der_tlv(0x31, timestamp_token))
            unsigned = der_tlv(0xA1, attr)
        signer_info = der_tlv(
            0x30,
            INTEGER_1
            + self.sid_der
            + SHA256_ALG_ID
            + b"\xa0"
            + signed_attrs[1:]
            + RSA_ENCRYPTION_ALG_ID
            + der_tlv(0x04, signature)
            + unsigned,
        )
        certificates, crls = self.certificates_der, b""
        if validation is not None:
            extra_certs, crl_ders = validation
            certs = list(dict.fromkeys([*self.all_certs_der, *extra_certs]))
            certificates = der_tlv(0xA0, b"".join(sorted(certs)))
            # crls [1] IMPLICIT RevocationInfoChoices: a SET OF, ordered like the certificates;
            # an OCSP response is "other" [1] IMPLICIT OtherRevocationInfoFormat.
            choices = [
                *crl_ders,
                *(der_tlv(0xA1, OID_RI_OCSP_RESPONSE + d) for d in ocsps),
            ]
            crls = der_tlv(0xA1, b"".join(sorted(dict.fromkeys(choices)))) if choices else b""
        encap = OID_DATA
        if content is not None:
            encap += der_tlv(0xA0, der_tlv(0x04, content))
        signed_data = der_tlv(
            0x30,
            INTEGER_1
            + self.digest_algorithms_der
            + der_tlv(0x30, encap)
            + certificates
            + crls
            + der_tlv(0x31, signer_info),
        )
        return der_tlv(0x30, OID_SIGNED_DATA + der_tlv(0xA0, signed_data))

    async def sign(
        self,
        key: KeyHandle,
        *,
        content: bytes | None,
        message_digest: bytes | None = None,
        attached: bool,
        signing_time: dt.datetime,
        tsa: TimestampClient | None = None,
        long_term: LongTerm | None = None,
    ) -> bytes:
        """A CAdES-B-B (-B-T when ``tsa`` is given; -B-LT, -B-LTA with ``long_term``).

        Either ``content`` (hashed here) or, for a detached signature, ``message_digest``
        (SHA-256 computed by the caller). The timestamp is fetched before anything is
        returned: a TSA failure raises and no signature leaves this function.
        """
        if message_digest is None:
            if content is None:
                raise ValueError("content or message_digest is required")
            message_digest = hashlib.sha256(content).digest()
        if attached and content is None:
            raise ValueError("an attached signature needs the content")
        attrs = self.signed_attributes(message_digest=message_digest, signing_time=signing_time)
        signature = await key.sign_digest(hashlib.sha256(attrs).digest(), DigestAlgorithm.SHA256)
        token = None
        if tsa is not None:
            token = await tsa.timestamp(hashlib.sha256(signature).digest(), DigestAlgorithm.SHA256)
        validation = None
        ocsps: list[bytes] = []
        if long_term is not None and token is not None:
            from gateway.sign.xades_ltv import tsa_validation_data

            tsa_data = await tsa_validation_data(token, long_term.source, signing_time)
            der = serialization.Encoding.DER
            validation = (
                [c.public_bytes(der) for c in [*long_term.signer.certs, *tsa_data.certs]],
                [c.public_bytes(der) for c in [*long_term.signer.crls, *tsa_data.crls]],
            )
            ocsps = [*long_term.signer.ocsps, *tsa_data.ocsps]
        signed = self.assemble(
            signed_attrs=attrs,
            signature=signature,
            content=content if attached else None,
            timestamp_token=token,
            validation=validation,
            ocsps=ocsps,
        )
        if long_term is not None and long_term.form == "ES-A" and tsa is not None:
            # B-LTA: the archive timestamp covers the finished B-LT structure, so it is added
            # by re-parsing it (asn1crypto keeps the encodings of everything it did not change).
            from gateway.sign.cades_lta import archive_signed_data

            ci = cms.ContentInfo.load(signed)
            await archive_signed_data(
                ci["content"],
                tsa=tsa,
                content_digest=message_digest,
                source=long_term.source,
                now=signing_time,
            )
            signed = ci.dump()
        return signed


_SHA256 = hashes.SHA256()
_templates: dict[tuple[bytes, ...], CadesTemplate] = {}
_templates_lock = threading.Lock()
_MAX_TEMPLATES = 4096


def template_for(certificate: x509.Certificate, chain: Sequence[x509.Certificate]) -> CadesTemplate:
    """The cached template of a credential (keyed by the certificate and chain fingerprints)."""
    key = (certificate.fingerprint(_SHA256), *tuple(c.fingerprint(_SHA256) for c in chain))
    tpl = _templates.get(key)
    if tpl is None:
        tpl = CadesTemplate(certificate=certificate, chain=chain)
        with _templates_lock:
            if len(_templates) >= _MAX_TEMPLATES:
                _templates.clear()
            _templates[key] = tpl
    return tpl
