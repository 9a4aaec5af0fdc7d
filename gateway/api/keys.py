"""Typed application keys: the one list of what the app carries."""

from __future__ import annotations

from aiohttp import web

from gateway.audit import AuditLog
from gateway.auth.activation import SignatureActivation
from gateway.auth.fido2 import Fido2Authenticator
from gateway.clock import Clock
from gateway.config import Settings
from gateway.hsm.api import KeyStore
from gateway.lifecycle.certificates import ClientCertificateService
from gateway.lifecycle.facilities import FacilityRegistry
from gateway.lifecycle.signers import SignerService
from gateway.store.db import Database

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
AUDIT = web.AppKey("audit", AuditLog)
KEYSTORE = web.AppKey("keystore", KeyStore)
FACILITIES = web.AppKey("facilities", FacilityRegistry)
SIGNERS = web.AppKey("signers", SignerService)
CERTIFICATES = web.AppKey("certificates", ClientCertificateService)
#: The injectable clock (tests walk through time; otherwise system_clock).
CLOCK: web.AppKey[Clock] = web.AppKey("clock")

# Verification trust (anchors, CRLs, role mapping): built once from the settings, since
# loading anchors and CRL files per request would cost more than most verifications.
from gateway.sign.verify import TrustConfig  # noqa: E402 - grouped with its key on purpose

VERIFY_TRUST = web.AppKey("verify_trust", TrustConfig)

FIDO2 = web.AppKey("fido2", Fido2Authenticator)
ACTIVATION = web.AppKey("activation", SignatureActivation)

from gateway.auth.jpki import JpkiAuthenticator  # noqa: E402 - grouped with its key

JPKI = web.AppKey("jpki", JpkiAuthenticator)
