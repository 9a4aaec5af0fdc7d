"""The sandbox's My Number cards: a TEST JPKI CA, one card per signer, and ``sandbox cards``.

``sandbox init`` calls :func:`build_jpki_world`: DIR/jpki holds the TEST JPKI CA (the real
root's DN, see :mod:`gateway.pki.jpki`), its OCSP responder certificate and CRL (served by
``serve`` next to the TEST TSA), and DIR/cards/<signer>/ one card per signer: authentication
key (0600), certificate (AIA OCSP and CRL DP pointing at that responder) and PIN.

``sandbox cards up DIR`` starts, per signer, a private pcscd (own mount and network
namespaces, :mod:`gateway.vcard.pcscd`) and puts that signer's virtual My Number card in its
first reader, all served by one background process (``python -m gateway.vcard DIR``); the
manifest then lists ``cards``: signer, kind, reader, pin, pcsc_socket (the value for
``PCSCLITE_CSOCK_NAME``). Any PC/SC client works through that socket. ``sandbox cards down``
stops everything and empties the list. Needs root (namespaces).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.errors import ConfigError
from gateway.pki import testworld
from gateway.pki.jpki import issue_auth_cert, make_test_jpki_ca
from gateway.vcard.jpki import JpkiApplet
from gateway.vcard.pcscd import Pcscd, reader_names, start_pcscd

CARD_SLOT = 0  # slot 1 of each signer's reader pair is left for the HPKI card


def jpki_settings_toml(port: int) -> str:
    """The ``[jpki]`` and ``[test_jpki]`` sections of the sandbox's gateway.toml."""
    return f"""
[jpki]
# My Number card presence: the real JPKI roots plus the sandbox's TEST JPKI CA (same DN,
# told apart by key); revocation from the TEST OCSP responder named in each card's AIA.
trust_anchors = ["jpki/test-jpki-ca.pem"]
revocation = "ocsp"
on_revocation_unavailable = "refuse"

[test_jpki]
enabled = true
host = "127.0.0.1"
port = {port}
ca_cert = "jpki/test-jpki-ca.pem"
ocsp_cert = "jpki/ocsp.pem"
ocsp_key = "jpki/ocsp.key"
crl_file = "jpki/test-jpki-ca.crl"
"""


