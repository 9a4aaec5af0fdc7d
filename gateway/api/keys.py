"""Typed application keys: the one list of what the app carries.

Every value that holds a resource (database engine, key store, TSA session, verification
workers) is created and closed inside a ``cleanup_ctx`` in ``gateway/app.py``.
"""

from __future__ import annotations

from aiohttp import web

from gateway.api.limits import Limiter, RefusalSummary
from gateway.audit import AuditLog
from gateway.auth.activation import SignatureActivation
from gateway.auth.fido2 import Fido2Authenticator
from gateway.auth.jpki import JpkiAuthenticator
from gateway.clock import Clock
from gateway.config import Settings
from gateway.hsm.api import KeyStore
from gateway.lifecycle.certificates import ClientCertificateService
from gateway.lifecycle.facilities import FacilityRegistry
from gateway.lifecycle.signers import SignerService
from gateway.metrics import Metrics
from gateway.signing.core import SigningService
from gateway.store.db import Database
from gateway.verify import TrustConfig
from gateway.verify.pool import VerificationPool

SETTINGS = web.AppKey("settings", Settings)
#: The injectable clock (tests walk through time; otherwise system_clock).
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
#: Origins accepted on state-changing requests (from the settings).
ALLOWED_ORIGINS: web.AppKey[frozenset[str]] = web.AppKey("allowed_origins")
DB = web.AppKey("db", Database)
AUDIT = web.AppKey("audit", AuditLog)
KEYSTORE = web.AppKey("keystore", KeyStore)
FACILITIES = web.AppKey("facilities", FacilityRegistry)
SIGNERS = web.AppKey("signers", SignerService)
CERTIFICATES = web.AppKey("certificates", ClientCertificateService)
FIDO2 = web.AppKey("fido2", Fido2Authenticator)
ACTIVATION = web.AppKey("activation", SignatureActivation)
SIGNING = web.AppKey("signing", SigningService)
#: Verification trust (anchors, CRLs, role mapping): built once from the settings, since
#: loading anchors and CRL files per request would cost more than most verifications.
VERIFY_TRUST = web.AppKey("verify_trust", TrustConfig)
VERIFY_POOL = web.AppKey("verify_pool", VerificationPool)
#: Per-address and per-facility limiters, and the refusal counter (api/limits.py).
IP_LIMITER = web.AppKey("ip_limiter", Limiter)
FACILITY_LIMITER = web.AppKey("facility_limiter", Limiter)
REFUSALS = web.AppKey("refusals", RefusalSummary)
#: The worker's Prometheus metrics (gateway/metrics.py, served by api/metrics.py).
METRICS = web.AppKey("metrics", Metrics)
JPKI = web.AppKey("jpki", JpkiAuthenticator)
