"""The command line as an operator meets it: refusals name what is wrong."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.support.gateway import REPO, run_cli


def test_console_script_and_module_entry_point() -> None:
    assert "sandbox" in run_cli("--help").stdout
    script = Path(REPO) / ".venv" / "bin" / "hpki-gateway"
    exe = str(script) if script.exists() else shutil.which("hpki-gateway")
    assert exe, "the hpki-gateway console script is not installed"
    out = subprocess.run([exe, "signer", "add", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--facility" in out.stdout and "--config" in out.stdout


def test_serve_refuses_a_corrupted_settings_file(sandbox: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "gateway.toml"
    text = Path(sandbox["config"]).read_text().replace('port = ', 'port = = ', 1)
    bad.write_text(text)
    lineno = next(i for i, line in enumerate(text.splitlines(), 1) if "port = =" in line)
    res = run_cli("serve", "-c", str(bad), check=False)
    assert res.returncode == 2
    assert f"{bad}:{lineno}: not valid TOML" in res.stderr
    assert f"line {lineno}: port = =" in res.stderr
    assert "Traceback" not in res.stderr


def test_serve_refuses_an_unknown_key(sandbox: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "gateway.toml"
    bad.write_text(Path(sandbox["config"]).read_text().replace("[server]\n", "[server]\nhots = 1\n"))
    res = run_cli("serve", "-c", str(bad), check=False)
    assert res.returncode == 2
    assert "unknown setting 'server.hots'" in res.stderr


def test_no_settings_given() -> None:
    res = run_cli("facility", "list", check=False, env={"HPKI_GATEWAY_CONFIG": ""})
    assert res.returncode == 2
    assert "pass -c/--config PATH or set HPKI_GATEWAY_CONFIG" in res.stderr


def test_settings_from_the_environment_variable(sandbox: dict[str, Any]) -> None:
    res = run_cli("facility", "list", "--json", env={"HPKI_GATEWAY_CONFIG": sandbox["config"]})
    assert "1310000011" in res.stdout


def test_sandbox_init_refuses_to_overwrite(sandbox: dict[str, Any]) -> None:
    res = run_cli("sandbox", "init", sandbox["dir"], check=False)
    assert res.returncode == 2
    assert "already holds a sandbox" in res.stderr


def test_cert_inspect_reads_the_real_medis_certificate() -> None:
    real = REPO.parent / "shared" / "fixtures" / "real-hpki" / "medis_test_doctor.der"
    out = run_cli("cert", "inspect", str(real))
    assert "hcRole:    Medical Doctor" in out.stdout
    assert "1.2.392.100495.1.5.1.1.0.1" in out.stdout
    assert "HPKI signing profile: conforms" in out.stdout
