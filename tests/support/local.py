"""A world for local signing: TEST HPKI CAs with CRLs, virtual HPKI cards they issue, a
settings file for ``hpki-gateway local ...`` pointing at them, the agent and the batch as real
subprocesses, and a SoftHSM token standing in for a card vendor's PKCS#11 module."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.pki.crl import CrlSource, load_crl_files
from gateway.pki.issue import CertAndKey
from gateway.sandbox import testworld
from gateway.sandbox.hpki_cards import HpkiTestCard, make_hpki_card
from gateway.verify import TrustConfig, verify_document
from gateway.verify.report import VerificationReport
from tests.support.gateway import CLI, REPO
from tests.support.softhsm import SOFTHSM_MODULE, make_token

PRESCRIPTION_CSV = "1,医療機関コード,1310000011\r\n2,処方,ロキソニン錠60mg,{n}錠,分3毎食後\r\n"


@dataclass
class CardWorld:
    root: CertAndKey
    ca: CertAndKey
    dir: Path

    def card(self, **kw: object) -> HpkiTestCard:
        return make_hpki_card(self.ca, **kw)  # type: ignore[arg-type]

    def config(self, *, reader: str, secret_file: Path | None = None) -> Path:
        path = self.dir / f"local-{abs(hash((reader, secret_file)))}.toml"
        lines = [
            "[server]",
            f'tls_cert = "{self.dir}/unused.pem"',
            f'tls_key = "{self.dir}/unused.key"',
            f'client_ca = "{self.dir}/unused-ca.pem"',
            "[pki]",
            f'hpki_trust_anchors = ["{self.dir}/root.pem"]',
            f'hpki_intermediates = ["{self.dir}/ca.pem"]',
            "[local]",
            f'reader = "{reader}"',
        ]
        if secret_file is not None:
            lines.append(f'secret_file = "{secret_file}"')
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def trust(self) -> TrustConfig:
        return TrustConfig(
            anchors=[self.root.cert],
            intermediates=[self.ca.cert],
            crls=CrlSource(load_crl_files([self.dir / "root.crl", self.dir / "ca.crl"])),
        )

    def xmlsec(
        self, path: Path, node_id: str = "PrescriptionSign"
    ) -> subprocess.CompletedProcess[str]:
        if shutil.which("xmlsec1") is None:
            raise RuntimeError("xmlsec1 is not installed: run scripts/bootstrap.sh")
        ids = []
        for name in ("Signature", "SignedProperties", "KeyInfo", "QualifyingProperties"):
            ids += ["--id-attr:Id", name]
        for name in ("PrescriptionDocument", "Dispensing", "DispensingDocument"):
            ids += ["--id-attr:id", name]
        return subprocess.run(
            ["xmlsec1", "--verify", *ids, "--node-id", node_id,
             "--trusted-pem", str(self.dir / "root.pem"),
             "--untrusted-pem", str(self.dir / "ca.pem"), str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip


def check_signed(world: CardWorld, path: Path) -> VerificationReport:
    """The signed e-prescription at ``path`` passes xmlsec1 and our verifier (its report)."""
    res = world.xmlsec(path)
    assert res.returncode == 0, (path.name, res.stderr)
    rep = asyncio.run(verify_document(path.read_bytes(), trust=world.trust()))
    assert rep.indication == "TOTAL-PASSED", (path.name, rep.reason)
    return rep


def make_card_world(directory: Path) -> CardWorld:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    root = testworld.make_hpki_root(now=now)
    ca = testworld.make_hpki_signing_ca(root, now=now)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "root.pem").write_bytes(root.cert_pem())
    (directory / "ca.pem").write_bytes(ca.cert_pem())
    for name, c in (("root.crl", root), ("ca.crl", ca)):
        crl = testworld.make_crl(c, revoked=[], now=now, next_update=dt.timedelta(days=2))
        (directory / name).write_bytes(crl.public_bytes(serialization.Encoding.DER))
    return CardWorld(root=root, ca=ca, dir=directory)


def write_prescriptions(directory: Path, n: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"rx-{i:05d}.csv"
        (directory / name).write_bytes(PRESCRIPTION_CSV.format(n=i + 1).encode())
        names.append(name)
    return names


class Agent:
    """``hpki-gateway local serve`` in a subprocess, called as a facility system would."""

    def __init__(
        self, url: str, secret: bytes, proc: subprocess.Popen[str], info: dict[str, Any]
    ) -> None:
        self.url, self.secret, self.proc = url, secret, proc
        self.info = info  # the start-up line it printed
        self.stdout: str | None = None  # all it wrote, once run_agent has stopped it
        self.stderr: str | None = None

    def post(self, path: str, body: Any, *, secret: bytes | None = None) -> tuple[int, Any]:
        token = self.secret if secret is None else secret
        req = urllib.request.Request(  # noqa: S310 - the agent's loopback URL
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json",
                     "Authorization": "Bearer " + token.decode()},
            method="POST",
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - loopback
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


class LocalEndpoint:
    """The local agent as the facility system sees it: loopback + secret, the card's PIN."""

    def __init__(self, agent: Agent, pin: str) -> None:
        self.agent, self.pin = agent, pin

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        return self.agent.post(path, body)

    def authorize(self, credential_id: str, hashes: list[bytes]) -> str:
        status, body = self.agent.post(
            "/csc/v2/credentials/authorize",
            {"credentialID": credential_id, "numSignatures": len(hashes),
             "hashes": [base64.b64encode(h).decode() for h in hashes],
             "hashAlgorithmOID": "2.16.840.1.101.3.4.2.1",
             "authData": [{"id": "pin", "value": self.pin}]},
        )  # fmt: skip
        assert status == 200, body
        sad: str = body["SAD"]
        return sad


