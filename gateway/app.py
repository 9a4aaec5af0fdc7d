"""create_app(settings): the one place that wires concrete classes together."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta

from aiohttp import web

from gateway.api import (
    admin,
    auth,
    csc,
    download,
    est,
    extend,
    health,
    jpki,
    openapi,
    portal,
    scenario_stand_ins,
    scenarios,
    selfservice,
    sign_doc,
    signing,
    verify,
)
from gateway.api.keys import (
    ACTIVATION,
    ALLOWED_ORIGINS,
    AUDIT,
    CERTIFICATES,
    CLOCK,
    DB,
    FACILITIES,
    FACILITY_LIMITER,
    FIDO2,
    IP_LIMITER,
    JPKI,
    KEYSTORE,
    METRICS,
    REFUSALS,
    SETTINGS,
    SIGNERS,
    SIGNING,
    VERIFY_POOL,
    VERIFY_TRUST,
)
from gateway.api.limits import Limiter, RefusalSummary, summary_task
from gateway.api.metrics import count_requests
from gateway.api.middleware import browser_guard, client_identity, request_context
from gateway.api.throttle import facility_limit, ip_limit
from gateway.audit import AuditLog
from gateway.auth.activation import SignatureActivation
from gateway.auth.fido2 import Fido2Authenticator
from gateway.auth.jpki import JpkiAuthenticator
from gateway.auth.jpki_setup import make_jpki
from gateway.clock import Clock, system_clock
from gateway.config import Settings
from gateway.errors import ConfigError, HsmUnavailable
from gateway.hsm.api import KeyStore
from gateway.lifecycle.certificates import ClientCertificateService
from gateway.lifecycle.facilities import FacilityRegistry
from gateway.lifecycle.signers import SignerService, TestIssuer
from gateway.metrics import Metrics
from gateway.pki import hpki
from gateway.pki.load import load_certificate_files
from gateway.sign.timestamp import Rfc3161Client
from gateway.signing.core import SigningService
from gateway.signing.ledger import SadLedger
from gateway.store.db import Database
from gateway.verify.pool import VerificationPool

log = logging.getLogger("gateway.app")
HSM_START_ATTEMPTS = 12


def make_keystore(settings: Settings) -> KeyStore:
    """The PKCS#11 key store, in a signing process of its own (the default) or in this one."""
    store: Callable[..., KeyStore]
    if settings.hsm.signing_process:
        from gateway.hsm.signer_process import SignerProcessKeyStore

        store = SignerProcessKeyStore
    else:
        from gateway.hsm.pkcs11 import Pkcs11KeyStore

        store = Pkcs11KeyStore
    return store(
        module_path=str(settings.hsm.module),
        token_label=settings.hsm.token_label,
        pin=settings.hsm_pin(),
        softhsm_conf=settings.hsm.softhsm_conf,
        retry_after=settings.hsm.retry_after,
        reconnect_interval=settings.hsm.reconnect_interval,
    )


def make_audit(settings: Settings, *, clock: Clock = system_clock) -> AuditLog:
    key = None
    if settings.audit.hmac_key_file is not None:
        try:
            key = settings.audit.hmac_key_file.read_bytes().strip()
        except OSError as e:
            raise ConfigError(
                f"audit.hmac_key_file: cannot read {settings.audit.hmac_key_file}: {e.strerror}"
            ) from e
        if len(key) < 32:
            raise ConfigError("audit.hmac_key_file: the key must be at least 32 bytes")
    return AuditLog(key=key, clock=clock)


def make_signers(
    settings: Settings,
    *,
    db: Database,
    audit: AuditLog,
    keystore: KeyStore | None,
    clock: Clock = system_clock,
) -> SignerService:
    pki = settings.pki
    issuer = None
    if pki.test_ca_cert is not None and pki.test_ca_key is not None:
        if not settings.service.sandbox:
            raise ConfigError("pki.test_ca_* is only allowed when service.sandbox = true")
        issuer = TestIssuer.load(
            pki.test_ca_cert,
            pki.test_ca_key,
            list(pki.hpki_trust_anchors),
            crl_url=pki.test_crl_url,
            ocsp_url=pki.test_ocsp_url,
            ca_issuers_url=pki.test_ca_issuers_url,
        )
    anchors = load_certificate_files(pki.hpki_trust_anchors)
    intermediates = load_certificate_files(pki.hpki_intermediates)
    if not anchors:
        # Secure default, so that `signer import-cert` always checks the chain.
        anchors, bundled_intermediates = hpki.default_trust("signer")
        intermediates += bundled_intermediates
    return SignerService(
        db=db,
        audit=audit,
        keystore=keystore,
        key_bits=settings.hsm.key_bits,
        test_issuer=issuer,
        trust_anchors=anchors,
        intermediates=intermediates,
        clock=clock,
    )


