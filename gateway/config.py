"""One typed Settings object, read from a TOML file plus ``HPKI_GATEWAY_*`` environment overrides.

Rules:
- Unknown or mistyped keys stop start-up with a message naming the key (and the file or the
  environment variable it came from). A file that is not valid TOML is refused with its line.
- Secrets (HSM PIN, database password) are never inline: they are referenced by ``*_file`` (a
  path to a file holding the secret) or ``*_env`` (the name of an environment variable).
- Relative paths are resolved against the directory of the settings file.
- Environment overrides: ``HPKI_GATEWAY_<SECTION>__<KEY>=value`` (double underscore between the
  section and the key), e.g. ``HPKI_GATEWAY_SERVER__PORT=9443``. Values are parsed as TOML
  values when they parse (numbers, booleans, arrays), else taken as strings.
  ``HPKI_GATEWAY_CONFIG`` names the settings file and is not an override.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError

ENV_PREFIX = "HPKI_GATEWAY_"
CONFIG_ENV = "HPKI_GATEWAY_CONFIG"

# Keys that look like inline secrets get a specific message instead of "unknown key".
_INLINE_SECRETS = {
    ("hsm", "pin"),
    ("hsm", "so_pin"),
    ("store", "password"),
    ("smtp", "password"),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class ServerSettings(_Section):
    """The mTLS listener."""

    host: str = "127.0.0.1"
    """Address to bind."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8443
    """TCP port to bind."""
    public_url: str = "https://localhost:8443"
    """The URL clients use (WebAuthn RP ID and links are derived from it)."""
    tls_cert: Path
    """PEM server certificate (with its chain)."""
    tls_key: Path
    """PEM private key of the server certificate."""
    client_ca: Path
    """PEM bundle of the CAs that issue facility and admin client certificates."""
    min_tls_version: Literal["1.2", "1.3"] = "1.2"
    """Lowest TLS version accepted."""
    max_body_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = 10 * 1024 * 1024
    """Largest request body accepted; larger ones get 413."""
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    """Worker processes sharing the port (SO_REUSEPORT); ``serve --workers`` overrides."""
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The workers' event loop: uvloop (faster, the default) or the standard library's."""


class StoreSettings(_Section):
    """The database."""

    url: str = "sqlite+aiosqlite:///data/gateway.db"
    """SQLAlchemy async URL. A relative SQLite path is relative to the settings file."""
    password_file: Path | None = None
    """File holding the database password (PostgreSQL); never put it in the URL."""
    password_env: str | None = None
    """Environment variable holding the database password."""
    echo: bool = False
    """Log SQL statements (development only)."""
    busy_timeout_ms: Annotated[int, Field(ge=1, le=600_000)] = 15000
    """How long a write waits for a lock held elsewhere before the request gets 503
    ``temporarily_unavailable`` (Retry-After 2): on SQLite another process's write lock (the
    busy time-out), on PostgreSQL a row or table lock (the sessions' ``lock_timeout``)."""


class HsmSettings(_Section):
    """The PKCS#11 token that holds the signing keys."""

    module: Path = Path("/usr/lib/softhsm/libsofthsm2.so")
    """PKCS#11 module (shared library)."""
    token_label: str = "hpki-gateway"  # noqa: S105 - a label, not a secret
    """Label of the token to use."""
    pin_file: Path | None = None
    """File holding the user PIN."""
    pin_env: str | None = None
    """Environment variable holding the user PIN."""
    softhsm_conf: Path | None = None
    """SoftHSM2 configuration file (sets SOFTHSM2_CONF); leave unset for a real HSM."""
    retry_after: Annotated[int, Field(ge=1, le=3600)] = 5
    """Seconds advertised in Retry-After when the token is unavailable."""
    reconnect_interval: Annotated[float, Field(ge=0.05, le=60)] = 1.0
    """While the token is away, try to reconnect at most this often (seconds); calls in
    between fail fast with 503."""
    key_bits: Literal[2048, 3072, 4096] = 2048
    """RSA key size for new signer keys (HPKI cards use 2048)."""
    signing_process: bool = True
    """Run the PKCS#11 session in a child process per worker (the worker never loads the
    module); false: on a thread of the worker itself. See docs/performance.md."""


class PkiSettings(_Section):
    """Trust and issuance."""

    hpki_trust_anchors: list[Path] = Field(default_factory=list)
    """PEM files of HPKI trust anchors (roots) used to check signer certificates."""
    hpki_intermediates: list[Path] = Field(default_factory=list)
    """PEM files of HPKI issuing CAs offered during path building."""
    test_ca_cert: Path | None = None
    """Sandbox only: the TEST HPKI signing CA that issues signer certificates directly."""
    test_ca_key: Path | None = None
    """Sandbox only: the key of the TEST HPKI signing CA."""
    test_crl_url: str | None = None
    """Sandbox only: the CRL distribution point written in the signer certificates the TEST CA
    issues (``serve`` publishes the CRL there). Unset: a placeholder URL nobody serves."""
    test_ocsp_url: str | None = None
    """Sandbox only: the OCSP responder named in their AIA (``serve`` runs the TEST responder)."""
    test_ca_issuers_url: str | None = None
    """Sandbox only: where their AIA says the issuing CA's certificate is (``serve`` serves it)."""
    facility_ca_cert: Path | None = None
    """The CA that issues facility client certificates (sandbox and self-run registries)."""
    facility_ca_key: Path | None = None
    """Key of the facility client CA."""
    crl_files: list[Path] = Field(default_factory=list)
    """Local CRL files (DER or PEM) used for revocation checks during verification; HPKI
    publishes CRLs only, and a relying party usually mirrors them."""
    fetch_crls: bool = False
    """Fetch CRLs from the certificates' CRL distribution points when no local CRL covers an
    issuer. Off by default: an offline check reports revocation as INDETERMINATE instead."""
    crl_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
    """Seconds allowed for one CRL download."""
    ocsp: bool = False
    """Ask the OCSP responder named in a certificate's AIA extension before the CRLs (CRLs stay
    the fallback when it is unreachable). Off by default, like ``fetch_crls``: the URL comes from
    a certificate in an untrusted document, and verification stays offline unless enabled."""
    ocsp_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
    """Seconds allowed for one OCSP request and response."""
    facility_crl: Path | None = None
    """Where the facility CA publishes its CRL (DER), for a TLS terminator in front of the
    gateway; rewritten on every revocation and before nextUpdate. Unset: no CRL is written."""
    crl_validity_hours: Annotated[int, Field(ge=2, le=24 * 90)] = 7 * 24
    """nextUpdate of each CRL, counted from its thisUpdate."""
    crl_refresh_hours: Annotated[int, Field(ge=1, le=24 * 45)] = 2 * 24
    """The scheduler rewrites the CRL when less than this remains until its nextUpdate."""


class CertificateSettings(_Section):
    """Facility client certificates: validity, delivery, rotation, reminders (HPKI.md §6)."""

    validity_months: Annotated[int, Field(ge=1, le=120)] = 39
    """Validity of a new facility certificate in calendar months (3 years 3 months)."""
    p12_file_name: str = "client.{service}.p12"
    """Name of the PKCS#12 file; ``{service}`` becomes ``service.name``."""
    download_days: Annotated[int, Field(ge=1, le=90)] = 14
    """How long a download link works; a resend opens a new window of the same length."""
    max_download_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    """Wrong download passwords after which the link locks (a resend unlocks)."""
    rotation_overlap_months: Annotated[int, Field(ge=0, le=12)] = 1
    """The replaced certificate is revoked this many calendar months after the new one's
    issue date (0: at once)."""
    reminder_days: list[Annotated[int, Field(ge=1, le=365)]] = Field(
        default_factory=lambda: [90, 60, 30, 15, 7]
    )
    """Days before expiry with a reminder; after the smallest, one every day, then at expiry."""
    expiry_header_days: Annotated[int, Field(ge=0, le=365)] = 90
    """Responses to a facility whose certificate expires within this many days carry
    ``X-Client-Certificate-Expires``."""
    outbox_dir: Path = Path("outbox")
    """Out-of-band deliveries (password notice PDF, the two mails) are written here, 0600."""
    notice_font_mincho: Path = Path("/usr/share/fonts/opentype/ipaexfont-mincho/ipaexm.ttf")
    """TrueType font of the notice's body text, embedded as a subset (Debian fonts-ipaexfont)."""
    notice_font_gothic: Path = Path("/usr/share/fonts/opentype/ipaexfont-gothic/ipaexg.ttf")
    """TrueType font of the notice's headings and labels (Debian fonts-ipaexfont)."""
    notice_font_mono: Path = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf")
    """Monospaced TrueType font of the printed password, with a slashed zero so that 0 and O
    stay apart (Debian fonts-dejavu-core)."""
    delivery_key_file: Path | None = None
    """32+ bytes: wraps (AES-256-GCM) the PKCS#12 kept until it is downloaded. Needed to issue."""
    renewal_window_days: Annotated[int, Field(ge=1, le=365)] = 90
    """A facility renews its own certificate over EST (``/.well-known/est/simplereenroll``)
    from this many days before expiry (JST calendar days) until it expires."""
    renewal_min_rsa_bits: Annotated[int, Field(ge=2048, le=8192)] = 2048
    """The smallest RSA key a renewal request (CSR) may carry; EC keys must be P-256 or
    stronger."""

    @model_validator(mode="after")
    def _renewal_window_within_validity(self) -> CertificateSettings:
        # A renewed certificate must start outside the window: else it could renew again at
        # once, and one certificate would mint any number (28 days: the shortest month).
        if self.renewal_window_days >= 28 * self.validity_months:
            raise ValueError(
                f"renewal_window_days ({self.renewal_window_days}) must be shorter than the "
                f"shortest validity of validity_months ({self.validity_months} months, at least "
                f"{28 * self.validity_months} days), or a renewed certificate could renew again "
                "at once"
            )
        return self


class FeeSettings(_Section):
    """Fees charged to facilities (defaults from the source documents, yen, tax included)."""

    issuance_yen: Annotated[int, Field(ge=0, le=1_000_000)] = 1500
    """Per certificate issued or renewed (ライセンス料 / 電子証明書発行料)."""
    postage_yen: Annotated[int, Field(ge=0, le=100_000)] = 753
    """Postage (郵送手数料) when a new certificate is needed because the old one expired or its
    password notice was lost; none for a renewal in time or a re-send."""
    issuer_name: str | None = None
    """Who issues the statement (請求書); default ``service.name``."""
    transfer_account: str | None = None
    """Bank account printed on statements of facilities that pay by transfer (振込先)."""


class DeliverySettings(_Section):
    """The optional download listener: server TLS only, nothing but the one-time download."""

    enabled: bool = False
    """Serve the download links (off by default: delivery is then out of band only)."""
    host: str = "127.0.0.1"
    """Address to bind."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8444
    """TCP port (must differ from server.port)."""
    public_url: str = "https://localhost:8444"
    """Base URL of the download links in the mails."""
    tls_cert: Path | None = None
    """PEM server certificate of this listener (default: server.tls_cert)."""
    tls_key: Path | None = None
    """Its key (default: server.tls_key)."""


class SmtpSettings(_Section):
    """Mail for delivery and reminders; unset host = no mail (the outbox only)."""

    host: str | None = None
    """SMTP server; unset: mails are only written to the outbox and the notification table."""
    port: Annotated[int, Field(ge=1, le=65535)] = 25
    """SMTP port."""
    starttls: bool = False
    """Upgrade with STARTTLS before sending (verifies the server certificate)."""
    username: str | None = None
    """SMTP AUTH user (with password_file or password_env)."""
    password_file: Path | None = None
    """File holding the SMTP password."""
    password_env: str | None = None
    """Environment variable holding the SMTP password."""
    sender: str = "hpki-gateway@localhost"
    """From address."""
    timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 10.0
    """Timeout of each SMTP conversation."""


class SchedulerSettings(_Section):
    """Reminders, scheduled revocations and CRL refresh (idempotent in the store)."""

    enabled: bool = True
    """Run the scheduler loop inside ``serve`` (every worker may; the store keeps it once)."""
    interval_seconds: Annotated[int, Field(ge=5, le=86400)] = 300
    """Seconds between runs."""


class AuditSettings(_Section):
    """The hash-chained audit log."""

    hmac_key_file: Path | None = None
    """If set, chain hashes are HMAC-SHA-256 under this key, so an attacker who can write the
    database cannot recompute a consistent chain without also stealing the key."""


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Root log level."""
    format: Literal["json", "text"] = "json"
    """One JSON object per line (for log shippers) or plain text."""


class LimitSettings(_Section):
    """Request rates and concurrency per client address and per facility (api/limits.py),
    per worker process; over a limit: 429 with Retry-After."""

    enabled: bool = True
    ip_rate: Annotated[float, Field(gt=0, le=1_000_000)] = 200.0
    """Requests per second from one remote address (token bucket refill)."""
    ip_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 400
    """Requests one address may send at once before the rate applies."""
    ip_concurrency: Annotated[int, Field(ge=1, le=100_000)] = 128
    """Requests from one address in progress at the same time."""
    facility_rate: Annotated[float, Field(gt=0, le=1_000_000)] = 100.0
    """Requests per second from one facility (all its addresses)."""
    facility_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 200
    """Requests one facility may send at once before the rate applies."""
    facility_concurrency: Annotated[int, Field(ge=1, le=100_000)] = 64
    """Requests from one facility in progress at the same time."""
    summary_seconds: Annotated[float, Field(ge=0.1, le=3600)] = 60.0
    """How often the counted refusals are written as one ``request.refused.summary`` event."""


class MetricsSettings(_Section):
    """The Prometheus scrape listener (api/metrics.py): plain HTTP, localhost by default."""

    port: Annotated[int, Field(ge=0, le=65535)] = 0
    """0: no listener. Worker *i* of ``serve --workers N`` listens on ``port + i``."""
    host: str = "127.0.0.1"


class ServiceSettings(_Section):
    name: str = "hpki-gateway"
    """Service name shown in /csc/v2/info."""
    description: str = "HPKI remote signing gateway"
    """Description shown in /csc/v2/info."""
    region: str = "JP"
    """ISO 3166-1 country of the service."""
    lang: str = "ja-JP"
    """Default language of the service."""
    sandbox: bool = False
    """True for a verification environment built by ``sandbox init``."""


def _default_role_document_types() -> dict[str, list[str]]:
    return {"prescription": ["Medical Doctor", "Dentist"], "dispensing": ["Pharmacist"]}


class SigningSettings(_Section):
    """Document signatures (signDoc, the e-prescription profile) and their verification."""

    role_document_types: dict[str, list[str]] = Field(default_factory=_default_role_document_types)
    """Which hcRole texts may sign which document type (HPKI.md §2: role strings other than
    "Medical Doctor" are unconfirmed, hence configuration)."""
    max_document_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = 5 * 1024 * 1024
    """Largest decoded document accepted for signing or verification (413 above it)."""
    max_xml_depth: Annotated[int, Field(ge=8, le=1000)] = 64
    """Deepest XML nesting accepted; deeper documents are refused while parsing."""
    verify_max_signatures: Annotated[int, Field(ge=1, le=1000)] = 10
    """Most signatures one document may carry for verification (more: FORMAT_FAILURE)."""
    verify_max_references: Annotated[int, Field(ge=1, le=1000)] = 10
    """Most ds:Reference elements one XML signature may have (more: FORMAT_FAILURE)."""
    verify_max_timestamps: Annotated[int, Field(ge=1, le=1000)] = 10
    """Most SignatureTimeStamp and ArchiveTimeStamp elements one XML signature may have (more:
    FORMAT_FAILURE); an ES-A gains one archive timestamp per renewal."""
    verify_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 20.0
    """Wall-clock limit of one ``/verify``; slower ones are stopped (503, Retry-After)."""
    verify_concurrency: Annotated[int, Field(ge=1, le=64)] = 2
    """Verifications at once per gateway worker, each in its own process (more: 503)."""
    eprescription_issuer_serial_v2: bool = False
    """Add IssuerSerialV2 to the e-prescription's SigningCertificateV2 (samples: no)."""
    archive_renewal_paths: list[Path] = Field(default_factory=list)
    """Archived ES-A documents (files or folders of *.xml) the scheduler keeps renewed."""
    archive_renewal_days: Annotated[int, Field(ge=1, le=3650)] = 90
    """Renew an ES-A when its last archive timestamp's TSA certificate ends within this."""
    parallel_documents: Annotated[int, Field(ge=1, le=64)] = 8
    """Documents of one signDoc request built at once, so that their TSA round trips overlap
    (1: one after the other)."""
    long_term_revocation: Literal["auto", "ocsp", "crl"] = "auto"
    """Revocation evidence embedded at B-LT / B-LTA: ``auto`` the OCSP responder's answer for a
    certificate whose AIA names one (CRLs when it fails, and for the others), ``ocsp`` the same
    without the CRL fallback, ``crl`` CRLs only. Time-out: ``[pki] ocsp_timeout``."""


class TimestampSettings(_Section):
    """The RFC 3161 timestamp authority used for the -T levels and its trust."""

    url: str | None = None
    """TSA URL; unset means AdES-B-T requests are refused with a clear error."""
    timeout: Annotated[float, Field(gt=0, le=120)] = 10.0
    """Seconds allowed for one TSA round trip; slower answers give 503 and nothing signed."""
    trust_anchors: list[Path] = Field(default_factory=list)
    """PEM roots that timestamp tokens must chain to during verification."""


class TestTsaSettings(_Section):
    """Sandbox only: a TEST TSA that ``hpki-gateway serve`` runs next to the gateway."""

    enabled: bool = False
    """Serve the test TSA (plain HTTP on ``host:port``, path /tsa)."""
    host: str = "127.0.0.1"
    """Address to bind (loopback: the test TSA is for the local tester only)."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8318
    """TCP port of the test TSA."""
    cert: Path | None = None
    """PEM certificate of the test TSA (EKU timeStamping)."""
    key: Path | None = None
    """PEM key of the test TSA."""
    chain: list[Path] = Field(default_factory=list)
    """PEM CA certificates embedded in the tokens."""


class Fido2Settings(_Section):
    """FIDO2 (WebAuthn) enrolment and signer authentication."""

    rp_id: str | None = None
    """WebAuthn relying-party id; default: the host of ``server.public_url``. Must be a domain
    (browsers refuse IP addresses); credentials are bound to it, so changing it later orphans
    every enrolled authenticator."""
    rp_name: str = "hpki-gateway"
    """Relying-party name the authenticator may show."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Origins whose WebAuthn responses are accepted (facility front-ends that relay the
    ceremony). The gateway's own origins (that of ``server.public_url`` and
    ``https://<rp_id>:<server.port>``, which serves ``/enroll``) are always allowed."""
    challenge_ttl_seconds: Annotated[int, Field(ge=10, le=900)] = 120
    """Lifetime of a registration or authentication challenge (single use)."""
    enrollment_valid_days: Annotated[int, Field(ge=1, le=90)] = 14
    """Validity of an enrolment code issued by ``signer enroll-code``."""
    enrollment_max_password_tries: Annotated[int, Field(ge=1, le=20)] = 5
    """Wrong enrolment passwords that lock the code (a new code must then be issued)."""


