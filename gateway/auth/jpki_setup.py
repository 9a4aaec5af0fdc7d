"""Build the :class:`JpkiAuthenticator` from ``[jpki]`` settings (kept out of app.py)."""

from __future__ import annotations

from datetime import timedelta

from cryptography import x509

from gateway.audit import AuditLog
from gateway.auth.fido2 import Fido2Authenticator
from gateway.auth.jpki import JpkiAuthenticator
from gateway.auth.jpki_revocation import CrlRevocation, JpkiRevocationSource, OcspRevocation
from gateway.clock import Clock, system_clock
from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.pki.jpki import load_auth_roots
from gateway.signing.ledger import SadLedger
from gateway.store.db import Database


def jpki_anchors(settings: Settings) -> list[x509.Certificate]:
    j = settings.jpki
    anchors = load_auth_roots() if j.bundled_roots else []
    for path in j.trust_anchors:
        try:
            anchors += x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(f"jpki.trust_anchors: cannot read {path}: {e}") from e
    return anchors


def make_revocation(settings: Settings) -> JpkiRevocationSource:
    j = settings.jpki
    if j.revocation == "crl":
        if not j.crl_files and not j.crl_urls:
            raise ConfigError('jpki.revocation = "crl" needs jpki.crl_files or jpki.crl_urls')
        return CrlRevocation(files=j.crl_files, urls=j.crl_urls, timeout=j.timeout_seconds)
    return OcspRevocation(
        url=j.ocsp_url, timeout=j.timeout_seconds, cache_seconds=j.ocsp_cache_seconds
    )


def make_jpki(
    settings: Settings,
    *,
    db: Database,
    audit: AuditLog,
    fido2: Fido2Authenticator,
    ledger: SadLedger,
    clock: Clock = system_clock,
) -> JpkiAuthenticator:
    j = settings.jpki
    return JpkiAuthenticator(
        db=db,
        audit=audit,
        fido2=fido2,
        ledger=ledger,
        trust_anchors=jpki_anchors(settings),
        revocation=make_revocation(settings),
        on_revocation_unavailable=j.on_revocation_unavailable,
        challenge_ttl=timedelta(seconds=j.challenge_ttl_seconds),
        sad_ttl=timedelta(seconds=settings.activation.sad_ttl_seconds),
        clock=clock,
    )