def make_fido2(
    settings: Settings, *, db: Database, audit: AuditLog, clock: Clock = system_clock
) -> Fido2Authenticator:
    f = settings.fido2
    return Fido2Authenticator(
        db=db,
        audit=audit,
        rp_id=settings.rp_id(),
        rp_name=f.rp_name,
        origins=settings.webauthn_origins(),
        challenge_ttl=timedelta(seconds=f.challenge_ttl_seconds),
        enrollment_validity=timedelta(days=f.enrollment_valid_days),
        max_password_tries=f.enrollment_max_password_tries,
        clock=clock,
    )


def make_activation(
    settings: Settings,
    *,
    db: Database,
    audit: AuditLog,
    fido2: Fido2Authenticator,
    ledger: SadLedger | None = None,
    clock: Clock = system_clock,
) -> SignatureActivation:
    a = settings.activation
    return SignatureActivation(
        db=db,
        audit=audit,
        fido2=fido2,
        ledger=ledger or SadLedger(db=db, audit=audit),
        sad_ttl=timedelta(seconds=a.sad_ttl_seconds),
        session_max_hours=a.signing_session_max_hours,
        session_max_signatures=a.signing_session_max_signatures,
        clock=clock,
    )


def make_signing(
    settings: Settings,
    *,
    db: Database,
    audit: AuditLog,
    ledger: SadLedger,
    keystore: KeyStore,
    tsa: Rfc3161Client | None,
    clock: Clock = system_clock,
) -> SigningService:
    from gateway.sign.setup import signing_policy

    return SigningService(
        db=db,
        audit=audit,
        ledger=ledger,
        keystore=keystore,
        clock=clock,
        # In a sandbox, the role check fails on the signer_without_role scenario (no-op otherwise).
        policy=scenario_stand_ins.scenario_policy(settings, signing_policy(settings)),
        tsa=tsa,
    )


#: Every route table of the main listener (the delivery listener has only ``download``).
ROUTES = (
    csc.routes,
    health.routes,
    auth.routes,
    signing.routes,
    sign_doc.routes,
    verify.routes,
    extend.routes,
    admin.routes,
    selfservice.routes,
    est.routes,
    jpki.routes,
    portal.routes,
    openapi.routes,
    scenarios.routes,
)


@dataclass(frozen=True, kw_only=True)
class Services:
    """The services of one deployment, wired once for the app and the CLI alike."""

    db: Database
    audit: AuditLog
    keystore: KeyStore | None
    facilities: FacilityRegistry
    certificates: ClientCertificateService
    signers: SignerService
    fido2: Fido2Authenticator
    ledger: SadLedger
    activation: SignatureActivation
    jpki: JpkiAuthenticator


def build_services(
    settings: Settings, *, keystore: KeyStore | None, clock: Clock = system_clock
) -> Services:
    """Every service from the settings. ``keystore=None``: nothing that touches a key works
    (CLI commands that need none); the app always passes one."""
    db = Database(
        settings.database_url(),
        echo=settings.store.echo,
        busy_timeout_ms=settings.store.busy_timeout_ms,
    )
    audit = make_audit(settings, clock=clock)
    facilities = FacilityRegistry(db=db, audit=audit, clock=clock)
    fido2 = make_fido2(settings, db=db, audit=audit, clock=clock)
    ledger = SadLedger(db=db, audit=audit)
    return Services(
        db=db,
        audit=audit,
        keystore=keystore,
        facilities=facilities,
        certificates=ClientCertificateService(
            settings=settings, db=db, audit=audit, registry=facilities, clock=clock
        ),
        signers=make_signers(settings, db=db, audit=audit, keystore=keystore, clock=clock),
        fido2=fido2,
        ledger=ledger,
        activation=make_activation(
            settings, db=db, audit=audit, fido2=fido2, ledger=ledger, clock=clock
        ),
        jpki=make_jpki(settings, db=db, audit=audit, fido2=fido2, ledger=ledger, clock=clock),
    )


def create_app(
    settings: Settings,
    *,
    keystore: KeyStore | None = None,
    clock: Clock = system_clock,
) -> web.Application:
    """The main app. Its services exist from start-up (``cleanup_ctx``) to clean-up."""
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[
            count_requests,
            request_context,
            ip_limit,
            client_identity,
            # The sandbox's failure scenarios; never installed in production. The certificate
            # and facility ones answer where the identity check does, the others at the handler.
            *([scenarios.scenario_identity] if settings.service.sandbox else []),
            facility_limit,
            browser_guard,
            *([scenarios.scenario_effects] if settings.service.sandbox else []),
        ],
    )
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[METRICS] = Metrics()
    app[ALLOWED_ORIGINS] = settings.webauthn_origins()
    app.cleanup_ctx.extend(
        [
            functools.partial(_store_ctx, keystore=keystore),
            _limits_ctx,
            _hsm_ctx,
            _signing_ctx,
            _verify_pool_ctx,
        ]
    )
    if settings.scheduler.enabled:
        app.cleanup_ctx.append(_scheduler_ctx)
    for table in ROUTES:
        app.add_routes(table)
    return app


# -- the resources of the main app, each opened and closed in its cleanup_ctx ------------------


