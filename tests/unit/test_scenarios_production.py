"""Failure scenarios exist only in a sandbox: production settings install no effect and refuse
every switch."""

from __future__ import annotations

import pytest

from gateway.api import scenarios
from gateway.app import create_app
from gateway.config import Settings
from gateway.errors import AccessDenied


def _settings(sandbox: bool) -> Settings:
    return Settings.model_validate(
        {
            "service": {"sandbox": sandbox},
            "server": {"tls_cert": "s.pem", "tls_key": "s.key", "client_ca": "ca.pem"},
            "hsm": {"pin_file": "hsm.pin"},
        }
    )


def test_production_installs_no_scenario_effect() -> None:
    for middleware in (scenarios.scenario_identity, scenarios.scenario_effects):
        assert middleware not in create_app(_settings(False)).middlewares
        assert middleware in create_app(_settings(True)).middlewares


def test_production_refuses_every_switch() -> None:
    with pytest.raises(AccessDenied, match="only in a sandbox"):
        scenarios._require_sandbox(_settings(False))
    scenarios._require_sandbox(_settings(True))
