"""Real-process helpers: run the CLI, serve a sandbox, call it over real mTLS sockets."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "gateway"]


def free_port() -> int:
    """A free port below the ephemeral range (``gateway.sandbox.world.free_port``): no
    outgoing connection can take it before the server binds it."""
    from gateway.sandbox.world import free_port as below_ephemeral

    return below_ephemeral()


def run_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"hpki-gateway {' '.join(args)} exited {res.returncode}\n"
            f"stdout: {res.stdout}\nstderr: {res.stderr}"
        )
    return res


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def client_context(
    server_ca: str, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=server_ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def request(
    port: int,
    method: str,
    path: str,
    *,
    ctx: ssl.SSLContext,
    body: bytes | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    host: str = "localhost",
    json_content_type: bool = True,
    timeout: float = 30,
) -> Response:
    """One request. POST/PUT/PATCH/DELETE carry ``Content-Type: application/json`` unless the
    caller sets another one or passes ``json_content_type=False`` (to send none at all)."""
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
        unsafe = method.upper() in ("POST", "PUT", "PATCH", "DELETE")
        if json_content_type and unsafe and not any(k.lower() == "content-type" for k in hdrs):
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


class Server:
    """``hpki-gateway serve`` in a subprocess, stopped with SIGTERM."""

    def __init__(
        self,
        config: Path,
        port: int,
        *,
        workers: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.port = port
        self.workers = workers
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.parent / f"serve-{port}.log"

    def start(self, timeout: float = 120.0) -> None:
        args = [*CLI, "serve", "-c", str(self.config)]
        if self.workers:
            args += ["--workers", str(self.workers)]
        env = {**os.environ, "HPKI_GATEWAY_SERVER__PORT": str(self.port), **self.extra_env}
        self._logf = self.log.open("wb")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self._logf, stderr=self._logf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"gateway exited {self.proc.returncode}: {self.log.read_text()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"gateway did not listen on {self.port}: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "_logf"):
            self._logf.close()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serving(
    config: Path,
    *,
    workers: int | None = None,
    env: dict[str, str] | None = None,
    tsa: bool = True,
) -> Iterator[Server]:
    """A gateway on ``config``, stopped afterwards. ``tsa=False`` for a second gateway on a
    world that has one already (the session's): its TEST TSA would take the world's TSA port
    if it came first, and take it away when it stops, from the gateway that stays."""
    if not tsa:
        env = {"HPKI_GATEWAY_TEST_TSA__ENABLED": "false", **(env or {})}
    srv = Server(config, free_port(), workers=workers, env=env)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@contextmanager
def serving_with_delivery(config: Path) -> Iterator[tuple[Server, int]]:
    """A gateway with its delivery listener on (server TLS only, the one-time downloads):
    the server and the delivery port."""
    dport = free_port()
    env = {
        "HPKI_GATEWAY_DELIVERY__ENABLED": "true",
        "HPKI_GATEWAY_DELIVERY__PORT": str(dport),
        "HPKI_GATEWAY_DELIVERY__PUBLIC_URL": f"https://localhost:{dport}",
    }
    with serving(config, env=env, tsa=False) as srv:
        # The main port opens last (server._serve): once it answers, so does the delivery
        # port, at once, no retry.
        socket.create_connection(("127.0.0.1", dport), timeout=5).close()
        yield srv, dport


@contextmanager
def own_world(d: Path) -> Iterator[tuple[dict[str, Any], Server]]:
    """A sandbox world of a test module's own (built in ``d``) and its gateway, served: for
    tests that change what the session's shared world must keep."""
    run_cli("sandbox", "init", str(d), "--port", str(free_port()))
    manifest: dict[str, Any] = json.loads((d / "manifest.json").read_text())
    manifest["dir"] = str(d)
    with serving(Path(manifest["config"])) as srv:
        yield manifest, srv
