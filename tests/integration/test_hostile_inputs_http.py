"""Inputs a security review sent that answered 500 (or, for /extend, a TSA timestamp over junk):
each is now a clear 4xx in the route's error format, with the request id, and leaves neither a
stack trace nor an ERROR line in the log.

Real processes only: the session's gateway, a second one with the delivery listener on, and
``hpki-gateway local serve`` over pcscd with a virtual HPKI card.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import Response, Server, client_context, free_port, request

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


def _problem(r: Response, status: int, code: str) -> dict[str, Any]:
    """The answer is ``status`` in problem+json with ``code`` and the request id."""
    assert r.status == status, r.body[:300]
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    assert body["request_id"] == r.headers["x-request-id"]
    return body


def _quiet_since(srv: Server, before: int) -> None:
    """What the gateway logged since ``before`` has no stack trace and no unhandled error."""
    logged = srv.logs()[before:]
    assert "Traceback" not in logged
    assert "unhandled" not in logged, logged[-2000:]


# -- 1. a Content-Type the 415 text could not carry -----------------------------------------------


@pytest.mark.parametrize("path", ["/csc/v2/info", "/verify"])
def test_a_non_utf8_content_type_is_a_415_with_the_request_id(
    gateway: Server, hospital_ctx: ssl.SSLContext, path: str
) -> None:
    before = len(gateway.logs())
    # http.client sends header values as Latin-1: this is the raw byte 0xff on the wire.
    r = request(
        gateway.port,
        "POST",
        path,
        ctx=hospital_ctx,
        body=b"{}",
        headers={"Content-Type": "text/\xff"},
    )
    assert r.status == 415, r.body[:300]
    body = r.json()
    assert body["request_id"] == r.headers["x-request-id"]
    if path.startswith("/csc/"):
        assert body["error"] == "unsupported_media_type"
        text = body["error_description"]
    else:
        assert body["code"] == "unsupported_media_type"
        text = body["detail"]
    assert "request bodies must be JSON" in text and "text/" in text
    _quiet_since(gateway, before)


# -- 2. the delivery listener's form -----------------------------------------------------------


@pytest.fixture(scope="module")
def delivery(sandbox: dict[str, Any]) -> Iterator[tuple[Server, int]]:
    dport = free_port()
    srv = Server(
        Path(sandbox["config"]),
        free_port(),
        env={
            "HPKI_GATEWAY_DELIVERY__ENABLED": "true",
            "HPKI_GATEWAY_DELIVERY__PORT": str(dport),
            "HPKI_GATEWAY_DELIVERY__PUBLIC_URL": f"https://localhost:{dport}",
        },
    )
    srv.start()
    yield srv, dport
    srv.stop()


_BOUNDARY = "----hostile" + "7" * 8
UNREADABLE_FORMS = {
    "multipart-without-boundary": ("multipart/form-data", b"password=secret"),
    "truncated-multipart": (
        f"multipart/form-data; boundary={_BOUNDARY}",
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="password"\r\n\r\nsecr'.encode(),
    ),
    "unknown-charset": ("application/x-www-form-urlencoded; charset=nope", b"password=secret"),
    "not-utf8": ("application/x-www-form-urlencoded", b"password=\xff\xfe"),
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE_FORMS))
def test_an_unreadable_download_form_is_a_400_without_an_error_log(
    delivery: tuple[Server, int], sandbox: dict[str, Any], kind: str
) -> None:
    srv, dport = delivery
    ctype, body = UNREADABLE_FORMS[kind]
    before = len(srv.logs())
    r = request(
        dport,
        "POST",
        "/download/" + "A" * 32,
        ctx=client_context(sandbox["server_ca"]),  # no client certificate: anyone
        body=body,
        headers={"Content-Type": ctype},
    )
    answer = _problem(r, 400, "invalid_request")
    assert "form" in answer["detail"]
    _quiet_since(srv, before)
