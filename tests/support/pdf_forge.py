"""PDFs built the way an attacker would, offline: a software signer (:mod:`tests.support.softkey`),
pyHanko's dummy timestamper with a chosen time (the world's TEST TSA key), incremental updates
written by hand. Used by the PAdES verification attack tests."""

from __future__ import annotations

import datetime as dt
import io

from asn1crypto import crl as asn1_crl
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.writer import PdfFileWriter
from pyhanko.sign import fields, signers
from pyhanko.sign.timestamps.dummy_client import DummyTimeStamper
from pyhanko.sign.validation.dss import DocumentSecurityStore

from gateway.sign.pades import KeyHandlePdfSigner
from tests.support.softkey import World

_DER = serialization.Encoding.DER


def _a(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(_DER))


def one_page_pdf(text: str = "Take 1 tablet") -> bytes:
    """A one-page PDF whose page content stream draws ``text``."""
    w = PdfFileWriter()
    page = generic.DictionaryObject(
        {
            generic.NameObject("/Type"): generic.NameObject("/Page"),
            generic.NameObject("/MediaBox"): generic.ArrayObject(
                [generic.NumberObject(x) for x in (0, 0, 612, 792)]
            ),
            generic.NameObject("/Contents"): w.add_object(
                generic.StreamObject(stream_data=_text_stream(text))
            ),
            generic.NameObject("/Resources"): generic.DictionaryObject(),
        }
    )
    w.insert_page(page)
    out = io.BytesIO()
    w.write(out)
    return out.getvalue()


def _text_stream(text: str) -> bytes:
    return b"BT /F1 24 Tf 72 700 Td (" + text.encode("ascii") + b") Tj ET"


def sign(
    world: World,
    pdf: bytes,
    *,
    field: str = "Signature1",
    cert: x509.Certificate | None = None,
    certify: bool = False,
    docmdp: fields.MDPPerm | None = None,
) -> bytes:
    """An approval (or, ``certify``, certification) PAdES signature in a new revision."""
    signer = KeyHandlePdfSigner(
        key=world.handle(), certificate=cert or world.signer_cert, chain=world.chain
    )
    meta = signers.PdfSignatureMetadata(
        field_name=field,
        md_algorithm="sha256",
        subfilter=fields.SigSeedSubFilter.PADES,
        certify=certify,
        docmdp_permissions=docmdp or fields.MDPPerm.FILL_FORMS,  # pyHanko's default
    )
    writer = IncrementalPdfFileWriter(io.BytesIO(pdf), strict=False)
    return bytes(signers.sign_pdf(writer, meta, signer=signer).getvalue())


def document_timestamp(world: World, pdf: bytes, at: dt.datetime, *, field: str) -> bytes:
    """A document timestamp (PAdES B-LTA) dated ``at`` by the world's TEST TSA, in a new
    revision."""
    key = asn1_keys.PrivateKeyInfo.load(
        world.tsa.key.private_bytes(
            _DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    tsa = DummyTimeStamper(tsa_cert=_a(world.tsa.cert), tsa_key=key, fixed_dt=at)
    writer = IncrementalPdfFileWriter(io.BytesIO(pdf), strict=False)
    stamper = signers.PdfTimeStamper(tsa, field_name=field)
    return bytes(stamper.timestamp_pdf(writer, "sha256").getvalue())


def add_dss(pdf: bytes, crls: list[x509.CertificateRevocationList]) -> bytes:
    """A DSS with ``crls`` in a new revision (what a B-LT update adds)."""
    stream = io.BytesIO(pdf)
    DocumentSecurityStore.add_dss(
        stream,
        None,
        crls=[asn1_crl.CertificateList.load(c.public_bytes(_DER)) for c in crls],
        force_write=True,
    )
    return stream.getvalue()


def replace_page_text(pdf: bytes, text: str) -> bytes:
    """An incremental update that points the first page's /Contents at a new stream: the
    page now shows ``text``; every byte the signatures cover is left as it was."""
    w = IncrementalPdfFileWriter(io.BytesIO(pdf), strict=False)
    page = w.root["/Pages"]["/Kids"][0].get_object()
    w.update_container(page)
    page[generic.NameObject("/Contents")] = w.add_object(
        generic.StreamObject(stream_data=_text_stream(text))
    )
    out = io.BytesIO()
    w.write(out)
    return out.getvalue()
