"""Settings: typed, unknown keys refused by name, secrets never inline, env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.errors import ConfigError

BASE = """\
[server]
tls_cert = "tls/server.pem"
tls_key = "tls/server.key"
client_ca = "pki/ca.pem"

[hsm]
pin_file = "secrets/hsm.pin"
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, BASE), environ={})
    assert s.server.port == 8443
    assert s.server.tls_cert == tmp_path / "tls" / "server.pem"
    assert s.hsm.pin_file == tmp_path / "secrets" / "hsm.pin"
    assert s.database_url() == f"sqlite+aiosqlite:///{tmp_path}/data/gateway.db"
    assert s.server.max_body_bytes == 10 * 1024 * 1024


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("[server]\nprot = 1\n", "unknown setting 'server.prot'"),
        ("[serverr]\nport = 1\n", "unknown setting 'serverr'"),
        ('[logging]\nlevel = "LOUD"\n', "setting 'logging.level'"),
        ('[hsm]\nretry_after = "soon"\n', "setting 'hsm.retry_after'"),
    ],
)
def test_unknown_or_mistyped_key_is_named(tmp_path: Path, extra: str, needle: str) -> None:
    text = (
        BASE.replace("[server]\n", "[server]\n" + extra.split("\n", 1)[1])
        if extra.startswith("[server]")
        else BASE + extra
    )
    if extra.startswith("[hsm]"):
        text = BASE.replace("[hsm]\n", "[hsm]\n" + extra.split("\n", 1)[1])
    with pytest.raises(ConfigError) as e:
        load_settings(_write(tmp_path, text), environ={})
    assert needle in str(e.value)


def test_enum_error_lists_valid_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(_write(tmp_path, BASE + '[logging]\nformat = "xml"\n'), environ={})
    assert "'json'" in str(e.value) and "'text'" in str(e.value)


@pytest.mark.parametrize(
    ("tail", "lineno", "shown"),
    [
        ("\n[store]\nurl = sqlite\n\n[audit]\n", 10, "url = sqlite"),
        ("\n[store]\nurl = 'sqlite+aiosqlite:///x.db\n", 10, "url = 'sqlite+aiosqlite:///x.db"),
        ("[[server]]\n", 8, "[[server]]"),
    ],
)
def test_corrupted_file_names_the_line(tmp_path: Path, tail: str, lineno: int, shown: str) -> None:
    cfg = _write(tmp_path, BASE + tail)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg, environ={})
    msg = str(e.value)
    assert f"{cfg}:{lineno}: not valid TOML" in msg
    assert f"line {lineno}: {shown}" in msg


@pytest.mark.parametrize(("section", "key"), [("hsm", "pin"), ("store", "password")])
def test_inline_secret_is_refused(tmp_path: Path, section: str, key: str) -> None:
    text = BASE + f'\n[{section}]\n{key} = "123456"\n' if section != "hsm" else BASE + 'pin = "1"\n'
    with pytest.raises(ConfigError) as e:
        load_settings(_write(tmp_path, text), environ={})
    assert "never inline" in str(e.value)
    assert f"{key}_file" in str(e.value)


def test_env_overrides_typed_and_unknown(tmp_path: Path) -> None:
    cfg = _write(tmp_path, BASE)
    s = load_settings(cfg, environ={"HPKI_GATEWAY_SERVER__PORT": "9443"})
    assert s.server.port == 9443
    s = load_settings(cfg, environ={"HPKI_GATEWAY_SERVICE__SANDBOX": "true"})
    assert s.service.sandbox is True
    with pytest.raises(ConfigError) as e:
        load_settings(cfg, environ={"HPKI_GATEWAY_SERVER__PROT": "9443"})
    assert "HPKI_GATEWAY_SERVER__PROT" in str(e.value)
    assert "unknown setting 'server.prot'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg, environ={"HPKI_GATEWAY_SERVER__PORT": "70000"})
    assert "HPKI_GATEWAY_SERVER__PORT" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg, environ={"HPKI_GATEWAY_HSM__PIN": "1234"})
    assert "never inline" in str(e.value)


def test_secret_by_file_and_env(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "hsm.pin").write_text("4321\n")
    s = load_settings(_write(tmp_path, BASE), environ={})
    assert s.hsm_pin() == "4321"
    text = BASE.replace('pin_file = "secrets/hsm.pin"', 'pin_env = "MY_PIN"')
    s = load_settings(_write(tmp_path, text), environ={})
    with pytest.raises(ConfigError, match="MY_PIN is not set"):
        s.hsm_pin()


def test_no_config_given(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HPKI_GATEWAY_CONFIG"):
        load_settings(None, environ={})
    with pytest.raises(ConfigError, match="cannot read settings"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_postgres_password_is_applied_from_file(tmp_path: Path) -> None:
    (tmp_path / "db.pw").write_text("s3cret")
    text = BASE + '\n[store]\nurl = "postgresql+asyncpg://gw@db/gw"\npassword_file = "db.pw"\n'
    s = load_settings(_write(tmp_path, text), environ={})
    assert s.database_url() == "postgresql+asyncpg://gw:s3cret@db/gw"


@pytest.mark.parametrize(
    ("months", "window", "ok"), [(39, 90, True), (3, 83, True), (3, 84, False), (1, 90, False)]
)
def test_a_renewed_certificate_is_never_inside_its_renewal_window(
    tmp_path: Path, months: int, window: int, ok: bool
) -> None:
    """Before, a validity shorter than the EST renewal window was accepted: every renewed
    certificate could renew again at once, so one facility certificate could mint any number
    of certificates (each charged, each valid through its overlap)."""
    text = BASE + (f"[certificates]\nvalidity_months = {months}\nrenewal_window_days = {window}\n")
    if ok:
        s = load_settings(_write(tmp_path, text), environ={})
        assert s.certificates.renewal_window_days == window
        return
    with pytest.raises(ConfigError) as e:
        load_settings(_write(tmp_path, text), environ={})
    assert "renewal_window_days" in str(e.value) and "validity_months" in str(e.value)
