"""The verification environment: ``hpki-gateway sandbox init DIR`` builds a complete test world.

Layout of DIR (all paths in the manifest are absolute):
  gateway.toml            settings; ``hpki-gateway serve -c DIR/gateway.toml`` serves the world
  manifest.json           the stable contract for testers' scripts (docs/sandbox.md)
  softhsm/                SoftHSM2 conf + token directory (the signer keys live here)
  secrets/                HSM PINs, audit HMAC key (mode 0600)
  pki/                    TEST CAs: HPKI root + signing CA, facility client CA, server CA, CRLs
  tls/                    the gateway's server certificate (SAN localhost, 127.0.0.1)
  clients/<code>/         each facility's client.pem / client.key / client.<service>.p12
  clients/admin/          the administrator's client certificate
  outbox/                 password notices (PDF) and delivery mails of issued certificates
  data/gateway.db         SQLite store
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from gateway.clock import Clock, system_clock
from gateway.errors import ConfigError
from gateway.files import write_private
from gateway.pki import facility_ca
from gateway.pki.issue import CertAndKey
from gateway.sandbox import testworld
from gateway.sandbox.hpki_cards import build_hpki_cards
from gateway.sandbox.jpki import build_cards, build_jpki_ca, jpki_settings_toml
from gateway.sandbox.ocsp import OCSP_PATH
from gateway.sandbox.publish import ca_certificates, ca_issuers_url
from gateway.sandbox.tsa import CRL_PATH

if TYPE_CHECKING:
    from gateway.app import Services
    from gateway.config import Settings

MANIFEST_VERSION = 1
TOKEN_LABEL = "hpki-gateway"  # noqa: S105 - a label, not a secret
SOFTHSM_CONFIG_DIR = Path(__file__).resolve().parents[2] / "softhsm-config"

FACILITIES = [
    {
        "institution_code": "1310000011",
        "name": "TEST 中央病院 (hpki-gateway sandbox)",
        "kind": "hospital",
    },
    {
        "institution_code": "1340000019",
        "name": "TEST さくら薬局 (hpki-gateway sandbox)",
        "kind": "pharmacy",
    },
]
SIGNERS = [
    {
        "name": "Taro Shinsatsu",
        "name_kanji": "診察　太郎",
        "role": "Medical Doctor",
        "facilities": ["1310000011"],
    },
    {
        "name": "Hanako Geka",
        "name_kanji": "外科　花子",
        "role": "Medical Doctor",
        "facilities": ["1310000011"],
    },
    {
        "name": "Jiro Chozai",
        "name_kanji": "調剤　次郎",
        "role": "Pharmacist",
        "facilities": ["1340000019"],
    },
]


def init_token(softhsm_dir: Path, pin_file: Path, so_pin_file: Path) -> Path:
    """Run softhsm-config/init-token.sh; returns the softhsm2.conf path."""
    script = SOFTHSM_CONFIG_DIR / "init-token.sh"
    if not script.exists():
        raise ConfigError(f"{script} is missing: run from a checkout of hpki-gateway")
    res = subprocess.run(
        ["bash", str(script), str(softhsm_dir), TOKEN_LABEL, str(pin_file), str(so_pin_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise ConfigError(f"SoftHSM token set-up failed: {res.stderr.strip() or res.stdout}")
    return softhsm_dir / "softhsm2.conf"


#: Ports this process handed out: two picks before either is bound must still differ.
_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, for a listener bound again
    later: the sandbox's TSA and card-CA ports are written into its settings and certificates,
    then bound at every ``serve``, and tests start servers on ports picked beforehand.

    The kernel takes an outgoing connection's local port from the ephemeral range
    (``net.ipv4.ip_local_port_range``), and a port picked there with ``bind(0)`` may be taken
    by such a connection before its listener binds it (then the TSA does not start, or a test's
    server cannot). Below that range nothing takes a port but a listener. The kernel's own
    choice when the range is unknown or nothing below it is free."""
    import random
    import socket

    low = _ephemeral_low()
    for _ in range(200 if low > 2_048 else 0):
        port = random.randrange(max(1_024, low - 12_000), low)  # noqa: S311 - not a secret
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    """The first port of the ephemeral range; 0 when it cannot be read (not Linux)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _settings_toml(port: int, tsa_port: int, *, ocsp_in_aia: bool = True) -> str:
    ocsp_url = f"http://127.0.0.1:{tsa_port}/ocsp"
    ocsp_line = (
        f'test_ocsp_url = "{ocsp_url}"'
        if ocsp_in_aia
        # Real HPKI signer certificates name no responder; `sandbox init --no-ocsp-in-aia`
        # builds that shape (the responder is still served, at ocsp_urls).
        else f'# test_ocsp_url = "{ocsp_url}"  (sandbox init --no-ocsp-in-aia)'
    )
    return f"""\
