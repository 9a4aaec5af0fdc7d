"""Build the signing policy, the verification trust and the TSA client from the settings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from gateway.config import Settings
from gateway.pki.crl import CrlSource, load_crl_files
from gateway.pki.load import load_certificate_files as load_pems
from gateway.pki.ocsp import OcspClient
from gateway.sign.eprescription import PROFILES, RolePolicy
from gateway.sign.service import SigningPolicy
from gateway.sign.timestamp import Rfc3161Client
from gateway.sign.xades_ltv import LongTermSource
from gateway.verify.trust import TrustConfig

__all__ = ["load_pems", "signing_policy", "trust_config", "tsa_client"]


def signing_policy(settings: Settings) -> SigningPolicy:
    s = settings.signing
    long_term = LongTermSource(
        crls=CrlSource(
            load_crl_files(list(settings.pki.crl_files)),
            fetch=settings.pki.fetch_crls,
            timeout=settings.pki.crl_timeout,
        ),
        tsa_anchors=load_pems(settings.timestamp.trust_anchors),
        certs=load_pems([*settings.pki.hpki_trust_anchors, *settings.pki.hpki_intermediates]),
        ocsp=OcspClient(timeout=settings.pki.ocsp_timeout)
        if s.long_term_revocation != "crl"
        else None,
        revocation=s.long_term_revocation,
    )
    return SigningPolicy(
        roles=RolePolicy({k: list(v) for k, v in s.role_document_types.items()}),
        profiles=dict(PROFILES),
        long_term=long_term,
        eprescription_issuer_serial_v2=s.eprescription_issuer_serial_v2,
        max_document_bytes=s.max_document_bytes,
        max_xml_depth=s.max_xml_depth,
        parallel_documents=s.parallel_documents,
    )


def trust_config(
    settings: Settings | None,
    *,
    extra_anchors: Sequence[x509.Certificate] = (),
    extra_intermediates: Sequence[x509.Certificate] = (),
    extra_crls: Sequence[Path] = (),
    extra_tsa_anchors: Sequence[x509.Certificate] = (),
    check_revocation: bool = True,
    fetch_crls: bool | None = None,
    ocsp: bool | None = None,
) -> TrustConfig:
    """Trust from the settings (when given) plus what the caller adds (CLI flags)."""
    anchors = list(extra_anchors)
    intermediates = list(extra_intermediates)
    tsa_anchors: list[x509.Certificate] = list(extra_tsa_anchors)
    crl_paths = list(extra_crls)
    fetch = bool(fetch_crls)
    use_ocsp = bool(ocsp)
    timeout = 5.0
    ocsp_timeout = 5.0
    policy = SigningPolicy()
    if settings is not None:
        anchors += load_pems(settings.pki.hpki_trust_anchors)
        intermediates += load_pems(settings.pki.hpki_intermediates)
        tsa_anchors += load_pems(settings.timestamp.trust_anchors)
        crl_paths += list(settings.pki.crl_files)
        fetch = settings.pki.fetch_crls if fetch_crls is None else fetch_crls
        timeout = settings.pki.crl_timeout
        use_ocsp = settings.pki.ocsp if ocsp is None else ocsp
        ocsp_timeout = settings.pki.ocsp_timeout
        policy = signing_policy(settings)
    trust = TrustConfig(
        anchors=anchors,
        intermediates=intermediates,
        tsa_anchors=tsa_anchors or anchors,
        crls=CrlSource(load_crl_files(crl_paths), fetch=fetch, timeout=timeout),
        ocsp=OcspClient(timeout=ocsp_timeout) if use_ocsp else None,
        check_revocation=check_revocation,
        roles=policy.roles,
        profiles=tuple(policy.profiles.values()),
        max_xml_depth=policy.max_xml_depth,
    )
    if settings is not None:
        trust.max_signatures = settings.signing.verify_max_signatures
        trust.max_references = settings.signing.verify_max_references
        trust.max_timestamps = settings.signing.verify_max_timestamps
    return trust


def tsa_client(settings: Settings) -> Rfc3161Client | None:
    url = settings.timestamp.url
    return Rfc3161Client(url=url, timeout=settings.timestamp.timeout) if url else None
