"""Request and response shapes of CSC v2 ``signatures/signDoc`` (gateway/api/sign_doc.py).

The endpoint is a thin wrapper: parse :class:`SignDocRequest`, have the SAD authorize
:meth:`SignDocRequest.authorized_digests`, call :func:`gateway.sign.service.sign_document` per
entry, render :class:`SignDocResponse`. Field names are the CSC v2 ones; ``profile`` and
``csv_encoding`` are this gateway's extension fields on a document object.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.api.schema import CscRequest
from gateway.sign.eprescription import AdditionalLine, EPrescriptionInput

__all__ = ["DocumentDigestsEntry", "DocumentEntry", "SignDocRequest", "SignDocResponse"]

MAX_DOCUMENTS = 100


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what} is not valid base64") from e


class AdditionalInformationLine(CscRequest):
    """One ConversionPharmaceuticalCode of AdditionalPrescriptionInformation /
    AdditionalDispensedInformation (the RE / YJ code lines; dispensing: line number and code)."""

    re_code: str | None = Field(default=None, max_length=2000)
    yj_code: str | None = Field(default=None, max_length=2000)
    csv_line_no: str | None = Field(default=None, max_length=20)
    dispensing_document_code: str | None = Field(default=None, max_length=64)


class DocumentEntry(CscRequest):
    """One element of ``documents``."""

    document: str = Field(min_length=1)
    signature_format: Literal["C", "X", "P"]
    conformance_level: Literal["AdES-B-B", "AdES-B-T", "AdES-B-LT", "AdES-B-LTA"] = "AdES-B-B"
    signAlgo: str = "1.2.840.113549.1.1.11"
    signAlgoParams: str | None = None
    signed_props: list[dict[str, str]] | None = None
    signed_envelope_property: (
        Literal["Detached", "Attached", "Enveloped", "Enveloping", "Certification", "Revision"]
        | None
    ) = None
    profile: Literal["jp-eprescription", "jp-dispensing"] | None = None
    csv_encoding: Literal["utf-8", "shift_jis"] = "utf-8"
    #: e-prescription from a CSV: PrescriptionId / DispensingId (UUID; a new one when absent).
    prescription_id: str | None = Field(default=None, max_length=64)
    dispensing_id: str | None = Field(default=None, max_length=64)
    additional_information: list[AdditionalInformationLine] | None = Field(
        default=None, max_length=500
    )
    #: jp-dispensing from a CSV: the signed prescription (base64 XML) the result embeds.
    prescription: str | None = Field(default=None, max_length=8 * 1024 * 1024)

    @field_validator("prescription")
    @classmethod
    def _prescription_b64(cls, v: str | None) -> str | None:
        if v is not None:
            _b64(v, "prescription")
        return v

    def eprescription_input(self) -> EPrescriptionInput:
        return EPrescriptionInput(
            document_id=self.dispensing_id
            if self.profile == "jp-dispensing"
            else self.prescription_id,
            additional=[
                AdditionalLine(
                    re_code=a.re_code,
                    yj_code=a.yj_code,
                    csv_line_no=a.csv_line_no,
                    dispensing_document_code=a.dispensing_document_code,
                )
                for a in self.additional_information or []
            ],
            prescription=_b64(self.prescription, "prescription") if self.prescription else None,
            encoding=self.csv_encoding,
        )

    @field_validator("document")
    @classmethod
    def _is_base64(cls, v: str) -> str:
        _b64(v, "document")
        return v

    def decoded(self) -> bytes:
        return _b64(self.document, "document")


class DocumentDigestsEntry(CscRequest):
    """One element of ``documentDigests`` (detached CAdES only here)."""

    hashes: list[str] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    hashAlgorithmOID: Literal["2.16.840.1.101.3.4.2.1"] = "2.16.840.1.101.3.4.2.1"
    signature_format: Literal["C"]
    conformance_level: Literal["AdES-B-B", "AdES-B-T", "AdES-B-LT", "AdES-B-LTA"] = "AdES-B-B"
    signAlgo: str = "1.2.840.113549.1.1.11"
    signed_envelope_property: Literal["Detached"] = "Detached"

    @field_validator("hashes")
    @classmethod
    def _sha256(cls, v: list[str]) -> list[str]:
        for h in v:
            if len(_b64(h, "hash")) != 32:
                raise ValueError("each hash must be a base64 SHA-256 digest (32 bytes)")
        return v

    def decoded(self) -> list[bytes]:
        return [_b64(h, "hash") for h in self.hashes]


class SignDocRequest(CscRequest):
    credentialID: str = Field(min_length=1, max_length=200)
    SAD: str = Field(min_length=1, max_length=2000)
    documents: list[DocumentEntry] | None = Field(default=None, max_length=MAX_DOCUMENTS)
    documentDigests: list[DocumentDigestsEntry] | None = Field(
        default=None, max_length=MAX_DOCUMENTS
    )
    returnValidationInfo: bool = False

    @model_validator(mode="after")
    def _something_to_sign(self) -> SignDocRequest:
        if not self.documents and not self.documentDigests:
            raise ValueError("documents or documentDigests is required")
        return self

    def authorized_digests(self) -> list[bytes]:
        """What the SAD must cover: SHA-256 of each decoded document as sent, then the
        documentDigests hashes (the same multiset the signHash challenge binds)."""
        out = [hashlib.sha256(d.decoded()).digest() for d in self.documents or []]
        for entry in self.documentDigests or []:
            out.extend(entry.decoded())
        return out


class SignDocResponse(CscRequest):
    """``DocumentWithSignature`` / ``SignatureObject`` as base64, in request order."""

    DocumentWithSignature: list[str] = Field(default_factory=list)
    SignatureObject: list[str] = Field(default_factory=list)