def _private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def write_crl(d: Path, revoked_serials: list[int], *, now: dt.datetime | None = None) -> None:
    """(Re)write the TEST JPKI CA's CRL listing ``revoked_serials``."""
    now = now or dt.datetime.now(dt.UTC)
    jpki = d / "jpki"
    key = serialization.load_pem_private_key((jpki / "test-jpki-ca.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    ca = testworld.CertAndKey(
        cert=x509.load_pem_x509_certificate((jpki / "test-jpki-ca.pem").read_bytes()), key=key
    )
    crl = testworld.make_crl(
        ca,
        revoked=[(s, now, x509.ReasonFlags.key_compromise) for s in revoked_serials],
        now=now,
        next_update=dt.timedelta(days=7),
    )
    tmp = jpki / "test-jpki-ca.crl.tmp"
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    tmp.replace(jpki / "test-jpki-ca.crl")


def build_jpki_world(
    d: Path, *, now: dt.datetime, port: int, signer_ids: list[str]
) -> dict[str, Any]:
    """The TEST JPKI CA and one card per signer; returns the manifest's ``jpki`` entry."""
    jpki = d / "jpki"
    jpki.mkdir(exist_ok=True)
    ca = make_test_jpki_ca(now=now)
    ca.write(jpki / "test-jpki-ca.pem", jpki / "test-jpki-ca.key")
    testworld.issue_ocsp_responder_cert(ca, now=now).write(jpki / "ocsp.pem", jpki / "ocsp.key")
    write_crl(d, [], now=now)
    base = f"http://127.0.0.1:{port}"
    for sid in signer_ids:
        card = d / "cards" / sid
        card.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = issue_auth_cert(
            ca, key.public_key(), now=now, ocsp_url=f"{base}/ocsp", crl_url=f"{base}/crl"
        )
        _private(
            card / "auth.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        (card / "auth.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pin = f"{int.from_bytes(os.urandom(2), 'big') % 10000:04d}"
        _private(card / "pin", pin.encode())
    return {
        "trust_anchor": str(jpki / "test-jpki-ca.pem"),
        "ocsp_url": f"{base}/ocsp",
        "crl_url": f"{base}/crl",
        "crl_file": str(jpki / "test-jpki-ca.crl"),
    }


def load_card(card_dir: Path, ca_pem: Path) -> JpkiApplet:
    key = serialization.load_pem_private_key((card_dir / "auth.key").read_bytes(), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{card_dir}/auth.key is not an RSA key")
    cert = x509.load_pem_x509_certificate((card_dir / "auth.pem").read_bytes())
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    return JpkiApplet(
        auth_key=key,
        auth_cert_der=cert.public_bytes(serialization.Encoding.DER),
        auth_ca_der=ca.public_bytes(serialization.Encoding.DER),
        pin=(card_dir / "pin").read_text().strip(),
    )


def _card_dirs(d: Path) -> list[Path]:
    return sorted(p for p in (d / "cards").iterdir() if (p / "auth.key").exists())


def _state_file(d: Path) -> Path:
    return d / "cards" / "state.json"


def cards_up(d: Path, *, timeout: float = 30.0) -> dict[str, Any]:
    """Start pcscd + vpcd + a virtual card per signer; write ``cards`` into the manifest."""
    d = d.resolve()
    manifest_path = d / "manifest.json"
    if not manifest_path.exists() or not (d / "cards").is_dir():
        raise ConfigError(f"{d} has no sandbox with cards (run `hpki-gateway sandbox init`)")
    if _state_file(d).exists():
        cards_down(d)
    entries, pids = [], []
    for card in _card_dirs(d):
        inst = start_pcscd(card / "pcscd", detach=True)
        pids.append(inst.pid)
        entries.append(
            {
                "signer": card.name,
                "kind": "jpki",
                "reader": reader_names()[CARD_SLOT],
                "pin": (card / "pin").read_text().strip(),
                "pcsc_socket": str(inst.socket_path),
            }
        )
    ready = d / "cards" / "ready"
    ready.unlink(missing_ok=True)
    log = (d / "cards" / "server.log").open("ab")
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "gateway.vcard", str(d)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()
    _state_file(d).write_text(json.dumps({"server": server.pid, "pcscd": pids}))
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            cards_down(d)
            tail = (d / "cards" / "server.log").read_text(errors="replace")[-2000:]
            raise ConfigError(f"the virtual card server did not start: {tail}")
        time.sleep(0.05)
    manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["cards"] = entries
    manifest_path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return manifest


def cards_down(d: Path) -> dict[str, Any]:
    d = d.resolve()
    state_path = _state_file(d)
    if state_path.exists():
        state = json.loads(state_path.read_text())
        server = int(state.get("server", 0))
        if server and _is_ours(server):
            os.kill(server, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _is_ours(server) and time.monotonic() < deadline:
                time.sleep(0.05)
        for pid in state.get("pcscd", []):
            Pcscd(dir=d, pid=int(pid)).stop()
        state_path.unlink()
    manifest_path = d / "manifest.json"
    manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["cards"] = []
    manifest_path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return manifest


def _is_ours(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"gateway.vcard" in cmd


def serve_cards(d: Path) -> None:
    """The background card server: insert each signer's card, then wait for SIGTERM."""
    d = d.resolve()
    state = json.loads(_state_file(d).read_text())
    readers = []
    ca_pem = d / "jpki" / "test-jpki-ca.pem"
    for card, pid in zip(_card_dirs(d), state["pcscd"], strict=True):
        inst = Pcscd(dir=card / "pcscd", pid=int(pid))
        reader = inst.reader(CARD_SLOT)
        reader.insert(load_card(card, ca_pem))
        readers.append(reader)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    (d / "cards" / "ready").write_text("ok")
    while not stop:
        time.sleep(0.2)
    for r in readers:
        r.remove(timeout=2)
