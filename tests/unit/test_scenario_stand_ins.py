"""The TSA scenarios fail inside the real RFC 3161 client, over real loopback sockets: a port
that refuses the connection (``tsa_down``) and one that accepts and never answers
(``tsa_slow``); outside a sandbox the TSA client and the key store are the real ones, unwrapped."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from gateway.api.scenario_stand_ins import (
    SWITCHED,
    ScenarioKeyStore,
    ScenarioTsa,
    scenario_keystore,
    scenario_tsa,
)
from gateway.config import Settings
from gateway.errors import GatewayError, TsaTimeout, TsaUnavailable
from gateway.hsm.api import DigestAlgorithm
from gateway.hsm.pkcs11 import Pkcs11KeyStore
from gateway.sign.timestamp import Rfc3161Client

DIGEST = hashlib.sha256(b"a prescription").digest()
#: Port 9 (discard) on loopback: nothing listens there, the real URL of this test's "TSA".
REAL_URL = "http://127.0.0.1:9/tsa"


def _settings(sandbox: bool) -> Settings:
    return Settings.model_validate(
        {
            "service": {"sandbox": sandbox},
            "server": {"tls_cert": "s.pem", "tls_key": "s.key", "client_ca": "ca.pem"},
            "hsm": {"pin_file": "hsm.pin"},
        }
    )


def test_production_keeps_the_real_parts() -> None:
    tsa = Rfc3161Client(url=REAL_URL)
    assert scenario_tsa(_settings(False), tsa) is tsa
    assert scenario_tsa(_settings(True), None) is None
    wrapped = scenario_tsa(_settings(True), tsa)
    assert isinstance(wrapped, ScenarioTsa) and wrapped.url == REAL_URL
    ks = Pkcs11KeyStore(  # never opened here
        module_path="/usr/lib/softhsm/libsofthsm2.so", token_label="none", pin="none"
    )
    assert scenario_keystore(_settings(False), ks) is ks
    assert isinstance(scenario_keystore(_settings(True), ks), ScenarioKeyStore)


async def _stamp(tsa: Rfc3161Client, switched: frozenset[str]) -> GatewayError:
    token = SWITCHED.set(switched)
    try:
        with pytest.raises((TsaUnavailable, TsaTimeout)) as err:
            await tsa.timestamp(DIGEST, DigestAlgorithm.SHA256)
        assert isinstance(err.value, GatewayError)
        return err.value
    finally:
        SWITCHED.reset(token)
        await tsa.close()


@pytest.mark.parametrize(
    ("switched", "error", "text"),
    [
        (frozenset(), TsaUnavailable, f"timestamp authority {REAL_URL} is unreachable"),
        (frozenset({"tsa_down"}), TsaUnavailable, "/sandbox-scenario/tsa_down is unreachable"),
        (frozenset({"tsa_slow"}), TsaTimeout, "/sandbox-scenario/tsa_slow did not answer within"),
    ],
)
def test_the_client_meets_the_failure(
    switched: frozenset[str], error: type[Exception], text: str
) -> None:
    tsa = ScenarioTsa(url=REAL_URL, timeout=0.5)
    e = asyncio.run(_stamp(tsa, switched))
    assert type(e) is error
    assert text in e.description, e.description
    assert e.description.endswith("nothing was signed")
