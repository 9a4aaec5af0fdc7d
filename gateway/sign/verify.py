"""Former home of the verifier, now :mod:`gateway.verify`; kept as an import path."""

from gateway.verify import SignatureReport, TrustConfig, VerificationReport, verify_document

__all__ = ["SignatureReport", "TrustConfig", "VerificationReport", "verify_document"]
