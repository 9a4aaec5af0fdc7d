"""The TLS listener and worker processes.

TLS >= 1.2 with CERT_REQUIRED against the client CA bundle: a connection without a certificate
from that bundle fails in the handshake, before any HTTP. ``--workers N`` starts N processes that
each bind the same port with SO_REUSEPORT; the kernel spreads connections over them, and each
has its own PKCS#11 session and database pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import select
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

from aiohttp import web

from gateway import eventloop
from gateway.config import Settings, load_settings
from gateway.errors import ConfigError
from gateway.lifetime import freeze_start_up_objects
from gateway.logs import setup_logging

log = logging.getLogger("gateway.server")


def make_ssl_context(settings: Settings) -> ssl.SSLContext:
    s = settings.server
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if s.min_tls_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2 AEAD with forward secrecy only
    try:
        ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"server.tls_cert/tls_key: cannot load {s.tls_cert}: {e}") from e
    try:
        ctx.load_verify_locations(cafile=str(s.client_ca))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"server.client_ca: cannot load {s.client_ca}: {e}") from e
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def make_delivery_ssl_context(settings: Settings) -> ssl.SSLContext:
    """Server TLS only: a facility fetching its first certificate has no client certificate."""
    d = settings.delivery
    cert = d.tls_cert or settings.server.tls_cert
    key = d.tls_key or settings.server.tls_key
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"delivery.tls_cert/tls_key: cannot load {cert}: {e}") from e
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _serve(settings: Settings, *, reuse_port: bool, index: int = 0) -> None:
    from gateway.app import create_app, create_delivery_app

    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    delivery_runner = None
    if settings.delivery.enabled:
        delivery_runner = web.AppRunner(
            create_delivery_app(app), access_log=None, handle_signals=False
        )
        await delivery_runner.setup()
        await web.TCPSite(
            delivery_runner,
            settings.delivery.host,
            settings.delivery.port,
            ssl_context=make_delivery_ssl_context(settings),
            reuse_port=reuse_port,
        ).start()
        log.info(
            "delivery listener (downloads only) on %s:%s",
            settings.delivery.host,
            settings.delivery.port,
        )
    metrics_runner = None
    if settings.metrics.port:
        from gateway.api.metrics import metrics_app

        metrics_runner = web.AppRunner(metrics_app(app), access_log=None, handle_signals=False)
        await metrics_runner.setup()
        port = settings.metrics.port + index
        await web.TCPSite(metrics_runner, settings.metrics.host, port).start()
        log.info("metrics on http://%s:%s/metrics", settings.metrics.host, port)
    # The main listener opens last: whoever waits for its port (a supervisor, a load
    # balancer's health check, the tests) finds the delivery and metrics listeners open.
    site = web.TCPSite(
        runner,
        settings.server.host,
        settings.server.port,
        ssl_context=make_ssl_context(settings),
        reuse_port=reuse_port,
        backlog=1024,
    )
    await site.start()
    log.info(
        "serving %s on %s:%s (pid %s, event loop %s)",
        settings.server.public_url,
        settings.server.host,
        settings.server.port,
        os.getpid(),
        type(asyncio.get_running_loop()).__module__.split(".")[0],
    )
    freeze_start_up_objects()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if delivery_runner is not None:
            await delivery_runner.cleanup()
        await runner.cleanup()


def _worker(config_path: str | None, index: int, reuse_port: bool, parent: int = 0) -> None:
    from gateway.lifetime import die_with_parent

    # A worker ends with the supervisor, even a kill -9'd one: no orphan holding the port.
    if parent and not die_with_parent(parent):
        return
    settings = load_settings(config_path)
    setup_logging(settings.logging.level, settings.logging.format)
    try:
        eventloop.run(
            _serve(settings, reuse_port=reuse_port, index=index), settings.server.event_loop
        )
    except ConfigError as e:
        log.error("worker %s cannot start: %s", index, e)
        sys.exit(2)


async def _migrate(settings: Settings) -> None:
    from gateway.store.db import Database

    db = Database(settings.database_url())
    try:
        await db.migrate()
    finally:
        await db.close()


def serve(config_path: str | None, *, workers: int | None = None) -> int:
    """Run the gateway until SIGTERM/SIGINT. Returns the exit code."""
    settings = load_settings(config_path)
    setup_logging(settings.logging.level, settings.logging.format)
    n = workers or settings.server.workers
    make_ssl_context(settings)  # fail fast on TLS material before forking
    if settings.delivery.enabled:
        if settings.delivery.port == settings.server.port:
            raise ConfigError("delivery.port must differ from server.port")
        make_delivery_ssl_context(settings)
    asyncio.run(_migrate(settings))
    with _test_tsa(config_path, settings):
        if n == 1:
            eventloop.run(_serve(settings, reuse_port=False), settings.server.event_loop)
            return 0
        return _supervise(config_path, n)


@contextlib.contextmanager
def _test_tsa(config_path: str | None, settings: Settings) -> Iterator[None]:
    """Sandbox only: the TEST TSA runs as one process of its own next to the workers (not in
    each worker: it would load pyHanko into every worker and bind its port N times)."""
    if not settings.test_tsa.enabled:
        yield
        return
    args = [sys.executable, "-m", "gateway", "sandbox", "tsa", "--with-parent", str(os.getpid())]
    if config_path is not None:
        args += ["-c", config_path]
    # The TSA ends with this process however it ends: PR_SET_PDEATHSIG and EOF on its stdin
    # (gateway/lifetime.py). It says "ready" on stdout once it listens; a port it cannot have
    # is one error line from it and an exit, never a stale listener answering in its place.
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        log.error("the TEST TSA did not start (exit %s); B-T signatures will fail", proc.returncode)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# A worker that dies is restarted; more than this many deaths in RESTART_WINDOW seconds means
# something is wrong with the deployment, and the whole gateway stops instead of flapping.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


def _supervise(config_path: str | None, n: int) -> int:
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def spawn(i: int) -> multiprocessing.process.BaseProcess:
        p = ctx.Process(
            target=_worker,
            args=(config_path, i, True, os.getpid()),
            name=f"hpki-gateway-worker-{i}",
        )
        p.start()
        return p

    procs = {i: spawn(i) for i in range(n)}
    log.info("started %s workers: %s", n, [p.pid for p in procs.values()])

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    deaths: list[float] = []
    code = 0
    while procs:
        multiprocessing.connection.wait([p.sentinel for p in procs.values()], timeout=1.0)
        for i, p in list(procs.items()):
            if p.is_alive():
                continue
            p.join()
            del procs[i]
            if stopping:
                if p.exitcode not in (0, -signal.SIGTERM):
                    code = 1
                continue
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < RESTART_WINDOW] + [now]
            log.error("worker %s (pid %s) exited with %s", i, p.pid, p.exitcode)
            if len(deaths) > MAX_RESTARTS:
                log.error("workers keep dying (%s in %ss): stopping", len(deaths), RESTART_WINDOW)
                code = 1
                _stop(signal.SIGTERM, None)
                continue
            procs[i] = spawn(i)
            log.warning("restarted worker %s as pid %s", i, procs[i].pid)
    return code