class ActivationSettings(_Section):
    """Signature activation: SAD lifetime, request limits, signing sessions (SCAL 1)."""

    sad_ttl_seconds: Annotated[int, Field(ge=10, le=3600)] = 300
    """Lifetime of a hash-bound (SCAL 2) SAD."""
    max_hashes_per_request: Annotated[int, Field(ge=1, le=1000)] = 100
    """Most hashes in one authenticate/begin, credentials/authorize or signHash call
    (advertised as ``multisign``); longer arrays are refused, never truncated."""
    signing_session_max_hours: Annotated[float, Field(gt=0, le=24)] = 18
    """Cap on a facility's signing-session length (MEDIS runs 18-hour sessions)."""
    signing_session_max_signatures: Annotated[int, Field(ge=1, le=100_000)] = 1000
    """Cap on the signatures one signing session may authorize."""
    purge_after_hours: Annotated[int, Field(ge=1, le=24 * 365)] = 24
    """The scheduler deletes SADs and WebAuthn challenges this many hours after they expired
    (the audit log keeps the record of each issuance and use)."""


class JpkiSettings(_Section):
    """My Number card (JPKI) signer presence: trust and revocation of authentication certs."""

    enabled: bool = True
    """Offer ``/auth/jpki/...`` and ``authData`` id ``jpki``."""
    bundled_roots: bool = True
    """Trust the real JPKI user-authentication roots shipped in ``gateway/pki/anchors``."""
    trust_anchors: list[Path] = Field(default_factory=list)
    """More PEM anchors (the sandbox adds its TEST JPKI CA). Matched by key, never by name."""
    revocation: Literal["ocsp", "crl"] = "ocsp"
    """Where revocation comes from: an OCSP responder, or CRLs (files and/or URLs)."""
    ocsp_url: str | None = None
    """OCSP responder to ask (J-LIS gives one to registered verifiers / platform operators);
    unset: the certificate's AIA."""
    ocsp_cache_seconds: Annotated[int, Field(ge=0, le=86400)] = 300
    """How long a "good" OCSP answer is reused for the same certificate."""
    crl_files: list[Path] = Field(default_factory=list)
    """CRL files (DER or PEM), re-read when they change (``revocation = "crl"``)."""
    crl_urls: list[str] = Field(default_factory=list)
    """CRL URLs, fetched and cached until nextUpdate (``revocation = "crl"``); only a CRL the
    issuer's key verifies is kept."""
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0
    """Time allowed for one OCSP or CRL request."""
    on_revocation_unavailable: Literal["refuse", "accept"] = "refuse"
    """When the revocation source cannot answer: refuse (default), or accept and audit it."""
    challenge_ttl_seconds: Annotated[int, Field(ge=10, le=900)] = 120
    """Lifetime of a card challenge (single use)."""


