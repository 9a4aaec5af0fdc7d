"""``hpki-gateway client renew``: the facility's own system renews its client certificate.

Run daily from cron (or a Windows task) on the facility's system. Each run:
1. reads the current certificate and computes the days left (JST calendar days);
2. prints the warning of the day on the reminder schedule (90, 60, 30, 15, 7 days, then daily);
3. inside the renewal window, makes a new key and a PKCS#10 request at the facility (the key
   never leaves it), sends it to the gateway's EST ``simplereenroll`` authenticated by the
   current certificate, checks the answer (the same subject and issuer, the new key), and
   writes the new key and certificate atomically, after a backup of the old ones. The new key
   is kept (``<key>.<old serial>.pending``, 0600) before it is sent, until its certificate is
   installed: if the answer is lost, the next run asks again for the same key and the gateway
   answers with the certificate it issued.
Exit codes: 0 nothing to do (or only a warning), 10 renewed, 1 failure (the message says why;
the old files are untouched), 2 bad usage.

Standard library HTTP (http.client over ssl) on purpose: the client must run on a facility's
plain Python without the gateway's server dependencies beyond cryptography.
"""

from __future__ import annotations

import base64
import http.client
import ssl
import urllib.parse
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from gateway.clock import Clock, days_left, jst_date, system_clock
from gateway.errors import GatewayError
from gateway.files import replace_atomically

EXIT_OK = 0
EXIT_RENEWED = 10
EXIT_FAILED = 1
WARNING_DAYS = (90, 60, 30, 15, 7)
EST_PATH = "/.well-known/est/simplereenroll"


class RenewalFailed(GatewayError):
    status = 502
    code = "renewal_failed"


@dataclass
class RenewReport:
    """What one run found and did (``--json`` prints it)."""

    serial: str
    expires: str
    days_left: int
    warning: str | None = None
    renewed: bool = False
    new_serial: str | None = None
    new_expires: str | None = None
    backups: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return EXIT_FAILED
        return EXIT_RENEWED if self.renewed else EXIT_OK

    def to_json_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.exit_code}


def warning_for(left: int, renew_within: int) -> str | None:
    """The warning of the day: on 90/60/30/15/7 days left, then every day, and after expiry."""
    if left < 0:
        return "証明書の有効期限が切れています。新規の申請（再申請）が必要です。"
    if left in WARNING_DAYS or left < min(WARNING_DAYS):
        when = "本日が有効期限です" if left == 0 else f"有効期限まであと{left}日です"
        how = (
            "本日、自動更新を行います。"
            if left <= renew_within
            else f"有効期限の{renew_within}日前から自動更新します。"
        )
        return f"クライアント証明書の{when}。{how}"
    return None


@dataclass(frozen=True, kw_only=True)
class ClientFiles:
    cert: Path
    key: Path
    server_ca: Path


def _load(files: ClientFiles) -> x509.Certificate:
    """The current certificate; its key must be readable too (TLS needs it)."""
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise RenewalFailed(f"cannot read the current certificate or key: {e}") from e
    return cert


def renew(
    url: str,
    files: ClientFiles,
    *,
    renew_within: int = 90,
    clock: Clock = system_clock,
    timeout: float = 60.0,
) -> RenewReport:
    """One run (see the module docstring). Unreadable files raise :class:`RenewalFailed`;
    every later failure is in the report (and leaves the files as they were)."""
    cert = _load(files)
    now = clock()
    left = days_left(cert.not_valid_after_utc, now)
    if now >= cert.not_valid_after_utc:
        left = min(left, -1)
    report = RenewReport(
        serial=format(cert.serial_number, "x"),
        expires=jst_date(cert.not_valid_after_utc).isoformat(),
        days_left=left,
        warning=warning_for(left, renew_within),
    )
    if left < 0:
        report.error = "the certificate has expired: it cannot renew itself, apply (再申請)"
        return report
    if left > renew_within:
        return report
    try:
        pending = pending_key_path(files, cert)
        new_key = _pending_key(pending)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(cert.subject)
            .sign(new_key, hashes.SHA256())
        )
        new_cert = _enroll(url, files, csr, timeout=timeout)
        _check_answer(new_cert, cert, new_key)
        report.backups = _install(files, cert, new_cert, new_key)
        pending.unlink(missing_ok=True)
    except GatewayError as e:
        report.error = e.description
        return report
    report.renewed = True
    report.new_serial = format(new_cert.serial_number, "x")
    report.new_expires = jst_date(new_cert.not_valid_after_utc).isoformat()
    return report


