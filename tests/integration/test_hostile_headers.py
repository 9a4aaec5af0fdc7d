"""Malformed request lines and headers: a clean 400, and the log has neither a traceback nor
the raw bytes (an escape sequence in a log line rewrites an operator's terminal)."""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.support.gateway import Server

pytestmark = [pytest.mark.tls]

HOSTILE = {
    "escape-in-request-id": b"X-Request-ID: \x1b[2J\x1b[31mowned\x1b[0m\r\n",
    "nul-in-value": b"X-Request-ID: a\x00b\r\n",
    "bad-header-name": b"X Request\x1b[1m: 1\r\n",
    "obs-fold": b"X-Request-ID: a\r\n \x1b[5mfolded\r\n",
    "huge-header": b"X-Request-ID: " + b"\x1b" * 20_000 + b"\r\n",
}


def _raw(port: int, ctx: ssl.SSLContext, head: bytes) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + head + b"\r\n")
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = tls.recv(4096)
            if not chunk:
                break
            out += chunk
        return out


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_malformed_header_is_a_quiet_400(
    gateway: Server, hospital_ctx: ssl.SSLContext, kind: str
) -> None:
    before = len(gateway.logs())
    reply = _raw(gateway.port, hospital_ctx, HOSTILE[kind])
    assert reply.split(b" ")[1].startswith(b"4"), reply[:200]
    # The session gateway writes its log as the requests arrive; what this request added:
    logged = gateway.logs()[before:]
    assert "Traceback" not in logged
    assert "\x1b" not in logged and "\\x1b" not in logged and "\\u001b" not in logged
