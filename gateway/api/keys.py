"""Typed application keys: the one list of what the app carries."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from aiohttp import web

from gateway.audit import AuditLog
from gateway.auth.activation import SignatureActivation
from gateway.auth.fido2 import Fido2Authenticator
from gateway.config import Settings
from gateway.facilities import FacilityRegistry
from gateway.hsm.api import KeyStore
from gateway.signers import SignerService
from gateway.store.db import Database

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
AUDIT = web.AppKey("audit", AuditLog)
KEYSTORE = web.AppKey("keystore", KeyStore)
FACILITIES = web.AppKey("facilities", FacilityRegistry)
SIGNERS = web.AppKey("signers", SignerService)
FIDO2 = web.AppKey("fido2", Fido2Authenticator)
ACTIVATION = web.AppKey("activation", SignatureActivation)
#: The clock the signing endpoints use (injectable for tests; ``datetime.now(UTC)`` otherwise).
CLOCK: web.AppKey[Callable[[], datetime]] = web.AppKey("clock")