async def _store_ctx(app: web.Application, *, keystore: KeyStore | None) -> AsyncIterator[None]:
    from gateway.store.db import head_revision

    settings = app[SETTINGS]
    services = build_services(
        settings,
        # In a sandbox, the key store fails on the hsm_unavailable scenario (no-op otherwise).
        keystore=scenario_stand_ins.scenario_keystore(
            settings, keystore or make_keystore(settings)
        ),
        clock=app[CLOCK],
    )
    db = services.db
    current = await db.current_revision()
    if current != head_revision():
        await db.close()
        raise ConfigError(
            f"database schema is at {current!r}, this version needs {head_revision()!r}: "
            "run `hpki-gateway db upgrade -c ...`"
        )
    assert services.keystore is not None
    app[DB] = db
    app[AUDIT] = services.audit
    app[KEYSTORE] = services.keystore
    app[FACILITIES] = services.facilities
    app[CERTIFICATES] = services.certificates
    app[SIGNERS] = services.signers
    app[FIDO2] = services.fido2
    app[ACTIVATION] = services.activation
    app[JPKI] = services.jpki
    yield
    await db.close()


async def _hsm_ctx(app: web.Application) -> AsyncIterator[None]:
    ks = app[KEYSTORE]
    # SoftHSM may not see the token while another process (a sibling worker starting at
    # the same moment, a CLI generating a key) holds its files: retry briefly at start-up.
    for attempt in range(1, HSM_START_ATTEMPTS + 1):
        try:
            await ks.open()
            break
        except HsmUnavailable as e:
            if attempt == HSM_START_ATTEMPTS:
                # Serve anyway: HSM-backed calls answer 503 until the token is back.
                log.error("HSM token not available at start-up: %s", e.description)
            else:
                await asyncio.sleep(0.25)
    yield
    await ks.close()


async def _signing_ctx(app: web.Application) -> AsyncIterator[None]:
    from gateway.sign.setup import trust_config, tsa_client

    settings = app[SETTINGS]
    # One HTTP session per worker; in a sandbox, failing on the tsa_down/tsa_slow scenarios.
    tsa = scenario_stand_ins.scenario_tsa(settings, tsa_client(settings))
    app[SIGNING] = make_signing(
        settings,
        db=app[DB],
        audit=app[AUDIT],
        ledger=app[ACTIVATION].ledger,  # one ledger: one group-commit queue per worker
        keystore=app[KEYSTORE],
        tsa=tsa,
        clock=app[CLOCK],
    )
    app[SIGNING].metrics = app[METRICS]
    app[ACTIVATION].ledger.metrics = app[METRICS]
    # Verification trust (the sandbox's TEST TSA runs as its own process: server.py).
    app[VERIFY_TRUST] = trust_config(settings)
    yield
    if tsa is not None:
        await tsa.close()


async def _verify_pool_ctx(app: web.Application) -> AsyncIterator[None]:
    # The worker processes start on first use.
    settings = app[SETTINGS]
    s = settings.signing
    pool = VerificationPool(settings, slots=s.verify_concurrency, timeout=s.verify_timeout_seconds)
    app[VERIFY_POOL] = pool
    yield
    pool.close()


async def _scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
    # Every worker runs the loop; the store makes each action happen once (scheduler.py).
    from gateway.lifecycle.scheduler import Scheduler

    stop = asyncio.Event()
    task = asyncio.create_task(
        Scheduler(service=app[CERTIFICATES]).loop(
            app[SETTINGS].scheduler.interval_seconds,
            stop,
            on_run=lambda outcome: app[METRICS].scheduler_runs.labels(outcome).inc(),
        )
    )
    yield
    stop.set()
    await task


async def _limits_ctx(app: web.Application) -> AsyncIterator[None]:
    lim = app[SETTINGS].limits
    summary = RefusalSummary(db=app[DB], audit=app[AUDIT], clock=app[CLOCK])
    app[REFUSALS] = summary
    if lim.enabled:
        app[IP_LIMITER] = Limiter(
            rate=lim.ip_rate,
            burst=lim.ip_burst,
            concurrency=lim.ip_concurrency,
            what="client address",
        )
        app[FACILITY_LIMITER] = Limiter(
            rate=lim.facility_rate,
            burst=lim.facility_burst,
            concurrency=lim.facility_concurrency,
            what="facility",
        )
    async for _ in summary_task(summary, lim.summary_seconds):
        yield


def create_delivery_app(main: web.Application) -> web.Application:
    """The download listener's app: shares the main app's services, has only the download.

    Create it once ``main`` has started, and clean it up before ``main`` (which owns the
    database).
    """
    settings = main[SETTINGS]
    app = web.Application(client_max_size=download.MAX_FORM_BYTES, middlewares=[request_context])
    app[SETTINGS] = settings
    app[CLOCK] = main[CLOCK]
    app[CERTIFICATES] = main[CERTIFICATES]  # main has started: its services exist
    app.add_routes(download.routes)
    return app
