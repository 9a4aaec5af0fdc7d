"""Debian Chromium driven by Playwright, for the browser tests.

One place for what every browser test sets up: the browser launched from ``/usr/bin/chromium``
(missing = failure, never a skip), Playwright's Node proxy made to trust the sandbox's server
CA (client-certificate contexts are relayed through it), a context presenting a facility's
client certificate, and a CDP virtual authenticator (CTAP2, user verification, presence
simulated) for WebAuthn.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("HPKI_TEST_CHROMIUM", "/usr/bin/chromium"))
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def chromium(server_ca: str) -> Iterator[Any]:
    """A launched Chromium whose Playwright driver trusts ``server_ca``.

    ``NODE_EXTRA_CA_CERTS`` is read when the driver starts; it is restored afterwards so that
    one test world's CA does not leak into the next.
    """
    if not CHROMIUM.is_file():
        raise RuntimeError(f"{CHROMIUM} not found: run `make test` (scripts/bootstrap.sh)")
    from playwright.sync_api import sync_playwright

    before = os.environ.get("NODE_EXTRA_CA_CERTS")
    os.environ["NODE_EXTRA_CA_CERTS"] = server_ca
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        if before is None:
            os.environ.pop("NODE_EXTRA_CA_CERTS", None)
        else:
            os.environ["NODE_EXTRA_CA_CERTS"] = before


def facility_context(browser: Any, port: int, holder: dict[str, Any] | None) -> Any:
    """A browser context presenting ``holder``'s client certificate to the gateway on ``port``
    (no certificate when ``holder`` is None)."""
    origin = f"https://localhost:{port}"
    certs = (
        [{"origin": origin, "certPath": holder["client_cert"], "keyPath": holder["client_key"]}]
        if holder
        else []
    )
    return browser.new_context(
        client_certificates=certs, accept_downloads=True, viewport={"width": 1100, "height": 900}
    )


def virtual_authenticator(context: Any, page: Any) -> tuple[Any, str]:
    """Attach a CDP virtual authenticator to ``page``; returns the CDP session and its id."""
    cdp = context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    added = cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
                "automaticPresenceSimulation": True,
            }
        },
    )
    return cdp, str(added["authenticatorId"])
