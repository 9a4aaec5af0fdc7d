"""PAdES baseline B-B / B-T with pyHanko, the key staying behind a KeyHandle.

pyHanko does the PDF part (incremental update, ByteRange, /Contents, DocMDP for a
certification signature); :class:`KeyHandlePdfSigner` plugs the gateway's key into it through
pyHanko's one abstract method, ``async_sign_raw``, and :class:`GatewayTimeStamper` routes its
timestamp requests through the gateway's RFC 3161 client so errors read the same everywhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections.abc import Sequence
from typing import Any

from asn1crypto import algos, tsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.misc import PdfError
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import fields, signers
from pyhanko.sign.general import SigningError
from pyhanko.sign.timestamps.api import TimeStamper
from pyhanko_certvalidator.registry import SimpleCertificateStore

from gateway.errors import InvalidRequest
from gateway.hsm.api import DigestAlgorithm, KeyHandle
from gateway.sign.timestamp import Rfc3161Client
from gateway.sign.xades_ltv import LongTerm

__all__ = [
    "GatewayTimeStamper",
    "KeyHandlePdfSigner",
    "check_pdf",
    "inspect_pdf",
    "sign_pdf",
]

_DIGESTS = {
    "sha256": DigestAlgorithm.SHA256,
    "sha384": DigestAlgorithm.SHA384,
    "sha512": DigestAlgorithm.SHA512,
}


def _a(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


class KeyHandlePdfSigner(signers.Signer):
    """pyHanko Signer whose raw signature comes from ``KeyHandle.sign_digest``."""

    def __init__(
        self, *, key: KeyHandle, certificate: x509.Certificate, chain: Sequence[x509.Certificate]
    ) -> None:
        super().__init__(
            signing_cert=_a(certificate),
            cert_registry=SimpleCertificateStore.from_certs(  # type: ignore[no-untyped-call]
                [_a(c) for c in chain]
            ),
            signature_mechanism=algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"}),
            embed_roots=True,
        )
        self._key = key

    async def async_sign_raw(
        self, data: bytes, digest_algorithm: str, dry_run: bool = False
    ) -> bytes:
        if dry_run:
            return bytes(256)
        algorithm = _DIGESTS.get(digest_algorithm.lower())
        if algorithm is None:
            raise ValueError(f"unsupported digest {digest_algorithm}")
        digest = hashlib.new(algorithm.hashlib_name, data).digest()
        return await self._key.sign_digest(digest, algorithm)


class GatewayTimeStamper(TimeStamper):
    """pyHanko TimeStamper that posts through :class:`Rfc3161Client` (same time-out, errors)."""

    def __init__(self, client: Rfc3161Client) -> None:
        super().__init__(include_nonce=True)  # type: ignore[no-untyped-call]
        self._client = client

    async def async_request_tsa_response(self, req: Any) -> Any:
        return tsp.TimeStampResp.load(await self._client.post(req.dump()))


def _long_term_options(
    certificate: x509.Certificate, chain: Sequence[x509.Certificate], long_term: LongTerm | None
) -> dict[str, Any]:
    if long_term is None:
        return {}
    from gateway.sign.pades_ltv import validation_context

    return {
        "embed_validation_info": True,
        "use_pades_lta": long_term.form == "ES-A",
        "validation_context": validation_context([certificate, *chain], long_term),
    }


def check_pdf(data: bytes) -> None:
    """Refuse what is not a PDF before pyHanko spends time on it."""
    if not data[:1024].lstrip().startswith(b"%PDF-"):
        raise InvalidRequest("document is not a PDF (no %PDF- header)")
    if b"%%EOF" not in data[-2048:]:
        raise InvalidRequest("document is not a complete PDF (no %%EOF trailer)")


def inspect_pdf(data: bytes) -> None:
    """Read, before any SAD is spent, what signing will read of the client's PDF: the header
    and trailer, the cross-reference table, the catalog, the page tree down to the first page
    (where the signature field goes) and the existing signature fields.

    A malformed PDF makes pyHanko fail with its own lookup errors or recurse past the
    interpreter's limit (a /Pages that points at the catalog, 100,000 nested arrays, a 50,000
    long chain of indirect references): all of them are InvalidRequest (400) here, with the
    count of the SAD untouched. Blocking: the caller runs it off the event loop.
    """
    check_pdf(data)
    try:
        reader = PdfFileReader(io.BytesIO(data), strict=False)
        if reader.encrypted:
            raise InvalidRequest("encrypted PDFs are not signed")
        pages = reader.root["/Pages"]
        if int(pages["/Count"]) < 1:
            raise InvalidRequest("the PDF has no pages")
        reader.find_page_for_modification(0)  # type: ignore[no-untyped-call]
        for _ in fields.enumerate_sig_fields(reader):
            pass
    except InvalidRequest:
        raise
    except (
        PdfError,
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        AttributeError,
        RecursionError,
    ) as e:
        raise InvalidRequest(f"document is not a readable PDF ({type(e).__name__})") from e


async def sign_pdf(
    key: KeyHandle,
    *,
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
    pdf: bytes,
    envelope: str,
    signing_time: dt.datetime,
    tsa: Rfc3161Client | None,
    long_term: LongTerm | None = None,
) -> bytes:
    """PAdES-B-B (B-T with ``tsa``; B-LT / B-LTA with ``long_term``: the DSS with the
    validation data, and for B-LTA a document timestamp); ``envelope``: Certification (DocMDP)
    or Revision."""
    if envelope not in ("Certification", "Revision"):
        raise InvalidRequest(
            f"unknown PAdES signed_envelope_property {envelope!r}; valid: Certification, Revision"
        )
    check_pdf(pdf)
    try:
        writer = IncrementalPdfFileWriter(io.BytesIO(pdf), strict=False)
    except (PdfError, ValueError, KeyError, TypeError, IndexError) as e:
        raise InvalidRequest(f"document is not a readable PDF: {e}") from e
    if writer.prev.encrypted:
        raise InvalidRequest("encrypted PDFs are not signed")
    try:
        existing = {name for name, _, _ in fields.enumerate_sig_fields(writer.prev)}
    except (PdfError, ValueError, KeyError, TypeError) as e:
        raise InvalidRequest(f"document is not a readable PDF: {e}") from e
    n = len(existing) + 1
    while f"Signature{n}" in existing:
        n += 1
    meta = signers.PdfSignatureMetadata(
        field_name=f"Signature{n}",
        md_algorithm="sha256",
        subfilter=fields.SigSeedSubFilter.PADES,
        certify=envelope == "Certification",
        **_long_term_options(certificate, chain, long_term),
    )
    signer = KeyHandlePdfSigner(key=key, certificate=certificate, chain=chain)
    pdf_signer = signers.PdfSigner(
        meta, signer=signer, timestamper=GatewayTimeStamper(tsa) if tsa else None
    )
    out = io.BytesIO()
    try:
        # pyHanko stamps its own signingTime (now); ``signing_time`` is kept in the signature
        # of this function so that every format takes the same arguments.
        await pdf_signer.async_sign_pdf(writer, output=out)
    except (PdfError, SigningError) as e:
        raise InvalidRequest(f"the PDF cannot be signed: {e}") from e
    return out.getvalue()
