"""A world for local signing: TEST HPKI CAs with CRLs, virtual HPKI cards they issue, and a
settings file for ``hpki-gateway local ...`` pointing at them."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from gateway.pki.crl import CrlSource, load_crl_files
from gateway.pki.issue import CertAndKey
from gateway.sandbox import testworld
from gateway.sandbox.hpki_cards import HpkiTestCard, make_hpki_card
from gateway.verify import TrustConfig

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
