"""--workers N: N processes serve one port (SO_REUSEPORT), each with its own HSM session."""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import client_context, request, serving

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


def test_two_workers_share_the_port(sandbox: dict[str, Any], hospital: dict[str, Any]) -> None:
    ctx = client_context(sandbox["server_ca"], hospital["client_cert"], hospital["client_key"])
    with serving(Path(sandbox["config"]), workers=2, tsa=False) as srv:
        pids = set()
        # Each request on a new connection: the kernel picks a worker. The port accepts as
        # soon as the first worker has bound it; the second may still be starting.
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:
            r = request(srv.port, "GET", "/health", ctx=ctx)
            assert r.status == 200, r.body
            pids.add(r.json()["worker"])
        assert len(pids) == 2, pids
        assert srv.proc is not None and srv.proc.pid not in pids
        r = request(srv.port, "POST", "/csc/v2/credentials/list", ctx=ctx, json_body={})
        assert r.status == 200
    assert srv.proc.returncode == 0, srv.logs()


def test_a_dead_worker_is_restarted(sandbox: dict[str, Any], hospital: dict[str, Any]) -> None:
    import os
    import signal

    ctx = client_context(sandbox["server_ca"], hospital["client_cert"], hospital["client_key"])
    with serving(Path(sandbox["config"]), workers=2, tsa=False) as srv:
        victim = request(srv.port, "GET", "/health", ctx=ctx).json()["worker"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        pids: set[int] = set()
        while time.monotonic() < deadline and len(pids - {victim}) < 2:
            try:
                r = request(srv.port, "GET", "/health", ctx=ctx)
            except (ConnectionError, ssl.SSLError):
                # The kernel still hashes some new connections to the dead worker's socket
                # until the replacement binds: a client retries, as this loop does.
                time.sleep(0.1)
                continue
            if r.status == 200:
                pids.add(r.json()["worker"])
        assert victim not in pids
        assert len(pids) == 2, pids
        assert "restarted worker" in srv.logs()
