"""A My Number card certificate checker without the rest of the presence service: what the
revocation tests build (``JpkiAuthenticator.check_certificate`` touches no database, audit log,
FIDO2 service or ledger)."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509

from gateway.auth.jpki import JpkiAuthenticator
from gateway.auth.jpki_revocation import JpkiRevocationSource


def certificate_checker(
    trust_anchors: Sequence[x509.Certificate],
    revocation: JpkiRevocationSource,
    *,
    accept_unavailable: bool = False,
) -> JpkiAuthenticator:
    return JpkiAuthenticator(
        db=None,  # type: ignore[arg-type] - certificate checks touch no database
        audit=None,  # type: ignore[arg-type]
        fido2=None,  # type: ignore[arg-type]
        ledger=None,  # type: ignore[arg-type]
        trust_anchors=trust_anchors,
        revocation=revocation,
        on_revocation_unavailable="accept" if accept_unavailable else "refuse",
    )