class CardProfileSettings(_Section):
    """File ids of an HPKI card without ISO 7816-15 directory files (HPKI.md §5)."""

    name: str
    pin_ref: Annotated[int, Field(ge=0, le=255)]
    """VERIFY P2 (``0x80 | reference``; a JMA card uses 0x88)."""
    key_fid: Annotated[int, Field(ge=0, le=0xFFFF)]
    cert_fid: Annotated[int, Field(ge=0, le=0xFFFF)]


def _default_card_profiles() -> list[CardProfileSettings]:
    return [CardProfileSettings(name="jma", pin_ref=0x88, key_fid=0x000C, cert_fid=0x0016)]


class LocalSettings(_Section):
    """Local signing with the HPKI card (``hpki-gateway local serve`` / ``sign-batch``)."""

    sign_aids: list[str] = Field(default_factory=lambda: ["E828BD080FA000000391000000000001"])
    """Signing application AIDs (hex) of the issuing bodies, tried in order."""
    card_profiles: list[CardProfileSettings] = Field(default_factory=_default_card_profiles)
    """Card layouts by file id, for cards without EF.OD/PrKDF/CDF."""
    reader: str | None = None
    """PC/SC reader name; unset: the first reader holding an HPKI card. With
    ``pkcs11_module``: the label of the card's token; unset: the first token."""
    pkcs11_module: Path | None = None
    """The card vendor's PKCS#11 module: drive the card through it instead of APDUs."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8765
    """Loopback port of the local agent (it never binds another address)."""
    secret_file: Path | None = None
    """The per-install secret callers present (0600); unset: in the user's config dir."""
    grant_seconds: Annotated[int, Field(ge=5, le=3600)] = 300
    """Lifetime of a SAD issued after the PIN (spent or expired: the card is reset)."""
    card_process: bool = True
    """Drive the card (raw APDUs) from a child process of its own, so document building and
    the card's round trips do not share the GIL; false: a thread of the agent's process."""


