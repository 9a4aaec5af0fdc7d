"""Where the revocation status of a My Number card's authentication certificate comes from.

J-LIS gives OCSP/CRL access only to registered verifiers or through platform operators
(HPKI.md §4), so the source is pluggable and configured (``[jpki]``): an OCSP responder
(a configured URL, else the certificate's AIA), CRL files, or CRL URLs (a fetched CRL is kept
until its nextUpdate only when the issuer's key verifies it). Each answers "good",
"revoked", or "unknown" when it cannot answer; what to do with "unknown" is the caller's
policy (``jpki.on_revocation_unavailable``, "refuse" by default). An OCSP responder that
answers certStatus "unknown" HAS answered (it has no record of the certificate: not issued by
the CA it serves, or the responder of another CA generation): that is "unrecognized", which
the caller refuses whatever its policy for a source that cannot answer.

Good OCSP answers are cached per certificate (issuer KEY + serial: all JPKI roots share one
DN) for ``cache_seconds``, never past the answer's own nextUpdate (without one, past
thisUpdate + the OCSP checks' maximum age): a doctor signing a batch does not hit the
responder per authorization, and a revocation shows within that time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.errors import ConfigError
from gateway.pki.crl import CrlSource, RevocationStatus, load_crl, load_crl_files
from gateway.pki.ocsp import MAX_AGE_WITHOUT_NEXT_UPDATE, OcspClient, OcspResult, ocsp_urls


class JpkiRevocationSource(Protocol):
    async def status(
        self, cert: x509.Certificate, issuer: x509.Certificate, now: dt.datetime
    ) -> RevocationStatus: ...


class OcspRevocation:
    """OCSP at ``url`` (or the certificate's AIA), good answers cached."""

    def __init__(
        self, *, url: str | None = None, timeout: float = 5.0, cache_seconds: float = 300.0
    ) -> None:
        self.url = url
        self.client = OcspClient(timeout=timeout)
        self.cache_seconds = cache_seconds
        self._good: dict[tuple[bytes, int], float] = {}

    async def status(
        self, cert: x509.Certificate, issuer: x509.Certificate, now: dt.datetime
    ) -> RevocationStatus:
        # Per issuer KEY and serial: all JPKI roots share one DN, so a name and a serial do not
        # tell a card of one root generation from a card of another.
        key = (_key_id(issuer), cert.serial_number)
        until = self._good.get(key)
        if until is not None and time.monotonic() < until:
            return RevocationStatus("good", "OCSP: good (cached)", source="ocsp")
        urls = [self.url] if self.url else ocsp_urls(cert)
        if not urls:
            return RevocationStatus("unknown", "no OCSP URL configured or in the certificate")
        answer = await self.client.status(cert, issuer, now, urls)
        if answer.status == "good":
            if len(self._good) > 100_000:
                self._good.clear()
            self._good[key] = time.monotonic() + _cacheable_seconds(answer, now, self.cache_seconds)
            return RevocationStatus("good", answer.reason, source="ocsp")
        if answer.status == "revoked":
            return RevocationStatus("revoked", answer.reason, answer.revocation_time, source="ocsp")
        if answer.status == "unknown":  # a responder said certStatus "unknown": an answer
            return RevocationStatus("unrecognized", answer.reason, source="ocsp")
        return RevocationStatus("unknown", answer.reason, source="ocsp")


def _key_id(cert: x509.Certificate) -> bytes:
    """SHA-256 of ``cert``'s SubjectPublicKeyInfo."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def _cacheable_seconds(answer: OcspResult, now: dt.datetime, cache_seconds: float) -> float:
    """How long a good ``answer`` may be reused: ``cache_seconds``, but not past the time the
    answer itself stops being current (its nextUpdate; without one, thisUpdate + the maximum
    age the OCSP checks accept)."""
    if answer.next_update is not None:
        until = answer.next_update
    elif answer.this_update is not None:
        until = answer.this_update + MAX_AGE_WITHOUT_NEXT_UPDATE
    else:  # pragma: no cover - a good answer carries its times
        return 0.0
    return max(0.0, min(cache_seconds, (until - now).total_seconds()))


def _keepable(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    """Whether a fetched ``crl`` may be kept until its nextUpdate: one with a nextUpdate, of
    ``issuer`` by name AND key. Anything else (a forged or foreign body, a CRL of another CA
    generation with the same DN) must not stay in place of the real CRL: kept, it answered
    every check until its own, chosen, nextUpdate."""
    public = issuer.public_key()
    return (
        crl.next_update_utc is not None
        and crl.issuer == issuer.subject
        and isinstance(public, rsa.RSAPublicKey)
        and crl.is_signature_valid(public)
    )


class CrlRevocation:
    """CRL files (re-read when they change) and CRL URLs (kept until nextUpdate when they are
    the issuer's, by key; otherwise fetched again at the next check)."""

    def __init__(
        self, *, files: Sequence[Path] = (), urls: Sequence[str] = (), timeout: float = 5.0
    ) -> None:
        self.files = list(files)
        self.urls = list(urls)
        self.timeout = timeout
        self._stamp: tuple[float, ...] = ()
        self._from_files: list[x509.CertificateRevocationList] = []
        self._from_urls: dict[str, x509.CertificateRevocationList] = {}

    def _file_crls(self) -> tuple[list[x509.CertificateRevocationList], str]:
        """The CRL files, re-read when one changed. A file that cannot be read now (caught
        half-written by the job that mirrors it, removed meanwhile) is a problem of this check,
        not an internal error: the copies read before stay (each still counts only while
        current) and the files are read again at the next check."""
        try:
            stamp = tuple(p.stat().st_mtime if p.exists() else -1.0 for p in self.files)
            if stamp != self._stamp:
                self._from_files = load_crl_files([p for p in self.files if p.exists()])
                self._stamp = stamp
        except (ConfigError, OSError) as e:
            return self._from_files, str(e)
        return self._from_files, ""

    async def _url_crls(
        self, issuer: x509.Certificate, now: dt.datetime
    ) -> tuple[list[x509.CertificateRevocationList], str]:
        out, problems = [], []
        for url in self.urls:
            crl = self._from_urls.get(url)
            if crl is None or (crl.next_update_utc is not None and crl.next_update_utc < now):
                try:
                    async with (
                        aiohttp.ClientSession(
                            timeout=aiohttp.ClientTimeout(total=self.timeout)
                        ) as s,
                        s.get(url, allow_redirects=False) as resp,
                    ):
                        if resp.status != 200:
                            problems.append(f"CRL {url} answered HTTP {resp.status}")
                            continue
                        crl = load_crl(await resp.content.read(16 * 1024 * 1024))
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
                    problems.append(f"CRL {url} unreachable ({type(e).__name__})")
                    continue
                if _keepable(crl, issuer):
                    self._from_urls[url] = crl
                else:  # used for this check only (and reported there); fetched again next time
                    self._from_urls.pop(url, None)
            out.append(crl)
        return out, "; ".join(problems)

    async def status(
        self, cert: x509.Certificate, issuer: x509.Certificate, now: dt.datetime
    ) -> RevocationStatus:
        from_files, file_problem = self._file_crls()
        fetched, problems = await self._url_crls(issuer, now)
        crls = [*from_files, *fetched]
        problems = "; ".join(p for p in (file_problem, problems) if p)
        result = await CrlSource(crls).status(cert, issuer, now, fetch=False)
        if result.status == "unknown" and problems:
            return RevocationStatus("unknown", f"{result.reason}; {problems}")
        return result