# hpki-gateway settings for the sandbox (verification environment).
# Relative paths are relative to this file. Secrets are referenced by file, never inline.
[service]
name = "hpki-gateway"
description = "HPKI remote signing gateway - SANDBOX (TEST certificates only)"
sandbox = true

[server]
host = "127.0.0.1"
port = {port}
public_url = "https://localhost:{port}"
tls_cert = "tls/server.pem"
tls_key = "tls/server.key"
client_ca = "pki/facility-client-ca.pem"

[store]
url = "sqlite+aiosqlite:///data/gateway.db"

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "{TOKEN_LABEL}"
pin_file = "secrets/hsm.pin"
softhsm_conf = "softhsm/softhsm2.conf"

[pki]
hpki_trust_anchors = ["pki/hpki-root.pem"]
hpki_intermediates = ["pki/hpki-signing-ca.pem"]
test_ca_cert = "pki/hpki-signing-ca.pem"
test_ca_key = "pki/hpki-signing-ca.key"
test_crl_url = "http://127.0.0.1:{tsa_port}/crl/hpki-signing-ca.crl"
# Written in the AIA of every signer certificate the TEST CA issues; `serve` publishes the CA
# certificates and runs the TEST OCSP responder there (manifest: ca_issuers_urls, ocsp_urls).
test_ca_issuers_url = "http://127.0.0.1:{tsa_port}/ca/hpki-signing-ca.cer"
{ocsp_line}
facility_ca_cert = "pki/facility-client-ca.pem"
facility_ca_key = "pki/facility-client-ca.key"
crl_files = ["pki/hpki-signing-ca.crl", "pki/hpki-root.crl"]
fetch_crls = false
facility_crl = "pki/facility-client-ca.crl"

[timestamp]
# The TEST TSA below, served by `hpki-gateway serve` (or alone: `hpki-gateway sandbox tsa`).
url = "http://127.0.0.1:{tsa_port}/tsa"
timeout = 10.0
trust_anchors = ["pki/tsa-ca.pem"]

[test_tsa]
enabled = true
host = "127.0.0.1"
port = {tsa_port}
cert = "pki/tsa.pem"
key = "pki/tsa.key"
chain = ["pki/tsa-ca.pem"]

[certificates]
# Facility client certificates: outbox for the password notices and the two delivery mails;
# the key that wraps a PKCS#12 until it is downloaded.
outbox_dir = "outbox"
delivery_key_file = "secrets/delivery.key"

[delivery]
# The download listener (server TLS only) is off by default; to serve the download links:
# enabled = true
port = {port + 1}
public_url = "https://localhost:{port + 1}"

[scheduler]
enabled = true
interval_seconds = 300

[audit]
hmac_key_file = "secrets/audit.key"