def pending_key_path(files: ClientFiles, cert: x509.Certificate) -> Path:
    """Where the key made to renew ``cert`` waits (0600) until its certificate is installed."""
    return files.key.with_name(f"{files.key.name}.{format(cert.serial_number, 'x')}.pending")


def _pending_key(path: Path) -> rsa.RSAPrivateKey:
    """The key of an earlier run that renewing ``cert`` did not finish, else a new one, kept
    before it is sent: when the gateway certified it but its answer was lost (the connection
    dropped), the next run asks for the same key and the gateway answers with the
    certificate it issued (a new key would be refused: the certificate was replaced)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
            return key
    except (OSError, ValueError, TypeError):
        pass
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    try:
        replace_atomically(
            path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            mode=0o600,
        )
    except OSError as e:
        raise RenewalFailed(f"cannot keep the new key in {path}: {e}") from e
    return key


def _enroll(
    url: str, files: ClientFiles, csr: x509.CertificateSigningRequest, *, timeout: float
) -> x509.Certificate:
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https" or not u.hostname:
        raise RenewalFailed(f"gateway URL {url!r} is not https://host[:port]")
    ctx = ssl.create_default_context(cafile=str(files.server_ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))
    conn = http.client.HTTPSConnection(u.hostname, u.port or 443, context=ctx, timeout=timeout)
    try:
        conn.request(
            "POST",
            u.path.rstrip("/") + EST_PATH,
            body=body,
            headers={"Content-Type": "application/pkcs10"},
        )
        r = conn.getresponse()
        data = r.read()
    except (OSError, ssl.SSLError, http.client.HTTPException) as e:
        raise RenewalFailed(f"cannot reach the gateway at {url}: {e}") from e
    finally:
        conn.close()
    if r.status != 200:
        detail = data.decode("utf-8", "replace")[:500]
        raise RenewalFailed(f"the gateway refused the renewal ({r.status}): {detail}")
    try:
        certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(data))
    except ValueError as e:
        raise RenewalFailed(f"the gateway's answer is not a certs-only PKCS#7: {e}") from e
    if len(certs) != 1:
        raise RenewalFailed(f"the gateway's answer holds {len(certs)} certificates, not 1")
    return certs[0]


def _check_answer(new: x509.Certificate, old: x509.Certificate, key: rsa.RSAPrivateKey) -> None:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if new.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise RenewalFailed("the new certificate does not certify the key made for it")
    if new.subject != old.subject or new.issuer != old.issuer:
        raise RenewalFailed("the new certificate's subject or issuer differs from the old one")


def _install(
    files: ClientFiles, old: x509.Certificate, new: x509.Certificate, key: rsa.RSAPrivateKey
) -> list[str]:
    """Back up the old pair (named by its serial), then replace key and certificate, each by
    an atomic rename: a reader sees the old file or the new one, never half of one."""
    tag = format(old.serial_number, "x")
    backups = []
    try:
        for path, mode in ((files.key, 0o600), (files.cert, 0o644)):
            backup = path.with_name(f"{path.name}.{tag}.bak")
            replace_atomically(backup, path.read_bytes(), mode=mode)
            backups.append(str(backup))
        replace_atomically(
            files.key,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            mode=0o600,
        )
        replace_atomically(files.cert, new.public_bytes(serialization.Encoding.PEM), mode=0o644)
    except OSError as e:
        raise RenewalFailed(
            f"the new certificate {format(new.serial_number, 'x')} was issued but could not be "
            f"written ({e}); the old files are backed up as {', '.join(backups) or '-'}"
        ) from e
    return backups


def text_report(r: RenewReport, now: datetime | None = None) -> str:
    lines = [f"certificate {r.serial} expires {r.expires} ({r.days_left} days left)"]
    if r.warning:
        lines.append(f"warning: {r.warning}")
    if r.renewed:
        lines.append(f"renewed: new certificate {r.new_serial} expires {r.new_expires}")
        lines.append(f"backups: {', '.join(r.backups)}")
    if r.error:
        lines.append(f"error: {r.error}")
    return "\n".join(lines)