@contextlib.contextmanager
def run_agent(
    cfg: Path, env: Mapping[str, str], *extra: str, secrets_never_logged: tuple[str, ...] = ()
) -> Iterator[Agent]:
    """Start the agent on a free loopback port; on exit, stop it and check that none of
    ``secrets_never_logged`` reached its output."""
    proc = subprocess.Popen(
        [*CLI, "local", "serve", "-c", str(cfg), "--port", "0", *extra],
        env=dict(env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    agent = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        info = json.loads(line)
        secret_path = Path(info["secret_file"])
        assert secret_path.stat().st_mode & 0o077 == 0  # only this user can read it
        assert info["url"].startswith("http://127.0.0.1:")
        agent = Agent(info["url"], secret_path.read_bytes().strip(), proc, info)
        yield agent
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        if agent is not None:
            agent.stdout, agent.stderr = line + out, err
        for secret in secrets_never_logged:
            assert secret not in out and secret not in err  # the PIN never reaches a log


def sign_batch_cli(
    env: Mapping[str, str],
    cfg: Path,
    src: Path,
    out: Path,
    pin: str,
    *extra: str,
    max_file_size: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """``local sign-batch --pin-stdin --json`` to completion. ``max_file_size``: no file of
    the process may grow past it (RLIMIT_FSIZE: EFBIG, as a full disk answers ENOSPC)."""

    def limit() -> None:
        if max_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_size, max_file_size))

    return subprocess.run(
        [*CLI, "local", "sign-batch", str(src), "--out", str(out), "--pin-stdin", "--json",
         "-c", str(cfg), *extra],
        input=pin + "\n", env=dict(env), cwd=REPO, capture_output=True, text=True, timeout=600,
        preexec_fn=limit,
    )  # fmt: skip


def last_json(stdout: str) -> Any:
    return json.loads(stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class VendorToken:
    """A SoftHSM token standing in for an HPKI card behind its vendor's PKCS#11 module: the
    doctor's key generated on the token (as at card issuance), the certificate the TEST CA
    issued for it, and the CA's certificate beside it."""

    module: str
    conf: Path
    label: str
    pin: str
    cert: x509.Certificate

    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}


def make_vendor_token(
    base: Path, world: CardWorld, *, label: str = "HPKI CARD", role: str = "Medical Doctor"
) -> VendorToken:
    """Made by subprocesses (softhsm2-util, pkcs11-tool): a SoftHSM configuration is read once
    per process, and the test process may hold another one."""
    token = make_token(base, label=label)
    env = {**os.environ, "SOFTHSM2_CONF": str(token.conf)}

    def tool(*args: str) -> None:
        if shutil.which("pkcs11-tool") is None:
            raise RuntimeError("pkcs11-tool is not installed (Debian: opensc)")
        res = subprocess.run(
            ["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", label,
             "--login", "--pin", token.pin, *args],
            env=env, capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(f"pkcs11-tool {args[0]}: {res.stderr.strip()}")

    tool("--keypairgen", "--key-type", "rsa:2048", "--id", "01", "--label", "HPKI signing key",
         "--sensitive", "--usage-sign")  # fmt: skip
    spki = base / "card-key.der"
    tool("--read-object", "--type", "pubkey", "--id", "01", "--output-file", str(spki))
    cert = testworld.issue_hpki_signer_cert(
        world.ca,
        public_key_der=spki.read_bytes(),
        name_romaji="Yamada Taro",
        name_kanji="山田 太郎",
        role=role,
        organization="HPKI TEST card holder",
        serial_number_attr="CARDP11",
        now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5),
        validity_days=365,
    )
    for der, oid, name in (
        (cert.public_bytes(serialization.Encoding.DER), "01", "HPKI signing certificate"),
        (world.ca.cert.public_bytes(serialization.Encoding.DER), "02", "HPKI signing CA"),
    ):
        path = base / f"cert-{oid}.der"
        path.write_bytes(der)
        tool("--write-object", str(path), "--type", "cert", "--id", oid, "--label", name)
    return VendorToken(SOFTHSM_MODULE, token.conf, label, token.pin, cert)
