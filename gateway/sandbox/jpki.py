"""The sandbox's My Number cards: a TEST JPKI CA, one card per signer, its OCSP responder and
CRL service, and ``sandbox cards up|down``.

The TEST CA carries the real JPKI authentication root's subject name on purpose: the sandbox
then has the real-world situation of several anchors with one DN, and a rogue CA with that DN
is a meaningful attack in the tests. It is a trust anchor only where a configuration names it
(the sandbox's ``jpki.trust_anchors``).

``sandbox init`` calls :func:`build_jpki_ca` and :func:`build_cards`: DIR/jpki holds the TEST
JPKI CA, its OCSP responder certificate and CRL (served by ``serve`` next to the TEST TSA:
:func:`start_test_jpki`), and DIR/cards/<signer>/ one card per signer: authentication key
(0600), certificate (AIA OCSP and CRL DP pointing at that responder) and PIN.

``sandbox cards up DIR`` starts, per signer, a private pcscd (own mount and network
namespaces, :mod:`gateway.vcard.pcscd`) and puts that signer's virtual My Number card in its
first reader, all served by one background process (``python -m gateway.sandbox.jpki DIR``);
the manifest then lists ``cards``: signer, kind, reader, pin, pcsc_socket (the value for
``PCSCLITE_CSOCK_NAME``). A doctor or pharmacist also has a virtual HPKI card in the second
reader (``kind`` "hpki", plus ``role`` and ``certificate``; :mod:`gateway.sandbox.hpki_cards`).
Any PC/SC client works through that socket. ``sandbox cards down``
stops everything and empties the list. Needs root (namespaces).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.files import write_private
from gateway.pki.issue import CA_KEY_USAGE, CertAndKey, make_crl, random_serial
from gateway.pki.jpki import JPKI_AUTH_POLICY, JPKI_AUTH_ROOT_NAME
from gateway.sandbox.hpki_cards import has_hpki_card, hpki_manifest_entry, load_hpki_card
from gateway.sandbox.ocsp import OCSP_PATH, RESPONDER, SandboxOcspResponder
from gateway.sandbox.testworld import issue_ocsp_responder_cert
from gateway.vcard.jpki import JpkiApplet
from gateway.vcard.pcscd import Pcscd, reader_names, start_pcscd

log = logging.getLogger("gateway.sandbox.jpki")
CARD_SLOT = 0  # the My Number card; slot 1 of each signer's reader pair holds the HPKI card
HPKI_SLOT = 1
CRL_PATH = "/crl"


# -- the TEST JPKI CA ---------------------------------------------------------------------------


def _aware(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise ValueError("timezone-aware datetimes only")
    return now.astimezone(dt.UTC).replace(microsecond=0)


def make_test_jpki_ca(
    *, now: dt.datetime, validity: dt.timedelta = dt.timedelta(days=10 * 365)
) -> CertAndKey:
    """A self-signed TEST root with the real JPKI authentication root's subject name."""
    now = _aware(now)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(JPKI_AUTH_ROOT_NAME)
        .issuer_name(JPKI_AUTH_ROOT_NAME)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertAndKey(cert=cert, key=key)


def issue_auth_cert(
    ca: CertAndKey,
    public_key: rsa.RSAPublicKey,
    *,
    now: dt.datetime,
    validity: dt.timedelta = dt.timedelta(days=5 * 365),
    not_before: dt.datetime | None = None,
    ocsp_url: str | None = None,
    crl_url: str | None = None,
) -> x509.Certificate:
    """A user-authentication certificate as on a My Number card: no name, an opaque CN."""
    now = _aware(now)
    start = _aware(not_before) if not_before is not None else now - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "TEST" + secrets.token_hex(12).upper()),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(start)
        .not_valid_after(start + validity)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.CertificatePolicies([x509.PolicyInformation(JPKI_AUTH_POLICY, None)]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ocsp_url:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
                    )
                ]
            ),
            critical=False,
        )
    if crl_url:
        builder = builder.add_extension(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        [x509.UniformResourceIdentifier(crl_url)], None, None, None
                    )
                ]
            ),
            critical=False,
        )
    return builder.sign(ca.key, hashes.SHA256())


# -- the sandbox world and its cards -----------------------------------------------------------


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


def write_crl(d: Path, revoked_serials: list[int], *, now: dt.datetime | None = None) -> None:
    """(Re)write the TEST JPKI CA's CRL listing ``revoked_serials`` (the OCSP responder and
    ``GET /crl`` read it on every request)."""
    now = now or dt.datetime.now(dt.UTC)
    crl = make_crl(
        _load_ca(d),
        revoked=[(s, now, x509.ReasonFlags.key_compromise) for s in revoked_serials],
        now=now,
        next_update=dt.timedelta(days=7),
    )
    tmp = d / "jpki" / "test-jpki-ca.crl.tmp"
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    tmp.replace(d / "jpki" / "test-jpki-ca.crl")