[logging]
level = "INFO"
format = "json"
"""


async def init_sandbox(
    directory: Path,
    *,
    port: int = 8443,
    force: bool = False,
    tsa_port: int | None = None,
    clock: Clock = system_clock,
    store_url: str | None = None,
    ocsp_in_aia: bool = True,
) -> dict[str, Any]:
    """Build the world and return the manifest (also written to DIR/manifest.json).

    ``ocsp_in_aia``: the signer certificates also name the TEST OCSP responder in their AIA
    (False: like real HPKI certificates, which name none)."""
    from gateway.config import load_settings

    d = directory.resolve()
    _prepare(d, force=force)
    now = clock()
    init_token(d / "softhsm", d / "secrets" / "hsm.pin", d / "secrets" / "so.pin")
    write_private(d / "secrets" / "audit.key", secrets.token_hex(32).encode())
    write_private(d / "secrets" / "delivery.key", secrets.token_hex(32).encode())
    tsa_port = tsa_port or free_port()
    # The TEST TSA's listener also publishes the CRLs and answers OCSP (`serve` runs it), at
    # the URLs the TEST certificates name, so outside verifiers can check revocation.
    client_ca = _write_pki(d, now, pki_url=pki_base_url(tsa_port))
    jpki_port = free_port()
    toml = _settings_toml(port, tsa_port, ocsp_in_aia=ocsp_in_aia) + jpki_settings_toml(jpki_port)
    if store_url is not None:  # e.g. PostgreSQL, shared by several gateway instances
        toml = toml.replace(
            'url = "sqlite+aiosqlite:///data/gateway.db"', f"url = {json.dumps(store_url)}", 1
        )
    (d / "gateway.toml").write_text(toml, encoding="utf-8")
    jpki_entry = build_jpki_ca(d, now=now, port=jpki_port)
    settings = load_settings(d / "gateway.toml", environ={})
    seeded = await _seed_store(settings, d, client_ca, clock)
    build_cards(d, now=now, entry=jpki_entry, signer_ids=[str(s["id"]) for s in seeded["signers"]])
    build_hpki_cards(d, now=now, signers=seeded["signers"])
    pki = d / "pki"
    admin = seeded["admin"]
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "url": settings.server.public_url,
        "server_ca": str(pki / "server-ca.pem"),
        "hpki_trust_anchors": [str(pki / "hpki-root.pem")],
        "hpki_intermediates": [str(pki / "hpki-signing-ca.pem")],
        "tsa_url": settings.timestamp.url,
        "tsa_trust_anchors": [str(pki / "tsa-ca.pem")],
        "config": str(d / "gateway.toml"),
        "facilities": seeded["facilities"],
        "signers": seeded["signers"],
        "admin": {
            "name": "sandbox-officer",
            "client_cert": str(admin.cert_path),
            "client_key": str(admin.key_path),
            "client_p12": str(admin.p12_path),
            "p12_password": admin.p12_password,
        },
        "crls": {p.stem: str(p) for p in sorted(pki.glob("*.crl"))},
        # Where `serve` publishes each CRL and runs the TEST OCSP responder (plain HTTP).
        "crl_urls": {
            p.stem: f"{pki_base_url(tsa_port)}{CRL_PATH}/{p.name}"
            for p in sorted(pki.glob("*.crl"))
        },
        "ocsp_urls": {"hpki-signing-ca": f"{pki_base_url(tsa_port)}{OCSP_PATH}"},
        # Whether the signer certificates name that responder in their AIA.
        "ocsp_in_aia": ocsp_in_aia,
        # Where `serve` publishes each CA certificate (DER), the AIA caIssuers URLs.
        "ca_issuers_urls": {
            name: ca_issuers_url(pki_base_url(tsa_port), name)
            for name in sorted(Path(n).stem for n in ca_certificates(pki))
        },
        # Signed e-prescriptions and dispensing results, one per level (ES-BES .. ES-A).
        "samples": seeded["samples"],
        "outbox": str(d / "outbox"),
        "jpki": jpki_entry,
        "cards": [],
    }
    (d / "manifest.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return manifest


def _prepare(d: Path, *, force: bool) -> None:
    if (d / "manifest.json").exists() and not force:
        raise ConfigError(f"{d} already holds a sandbox (use --force to rebuild it)")
    if force and d.exists():
        subdirs = ("softhsm", "secrets", "pki", "tls", "clients", "data", "outbox", "jpki", "cards")
        for sub in subdirs:
            shutil.rmtree(d / sub, ignore_errors=True)
        for f in ("gateway.toml", "manifest.json"):
            (d / f).unlink(missing_ok=True)
    d.mkdir(parents=True, exist_ok=True)


def pki_base_url(tsa_port: int) -> str:
    return f"http://127.0.0.1:{tsa_port}"


def _write_pki(d: Path, now: datetime, *, pki_url: str) -> CertAndKey:
    """The TEST CAs, their empty CRLs, the TEST TSA and the server certificate, under
    ``pki/`` and ``tls/``; returns the facility client CA (the store seeding issues from it)."""
    pki = d / "pki"
    pki.mkdir(exist_ok=True)
    root = testworld.make_hpki_root(now=now)
    sign_ca = testworld.make_hpki_signing_ca(
        root,
        now=now,
        crl_url=f"{pki_url}{CRL_PATH}/hpki-root.crl",
        ca_issuers_url=ca_issuers_url(pki_url, "hpki-root"),
    )
    client_ca = testworld.make_client_ca(now=now)
    server_ca = testworld.make_server_ca(now=now)
    root.write(pki / "hpki-root.pem", pki / "hpki-root.key")
    sign_ca.write(pki / "hpki-signing-ca.pem", pki / "hpki-signing-ca.key")
    client_ca.write(pki / "facility-client-ca.pem", pki / "facility-client-ca.key")
    server_ca.write(pki / "server-ca.pem", pki / "server-ca.key")
    for name, ca in (
        ("hpki-root", root),
        ("hpki-signing-ca", sign_ca),
        ("facility-client-ca", client_ca),
        ("server-ca", server_ca),
    ):
        crl = testworld.make_crl(ca, revoked=[], now=now, next_update=timedelta(days=7))
        (pki / f"{name}.crl").write_bytes(crl.public_bytes(serialization.Encoding.DER))
    # The TEST TSA: its own root (real TSAs are not HPKI), a certificate with the
    # timeStamping EKU only (RFC 3161 §2.3).
    tsa_ca = testworld.make_tsa_ca(now=now)
    tsa = testworld.issue_tsa_cert(tsa_ca, now=now)
    tsa_ca.write(pki / "tsa-ca.pem", pki / "tsa-ca.key")
    tsa.write(pki / "tsa.pem", pki / "tsa.key")
    server = testworld.issue_server_cert(
        server_ca,
        hostnames=["localhost"],
        ips=["127.0.0.1", "::1"],
        now=now,
        validity=timedelta(days=825),
    )
    tls = d / "tls"
    tls.mkdir(exist_ok=True)
    (tls / "server.pem").write_bytes(server.cert_pem() + server_ca.cert_pem())
    write_private(tls / "server.key", server.key_pem())
    return client_ca


async def _seed_store(
    settings: Settings, d: Path, client_ca: CertAndKey, clock: Clock
) -> dict[str, Any]:
    """Facilities with their client certificates, signers with keys, certificates and
    enrolment codes, and the administrator: through the services the gateway itself uses."""
    from gateway.app import build_services, make_keystore

    services = build_services(settings, keystore=make_keystore(settings), clock=clock)
    assert services.keystore is not None
    actor = "sandbox:init"
    now = clock()
    try:
        await services.db.migrate()
        await services.keystore.open()
        facilities = [
            await _seed_facility(services, spec, d, client_ca, settings, now) for spec in FACILITIES
        ]
        signers = [await _seed_signer(services, spec) for spec in SIGNERS]
        samples = await _samples(services, signers, d, settings)
        admin = facility_ca.issue(
            client_ca,
            out_dir=d / "clients" / "admin",
            common_name="admin sandbox-officer",
            institution_code=None,
            organization="hpki-gateway administrators",
            service_name=settings.service.name,
            now=now,
        )
        await services.facilities.register_certificate(
            admin.cert, admin_name="sandbox-officer", actor=actor
        )
    finally:
        await services.keystore.close()
        await services.db.close()
    return {"facilities": facilities, "signers": signers, "admin": admin, "samples": samples}


async def _samples(
    services: Services, signers: list[dict[str, Any]], d: Path, settings: Settings
) -> dict[str, dict[str, str]]:
    """Signed e-prescriptions and dispensing results at every level (gateway/sandbox/samples.py)."""
    from gateway.sandbox.samples import write_samples

    async def first(role: str) -> Any:
        signer = await services.signers.get(next(s["id"] for s in signers if s["role"] == role))
        return signer.credentials[0]

    assert services.keystore is not None
    return await write_samples(
        d,
        settings,
        keystore=services.keystore,
        doctor=await first("Medical Doctor"),
        pharmacist=await first("Pharmacist"),
        db=services.db,
        audit=services.audit,
    )


async def _seed_facility(
    services: Services,
    spec: dict[str, str],
    d: Path,
    client_ca: CertAndKey,
    settings: Settings,
    now: datetime,
) -> dict[str, Any]:
    actor = "sandbox:init"
    reg = await services.facilities.add(
        institution_code=spec["institution_code"], name=spec["name"], kind=spec["kind"], actor=actor
    )
    issued = facility_ca.issue(
        client_ca,
        out_dir=d / "clients" / reg.institution_code,
        common_name=reg.name,
        institution_code=reg.institution_code,
        service_name=settings.service.name,
        now=now,
    )
    await services.facilities.register_certificate(
        issued.cert, institution_code=reg.institution_code, actor=actor, downloaded=True
    )
    return {
        "institution_code": reg.institution_code,
        "name": reg.name,
        "kind": reg.kind,
        "client_cert": str(issued.cert_path),
        "client_key": str(issued.key_path),
        "client_p12": str(issued.p12_path),
        "p12_password": issued.p12_password,
    }


async def _seed_signer(services: Services, spec: dict[str, Any]) -> dict[str, Any]:
    actor = "sandbox:init"
    s = await services.signers.add(
        name=str(spec["name"]),
        name_kanji=str(spec["name_kanji"]),
        role=str(spec["role"]),
        facilities=list(spec["facilities"]),
        organization="HPKI TEST FACILITY",
        actor=actor,
    )
    enrol = await services.fido2.issue_enrollment(s.id, actor=actor)
    return {
        "id": s.id,
        "name": s.name,
        "name_kanji": s.name_kanji,
        "role": s.role,
        "credential_id": s.credentials[0].id,
        "facilities": s.facilities,
        # One-time FIDO2 enrolment (register at /enroll); TEST world only:
        # a real deployment hands code and password over separately.
        "enrollment_code": enrol.code,
        "enrollment_password": enrol.password,
        "enrollment_expires_at": enrol.expires_at.isoformat(),
    }
