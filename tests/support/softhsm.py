"""Real SoftHSM2 tokens for tests, made by the same script operators use.

SoftHSM is a hard requirement of the test suite: when it is missing these helpers raise, they
never skip, so a machine without it cannot report a green run.

One SoftHSM configuration per pytest process: python-pkcs11 loads the module once per process
and SoftHSM reads ``SOFTHSM2_CONF`` only at ``C_Initialize``. Every test module must therefore
take its token from :func:`process_token`, which puts all tokens (one label per module) under
one directory: ``$HPKI_TEST_SOFTHSM_DIR`` when set, else a directory in pytest's session temp.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
INIT_TOKEN_SCRIPT = REPO_ROOT / "softhsm-config" / "init-token.sh"
SOFTHSM_MODULE = os.environ.get("HPKI_TEST_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
ENV_DIR = "HPKI_TEST_SOFTHSM_DIR"


@dataclass(frozen=True)
class SoftHsmToken:
    conf: Path  # the softhsm2.conf to put in SOFTHSM2_CONF
    token_dir: Path  # this token's own directory (rename it to simulate an HSM outage)
    label: str
    pin: str
    so_pin: str


class SoftHsmMissing(RuntimeError):
    """SoftHSM2 is not installed; the suite needs it (apt-get install softhsm2)."""


def require_softhsm() -> None:
    if shutil.which("softhsm2-util") is None:
        raise SoftHsmMissing("softhsm2-util not found: install SoftHSM2 (apt-get install softhsm2)")
    if not Path(SOFTHSM_MODULE).is_file():
        raise SoftHsmMissing(f"SoftHSM PKCS#11 module not found at {SOFTHSM_MODULE}")


def make_token(base: Path, label: str = "hpki-test") -> SoftHsmToken:
    """Run init-token.sh (idempotent) and describe the token it made or found."""
    require_softhsm()
    base.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
    pin_file = base / f"{safe}.pin"
    so_pin_file = base / f"{safe}.so-pin"
    result = subprocess.run(
        [str(INIT_TOKEN_SCRIPT), str(base), label, str(pin_file), str(so_pin_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"init-token.sh failed (exit {result.returncode}): {result.stderr.strip()}"
        )
    conf = Path(result.stdout.strip().splitlines()[-1])
    return SoftHsmToken(
        conf=conf,
        token_dir=_token_dir(conf, base / "tokens", label),
        label=label,
        pin=pin_file.read_text().strip(),
        so_pin=so_pin_file.read_text().strip(),
    )


def _token_dir(conf: Path, tokens_root: Path, label: str) -> Path:
    """SoftHSM names a token's directory after a UUID whose last 16 hex digits are its serial."""
    out = subprocess.run(
        ["softhsm2-util", "--show-slots"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    ).stdout
    serial = None
    current_serial = None
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Serial number":
            current_serial = value.strip()
        elif key == "Label" and value.strip() == label:
            serial = current_serial
    if not serial:
        raise RuntimeError(f"token {label!r} not listed by softhsm2-util --show-slots")
    for candidate in tokens_root.iterdir():
        if candidate.is_dir() and candidate.name.replace("-", "").endswith(serial):
            return candidate
    raise RuntimeError(f"no directory for token {label!r} (serial {serial}) in {tokens_root}")


def process_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one SoftHSM directory of this pytest process."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser().resolve()
    return tmp_path_factory.getbasetemp() / "softhsm"


def process_token(tmp_path_factory: pytest.TempPathFactory, label: str) -> SoftHsmToken:
    """A token in the process-wide SoftHSM conf, with SOFTHSM2_CONF pointing at that conf.

    SOFTHSM2_CONF is set once and deliberately left set for the rest of the run: the library
    cannot be re-initialised with another conf in this process anyway. A different conf already
    in the environment is an error rather than something to paper over.
    """
    token = make_token(process_base(tmp_path_factory), label)
    current = os.environ.get("SOFTHSM2_CONF")
    if current and Path(current).resolve() != token.conf.resolve():
        raise RuntimeError(
            f"SOFTHSM2_CONF={current} but this pytest run's SoftHSM conf is {token.conf}; "
            f"the whole run must share one conf (set {ENV_DIR} or unset SOFTHSM2_CONF)"
        )
    os.environ["SOFTHSM2_CONF"] = str(token.conf)
    return token


def failed_connects(records: list[logging.LogRecord], label: str) -> int:
    """Failed attempts to connect to token ``label`` while it is gone (or never existed), by
    their log lines: Pkcs11KeyStore logs one per attempt (WARNING for the first of an outage,
    DEBUG for the retries; the signing process forwards its own to the worker's loggers).
    Needs ``caplog.set_level(logging.DEBUG, logger="gateway.hsm")``."""
    line = f"HSM token {label!r} not found"
    return sum(r.name == "gateway.hsm" and r.getMessage() == line for r in records)