def build_jpki_ca(d: Path, *, now: dt.datetime, port: int) -> dict[str, Any]:
    """The TEST JPKI CA, its OCSP responder and an empty CRL (before the gateway's services
    load it as a trust anchor); returns the manifest's ``jpki`` entry."""
    jpki = d / "jpki"
    jpki.mkdir(exist_ok=True)
    ca = make_test_jpki_ca(now=now)
    ca.write(jpki / "test-jpki-ca.pem", jpki / "test-jpki-ca.key")
    issue_ocsp_responder_cert(ca, now=now).write(jpki / "ocsp.pem", jpki / "ocsp.key")
    write_crl(d, [], now=now)
    base = f"http://127.0.0.1:{port}"
    return {
        "trust_anchor": str(jpki / "test-jpki-ca.pem"),
        "ocsp_url": f"{base}/ocsp",
        "crl_url": f"{base}/crl",
        "crl_file": str(jpki / "test-jpki-ca.crl"),
    }


def _load_ca(d: Path) -> CertAndKey:
    jpki = d / "jpki"
    key = serialization.load_pem_private_key((jpki / "test-jpki-ca.key").read_bytes(), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{jpki}/test-jpki-ca.key is not an RSA key")
    cert = x509.load_pem_x509_certificate((jpki / "test-jpki-ca.pem").read_bytes())
    return CertAndKey(cert=cert, key=key)


def build_cards(d: Path, *, now: dt.datetime, entry: dict[str, Any], signer_ids: list[str]) -> None:
    """One virtual My Number card per signer in DIR/cards/<signer id> (not linked)."""
    ca = _load_ca(d)
    for sid in signer_ids:
        card = d / "cards" / sid
        card.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = issue_auth_cert(
            ca, key.public_key(), now=now, ocsp_url=entry["ocsp_url"], crl_url=entry["crl_url"]
        )
        write_private(
            card / "auth.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        (card / "auth.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pin = f"{secrets.randbelow(10000):04d}"
        write_private(card / "pin", pin.encode())


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
        if has_hpki_card(card):
            entries.append(
                hpki_manifest_entry(
                    card, reader=reader_names()[HPKI_SLOT], pcsc_socket=str(inst.socket_path)
                )
            )
    ready = d / "cards" / "ready"
    ready.unlink(missing_ok=True)
    log = (d / "cards" / "server.log").open("ab")
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "gateway.sandbox.jpki", str(d)],
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
    return b"gateway.sandbox.jpki" in cmd


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
        if has_hpki_card(card):
            hpki_reader = inst.reader(HPKI_SLOT)
            hpki_reader.insert(load_hpki_card(card))
            readers.append(hpki_reader)
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


# -- the TEST JPKI OCSP responder and CRL (served next to the TEST TSA) ------------------------

_CRL_FILE = web.AppKey("crl_file", str)


async def _ocsp(request: web.Request) -> web.Response:
    if request.content_type != "application/ocsp-request":
        return web.Response(status=415, text="expected application/ocsp-request")
    der = request.app[RESPONDER].respond(await request.read())
    return web.Response(body=der, content_type="application/ocsp-response")


async def _crl(request: web.Request) -> web.Response:
    with open(request.app[_CRL_FILE], "rb") as f:  # noqa: ASYNC230 - a few KiB, test only
        body = f.read()
    return web.Response(body=body, content_type="application/pkix-crl")


def create_test_jpki_app(settings: Settings) -> web.Application:
    t = settings.test_jpki
    if t.ca_cert is None or t.ocsp_cert is None or t.ocsp_key is None or t.crl_file is None:
        raise ConfigError("test_jpki needs ca_cert, ocsp_cert, ocsp_key and crl_file")
    key = serialization.load_pem_private_key(t.ocsp_key.read_bytes(), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("test_jpki.ocsp_key must be an RSA key")
    responder = SandboxOcspResponder(
        ca_cert=x509.load_pem_x509_certificate(t.ca_cert.read_bytes()),
        signer_cert=x509.load_pem_x509_certificate(t.ocsp_cert.read_bytes()),
        signer_key=key,
        crl_files=[t.crl_file],
    )
    app = web.Application(client_max_size=16 * 1024)
    app[RESPONDER] = responder
    app[_CRL_FILE] = str(t.crl_file)
    app.router.add_post(OCSP_PATH, _ocsp)
    app.router.add_get(CRL_PATH, _crl)
    return app


async def start_test_jpki(settings: Settings) -> web.AppRunner:
    runner = web.AppRunner(create_test_jpki_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.test_jpki.host, settings.test_jpki.port).start()
    except OSError as e:
        await runner.cleanup()
        raise ConfigError(
            f"TEST JPKI cannot listen on {settings.test_jpki.host}:{settings.test_jpki.port}: "
            f"{e.strerror or e}"
        ) from e
    log.info("TEST JPKI OCSP/CRL on http://%s:%d", settings.test_jpki.host, settings.test_jpki.port)
    return runner


if __name__ == "__main__":
    serve_cards(Path(sys.argv[1]))
