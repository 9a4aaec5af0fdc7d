"""Sample e-prescriptions and dispensing results at every level for the sandbox manifest.

``sandbox init`` signs them with the sandbox doctor's and pharmacist's HSM keys and the TEST
TSA's key in process (the TSA is served only once ``serve`` runs), audits each as
``signature.sample``, and lists them in ``manifest.json`` under ``samples``: integrators get
documents of each form (ES-BES, ES-T, ES-XL, ES-A) to feed their verifiers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

from asn1crypto import tsp

from gateway.config import Settings
from gateway.hsm.api import DigestAlgorithm
from gateway.sign.eprescription import AdditionalLine, EPrescriptionInput
from gateway.sign.samples import DISPENSING_CSV, PRESCRIPTION_CSV
from gateway.sign.service import sign_document
from gateway.sign.setup import signing_policy
from gateway.sign.timestamp import token_from_response

__all__ = ["LEVELS", "write_samples"]

LEVELS = ("AdES-B-B", "AdES-B-T", "AdES-B-LT", "AdES-B-LTA")


class _InProcessTestTsa:
    """The sandbox TEST TSA's key, stamping in this process (sandbox init only)."""

    def __init__(self, settings: Settings) -> None:
        from gateway.sandbox.tsa import _load

        self.stamper = _load(settings)

    async def timestamp(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        req = tsp.TimeStampReq(
            {
                "version": "v1",
                "message_imprint": {
                    "hash_algorithm": {"algorithm": "sha256"},
                    "hashed_message": digest,
                },
                "cert_req": True,
            }
        )
        self.stamper.fixed_dt = dt.datetime.now(dt.UTC)
        resp = await self.stamper.async_request_tsa_response(req)
        return token_from_response(
            resp.dump(), digest=digest, algorithm=algorithm, nonce=None, source="TEST TSA"
        )


async def write_samples(
    directory: Path,
    settings: Settings,
    *,
    keystore: Any,
    doctor: Any,
    pharmacist: Any,
    db: Any,
    audit: Any,
) -> dict[str, dict[str, str]]:
    """Sign the samples; ``doctor`` / ``pharmacist`` are credentials (key_id, certificate,
    chain). Returns ``{"prescription": {level: path}, "dispensing": {level: path}}``."""
    out_dir = directory / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    tsa = _InProcessTestTsa(settings)
    policy = signing_policy(settings)
    listing: dict[str, dict[str, str]] = {"prescription": {}, "dispensing": {}}
    for level in LEVELS:
        stamp = tsa if level != "AdES-B-B" else None
        rx = await _sign(
            keystore, doctor, level, stamp, policy, PRESCRIPTION_CSV, "jp-eprescription",
            EPrescriptionInput(additional=[AdditionalLine(re_code="201,1,1,1,2,622688101")]),
        )  # fmt: skip
        disp = await _sign(
            keystore, pharmacist, level, stamp, policy, DISPENSING_CSV, "jp-dispensing",
            EPrescriptionInput(prescription=rx),
        )  # fmt: skip
        for kind, data in (("prescription", rx), ("dispensing", disp)):
            path = out_dir / f"{kind}-{level}.xml"
            path.write_bytes(data)
            listing[kind][level] = str(path)
            await audit.append_alone(
                db,
                action="signature.sample",
                actor="sandbox:init",
                detail={
                    "document": path.name,
                    "level": level,
                    "document_sha256": hashlib.sha256(data).hexdigest(),
                },
            )
    return listing


async def _sign(
    keystore: Any,
    cred: Any,
    level: str,
    tsa: Any,
    policy: Any,
    document: bytes,
    profile: str,
    extra: EPrescriptionInput,
) -> bytes:
    key = await keystore.get_key(cred.key_id)
    signed = await sign_document(
        key=key,
        chain=[cred.certificate, *cred.chain],
        signature_format="X",
        conformance_level=level,
        envelope="Enveloped",
        document=document,
        profile=profile,
        eprescription_input=extra,
        tsa=tsa,
        policy=policy,
    )
    assert signed.document_with_signature is not None
    return signed.document_with_signature
