"""What authentication hands to signing, and what one signing request spends of it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from gateway.hsm.api import DigestAlgorithm

#: Presence methods: how the signer proved to be present (``sad.presence``).
PRESENCE_FIDO2 = "fido2"
PRESENCE_JPKI = "jpki"  # My Number card signature (JPKI), SCAL 2
PRESENCE_CARD_PIN = "card_pin"


@dataclass(frozen=True, kw_only=True)
class Caller:
    """Who relays a ceremony or a signing request: the facility (or admin) of the mTLS client
    certificate."""

    actor: str
    facility_id: int | None
    institution_code: str | None


@dataclass(frozen=True, kw_only=True)
class Grant:
    """What an authenticator proved: this signer, present by ``presence``, approved signing
    ``count`` signatures with ``credential_id`` at ``facility_id``.

    SCAL 2 (``scal == "2"``): exactly the multiset ``hashes`` under ``hash_algorithm``.
    SCAL 1 (a signing session): ``hashes`` is empty and any ``count`` digests may be signed.
    ``evidence`` is what the audit record of the issue keeps about the presence check (e.g.
    the FIDO2 authenticator and its sign count); ``presence_ref`` names the thing that proved
    presence, so removing it can end what it granted.
    """

    facility_id: int
    signer_id: str
    credential_id: str
    hashes: tuple[bytes, ...]
    hash_algorithm: DigestAlgorithm | None
    count: int
    scal: str
    presence: str
    presence_ref: str | None
    ttl: timedelta
    evidence: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SignatureGrant:
    """What one request spent of a stored grant: sign exactly ``hashes`` with ``key_id``."""

    facility_id: int
    institution_code: str
    signer_id: str
    credential_id: str
    key_id: str
    hashes: tuple[bytes, ...]
    algorithm: DigestAlgorithm
    scal: str
    presence: str
    #: The SAD spent (its row id, what its ``sad.issue`` event names): each signature event
    #: names it, so that ``audit verify`` ties the signature to the approval it spent.
    sad: int | None = None
    #: The credential's certificate and issuers as read in the spending transaction (what a
    #: signature embeds; signHash does not need them).
    certificate_der: bytes | None = field(default=None, repr=False, compare=False)
    chain_pem: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class IssuedSad:
    token: str  # returned to the client once; only its hash is stored
    expires_in: int
    scal: str
    num_signatures: int