class TestJpkiSettings(_Section):
    """Sandbox only: the TEST JPKI CA's OCSP responder and CRL, served next to the TEST TSA."""

    enabled: bool = False
    """Serve ``/ocsp`` and ``/crl`` (plain HTTP on ``host:port``)."""
    host: str = "127.0.0.1"
    """Address to bind (loopback: for the local tester only)."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8319
    """TCP port."""
    ca_cert: Path | None = None
    """PEM certificate of the TEST JPKI CA."""
    ocsp_cert: Path | None = None
    """PEM certificate of its delegated OCSP responder."""
    ocsp_key: Path | None = None
    """PEM key of the OCSP responder."""
    crl_file: Path | None = None
    """The CA's CRL (DER), re-read on every request: revoking a test card rewrites it."""


class Settings(_Section):
    """All settings of one deployment."""

    server: ServerSettings
    store: StoreSettings = StoreSettings()
    hsm: HsmSettings = HsmSettings()
    pki: PkiSettings = PkiSettings()
    audit: AuditSettings = AuditSettings()
    certificates: CertificateSettings = CertificateSettings()
    fees: FeeSettings = FeeSettings()
    delivery: DeliverySettings = DeliverySettings()
    smtp: SmtpSettings = SmtpSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    logging: LoggingSettings = LoggingSettings()
    service: ServiceSettings = ServiceSettings()
    limits: LimitSettings = LimitSettings()
    metrics: MetricsSettings = MetricsSettings()
    signing: SigningSettings = SigningSettings()
    timestamp: TimestampSettings = TimestampSettings()
    test_tsa: TestTsaSettings = TestTsaSettings()
    fido2: Fido2Settings = Fido2Settings()
    activation: ActivationSettings = ActivationSettings()
    jpki: JpkiSettings = JpkiSettings()
    local: LocalSettings = LocalSettings()
    test_jpki: TestJpkiSettings = TestJpkiSettings()
    base_dir: Path = Path(".")
    """Directory of the settings file; relative paths are resolved against it (set by load)."""

    @field_validator("base_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.resolve()

    # -- derived -----------------------------------------------------------------------------

    def rp_id(self) -> str:
        """The WebAuthn RP ID: configured, or the host of ``server.public_url``."""
        if self.fido2.rp_id:
            return self.fido2.rp_id
        from urllib.parse import urlsplit

        host = urlsplit(self.server.public_url).hostname
        if not host:
            raise ConfigError("server.public_url has no host; set fido2.rp_id")
        return host

    def webauthn_origins(self) -> frozenset[str]:
        """Origins accepted in clientDataJSON (see ``Fido2Settings.allowed_origins``)."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.server.public_url)
        own = f"{parts.scheme}://{parts.netloc}"
        port = self.server.port
        listener = f"https://{self.rp_id()}" + ("" if port == 443 else f":{port}")
        return frozenset({own, listener, *(o.rstrip("/") for o in self.fido2.allowed_origins)})

    # -- secrets ---------------------------------------------------------------------------

    def hsm_pin(self) -> str:
        return _read_secret("hsm.pin", self.hsm.pin_file, self.hsm.pin_env)

    def store_password(self) -> str | None:
        if self.store.password_file is None and self.store.password_env is None:
            return None
        return _read_secret("store.password", self.store.password_file, self.store.password_env)

    def smtp_password(self) -> str | None:
        if self.smtp.password_file is None and self.smtp.password_env is None:
            return None
        return _read_secret("smtp.password", self.smtp.password_file, self.smtp.password_env)

    def p12_file_name(self) -> str:
        return self.certificates.p12_file_name.replace("{service}", self.service.name)

    def database_url(self) -> str:
        """The store URL with a relative SQLite path made absolute and the password applied."""
        url = self.store.url
        for prefix in ("sqlite+aiosqlite:///", "sqlite:///"):
            if url.startswith(prefix):
                path = url[len(prefix) :]
                if path and path != ":memory:" and not path.startswith("/"):
                    return prefix + str(self.base_dir / path)
                return url
        password = self.store_password()
        if password is not None:
            from sqlalchemy.engine import make_url

            return make_url(url).set(password=password).render_as_string(hide_password=False)
        return url


def _read_secret(name: str, path: Path | None, env: str | None) -> str:
    if path is not None and env is not None:
        raise ConfigError(f"{name}: set either {name}_file or {name}_env, not both")
    if path is not None:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"{name}_file: cannot read {path}: {e.strerror}") from e
        if not value:
            raise ConfigError(f"{name}_file: {path} is empty")
        return value
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            raise ConfigError(f"{name}_env: environment variable {env} is not set or empty")
        return value
    raise ConfigError(f"{name}: no secret configured; set {name}_file or {name}_env")


def _env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """Map ``section.key`` (or ``key``) -> (env var name, parsed value)."""
    out: dict[str, tuple[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        dotted = rest.replace("__", ".")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[dotted] = (name, value)
    return out


def _resolve_paths(model: BaseModel, base: Path) -> dict[str, Any]:
    """Turn every relative Path field into an absolute one under ``base``."""
    data: dict[str, Any] = {}
    for field_name in type(model).model_fields:
        value = getattr(model, field_name)
        if field_name == "base_dir":
            data[field_name] = value
        elif isinstance(value, BaseModel):
            data[field_name] = type(value).model_validate(_resolve_paths(value, base))
        elif isinstance(value, Path):
            data[field_name] = value if value.is_absolute() else (base / value)
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            data[field_name] = [v if v.is_absolute() else base / v for v in value]
        else:
            data[field_name] = value
    return data


def load_settings(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load, validate and resolve the settings; raise ConfigError naming what is wrong."""
    env = os.environ if environ is None else environ
    if path is None:
        path = env.get(CONFIG_ENV)
        if not path:
            raise ConfigError(
                f"no settings file: pass -c/--config PATH or set {CONFIG_ENV} "
                "(build one with `hpki-gateway sandbox init DIR`)"
            )
    cfg_path = Path(path)
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{cfg_path}: cannot read settings: {e.strerror}") from e
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_toml_error(cfg_path, text, e)) from e

    sources: dict[str, str] = {}
    for dotted, (env_name, value) in _env_overrides(env).items():
        parts = dotted.split(".")
        target = data
        for p in parts[:-1]:
            existing = target.setdefault(p, {})
            if not isinstance(existing, dict):
                raise ConfigError(f"environment variable {env_name}: '{p}' is not a section")
            target = existing
        target[parts[-1]] = value
        sources[dotted] = f"environment variable {env_name}"

    for section, key in _INLINE_SECRETS:
        sect = data.get(section)
        if isinstance(sect, dict) and key in sect:
            where = sources.get(f"{section}.{key}", str(cfg_path))
            raise ConfigError(
                f"{where}: '{section}.{key}': secrets are never inline; "
                f"use {section}.{key}_file or {section}.{key}_env"
            )

    data["base_dir"] = str(cfg_path.resolve().parent)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, cfg_path, sources)) from e
    return Settings.model_validate(_resolve_paths(settings, settings.base_dir))


def _toml_error(cfg_path: Path, text: str, e: tomllib.TOMLDecodeError) -> str:
    """Name the line at fault and show it (tomllib says "(at line N, column M)")."""
    msg = str(e)
    lines = text.splitlines()
    m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
    if m:
        lineno = int(m.group(1))
    elif "end of document" in msg:
        lineno = max(len(lines), 1)
    else:
        return f"{cfg_path}: not valid TOML: {msg}"
    shown = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
    reason = re.sub(r"\s*\(at [^)]*\)$", "", msg)
    return f"{cfg_path}:{lineno}: not valid TOML: {reason}\n  line {lineno}: {shown}"


def _format_validation_error(e: ValidationError, cfg_path: Path, sources: dict[str, str]) -> str:
    lines = []
    for err in e.errors():
        dotted = ".".join(str(p) for p in err["loc"])
        where = sources.get(dotted, str(cfg_path))
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown setting '{dotted}'")
        elif err["type"] == "missing":
            lines.append(f"{where}: missing required setting '{dotted}'")
        else:
            got = err.get("input")
            lines.append(f"{where}: setting '{dotted}': {err['msg']} (got {got!r})")
    return "invalid settings:\n  " + "\n  ".join(lines)
