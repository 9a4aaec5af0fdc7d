"""Revocation from CRLs: HPKI publishes CRLs only (no OCSP, no AIA), so CRLs are the source
(OCSP, for certificates that do carry an AIA responder, is in ``ocsp.py``; ``revocation.py``
combines the two).

CRLs come from local files (a relying party mirrors them; the sandbox writes its own) and,
only when enabled, from the certificates' distribution points with a time-out. A CRL counts
only if its issuer name matches, the issuer's key verifies it, its lastUpdate is not in the
future, it is not past nextUpdate, and it covers the certificate (RFC 5280 §6.3.3: not a delta
CRL; an IssuingDistributionPoint, if any, limited to no reasons, no CA-only or attribute-only
scope, not indirect, and naming the certificate's distribution point when it names one; no
critical extension it does not understand); otherwise the status is "unknown", which
verification reports as INDETERMINATE. Among the usable CRLs of an issuer, the certificate is
revoked if any of them lists it; otherwise the newest (latest lastUpdate) is reported as the one
that decided.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.clock import Clock, system_clock
from gateway.errors import ConfigError

__all__ = ["CrlSource", "RevocationStatus", "load_crl", "load_crl_files"]

_log = logging.getLogger("gateway.pki.crl")
MAX_CRL_BYTES = 20 * 1024 * 1024
#: A CRL whose lastUpdate is later than this past "now" is refused (not yet issued).
CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class RevocationStatus:
    status: str  # "good" | "revoked" | "unknown" (| "unrecognized": auth/jpki_revocation.py)
    reason: str
    revocation_time: dt.datetime | None = None
    source: str = "crl"  # "crl" | "ocsp": what decided


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def load_crl_files(paths: Sequence[Path]) -> list[x509.CertificateRevocationList]:
    out = []
    for p in paths:
        try:
            out.append(load_crl(p.read_bytes()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load CRL {p}: {e}") from e
    return out


def _crl_urls(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    return [
        gn.value
        for dp in ext
        for gn in (dp.full_name or ())
        if isinstance(gn, x509.UniformResourceIdentifier)
    ]


def _scope_problem(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> str | None:
    """None when ``crl`` (already known to be a current CRL of the issuer) is complete for
    ``cert``; else why not. A CRL that lists only part of what its issuer revoked (a delta CRL,
    an ARL, a partition, some reasons) cannot say "good": the certificate may be revoked on
    another."""
    who = crl.issuer.rfc4514_string()
    try:
        exts = list(crl.extensions)
        idp_ext = next(
            (e for e in exts if isinstance(e.value, x509.IssuingDistributionPoint)), None
        )
    except ValueError as e:
        return f"CRL of {who} has extensions that cannot be read ({e})"
    for ext in exts:
        if isinstance(ext.value, x509.DeltaCRLIndicator):
            return f"CRL of {who} is a delta CRL (not a complete list)"
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            return f"CRL of {who} has a critical extension {ext.oid.dotted_string} not understood"
    if idp_ext is None:
        return None
    idp = idp_ext.value
    assert isinstance(idp, x509.IssuingDistributionPoint)
    if idp.only_contains_ca_certs or idp.only_contains_attribute_certs:
        return f"CRL of {who} covers only CA or attribute certificates (an ARL)"
    if idp.only_some_reasons is not None:
        return f"CRL of {who} covers only some revocation reasons"
    if idp.indirect_crl:
        return f"CRL of {who} is an indirect CRL (not supported)"
    if idp.relative_name is not None:
        return f"CRL of {who} is a partition named relative to its issuer (not supported)"
    if idp.full_name is not None:
        try:
            dps = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
            names = {gn for dp in dps for gn in (dp.full_name or ())}
        except x509.ExtensionNotFound:
            names = set()
        if not names.intersection(idp.full_name):
            return f"CRL of {who} is a partition for another distribution point"
    return None


class CrlSource:
    """Local CRLs plus optional fetching (with an in-memory cache until nextUpdate)."""

    def __init__(
        self,
        crls: Sequence[x509.CertificateRevocationList] = (),
        *,
        fetch: bool = False,
        timeout: float = 5.0,
        clock: Clock = system_clock,
    ) -> None:
        self._crls = list(crls)
        self.clock = clock
        self.fetch = fetch
        self.timeout = timeout
        self._fetched: dict[str, x509.CertificateRevocationList] = {}

    def _usable(
        self,
        crl: x509.CertificateRevocationList,
        issuer: x509.Certificate,
        moment: dt.datetime,
    ) -> str | None:
        """None when ``crl`` is a valid, current CRL of ``issuer``; else why not."""
        if crl.issuer != issuer.subject:
            return "issuer differs"
        public = issuer.public_key()
        if not isinstance(public, rsa.RSAPublicKey) or not crl.is_signature_valid(public):
            return f"CRL of {issuer.subject.rfc4514_string()} has an invalid signature"
        if crl.last_update_utc > moment + CLOCK_SKEW:
            return (
                f"CRL of {issuer.subject.rfc4514_string()} is dated in the future "
                f"(lastUpdate {crl.last_update_utc.isoformat()})"
            )
        next_update = crl.next_update_utc
        if next_update is not None and next_update < moment:
            return f"CRL of {issuer.subject.rfc4514_string()} expired at {next_update.isoformat()}"
        return None

    async def _download(self, url: str) -> x509.CertificateRevocationList | None:
        cached = self._fetched.get(url)
        now = self.clock()
        if cached is not None and (cached.next_update_utc or now) >= now:
            return cached
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as s,
                s.get(url) as resp,
            ):
                if resp.status != 200:
                    return None
                body = await resp.content.read(MAX_CRL_BYTES + 1)
            if len(body) > MAX_CRL_BYTES:
                return None
            crl = load_crl(body)
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            _log.info("CRL download from %s failed: %s", url, type(e).__name__)
            return None
        self._fetched[url] = crl
        return crl

    def local_crls(self) -> list[x509.CertificateRevocationList]:
        """The configured CRL files (as loaded)."""
        return list(self._crls)

    async def current_crl(
        self, cert: x509.Certificate, issuer: x509.Certificate, moment: dt.datetime
    ) -> tuple[x509.CertificateRevocationList | None, str]:
        """The newest current CRL of ``issuer`` covering ``cert`` (local, else fetched from the
        certificate's distribution points when fetching is on; downloads are cached until
        nextUpdate), or None and why not: the validation data an ES-XL signature carries."""
        problems: list[str] = []
        candidates = list(self._crls)
        urls = [u for u in _crl_urls(cert) if u.startswith(("http://", "https://"))]

        def covers(c: x509.CertificateRevocationList) -> bool:
            return self._usable(c, issuer, moment) is None and _scope_problem(c, cert) is None

        if self.fetch and not any(covers(c) for c in candidates):
            for url in urls:
                crl = await self._download(url)
                if crl is not None:
                    candidates.append(crl)
                else:
                    problems.append(f"{url} did not answer with a CRL")
        usable = [c for c in candidates if covers(c)]
        if usable:
            return max(usable, key=lambda c: c.last_update_utc), ""
        where = ", ".join(urls) or "no CRL distribution point"
        off = "" if self.fetch else "; CRL fetching is disabled"
        detail = "; ".join(problems) or "no current CRL of the issuer"
        return None, f"{detail} [{where}]{off}"

    async def status(
        self,
        cert: x509.Certificate,
        issuer: x509.Certificate,
        moment: dt.datetime,
        *,
        fetch: bool | None = None,
    ) -> RevocationStatus:
        """``fetch=False`` consults the local CRLs only (whatever ``self.fetch`` says)."""
        problems: list[str] = []
        candidates = list(self._crls)
        urls = _crl_urls(cert)
        fetching = self.fetch if fetch is None else fetch and self.fetch
        if fetching:
            for url in urls:
                if url.startswith(("http://", "https://")):
                    crl = await self._download(url)
                    if crl is not None:
                        candidates.append(crl)
        usable: list[x509.CertificateRevocationList] = []
        for crl in candidates:
            why = self._usable(crl, issuer, moment)
            if why == "issuer differs":
                continue
            if why is None:
                why = _scope_problem(crl, cert)
            if why is not None:
                problems.append(why)
                continue
            usable.append(crl)
        # Revoked if ANY current CRL of the issuer lists the certificate (an older CRL listed
        # first must not hide a newer one that revokes); otherwise the newest one decides.
        entries = [
            e
            for crl in usable
            if (e := crl.get_revoked_certificate_by_serial_number(cert.serial_number)) is not None
        ]
        if entries:
            entry = min(entries, key=lambda e: e.revocation_date_utc)
            return RevocationStatus(
                "revoked",
                f"certificate {cert.serial_number:X} is revoked by "
                f"{issuer.subject.rfc4514_string()} since "
                f"{entry.revocation_date_utc.isoformat()}",
                entry.revocation_date_utc,
            )
        if usable:
            newest = max(usable, key=lambda c: c.last_update_utc)
            return RevocationStatus(
                "good",
                f"not on the issuer's current CRL (issued {newest.last_update_utc.isoformat()})",
            )
        where = ", ".join(urls) or "no CRL distribution point"
        detail = "; ".join(problems) if problems else "no CRL of the issuer is available"
        off = "" if self.fetch else " (CRL fetching is disabled)"
        return RevocationStatus(
            "unknown",
            f"revocation of {cert.subject.rfc4514_string()} unknown: {detail} [{where}]{off}",
        )
