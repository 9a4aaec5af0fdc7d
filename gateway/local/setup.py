"""Build the local agent from the settings (the same TOML as the gateway's, or a small one with
``[pki]``, ``[timestamp]``, ``[signing]`` and ``[local]``)."""

from __future__ import annotations

from pathlib import Path

from gateway.card.errors import CardError
from gateway.card.hpki import CardProfile
from gateway.card.pcsc import list_readers
from gateway.clock import Clock, system_clock
from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.hsm.card import CardKeyStore, CardStore
from gateway.hsm.card_process import CardProcessStore
from gateway.local.agent import LocalAgent, Trust
from gateway.pki.load import load_certificate_files
from gateway.sign.setup import signing_policy, tsa_client


def card_store(
    settings: Settings, reader: str | None = None, *, process: bool | None = None
) -> CardStore:
    """The card store of ``reader`` (or ``local.reader``, or the first reader): in a child
    process (``local.card_process``, or ``process``) or on a thread of this one."""
    s = settings.local
    name = reader or s.reader
    if name is None:
        try:
            readers = list_readers()
        except CardError as e:
            raise ConfigError(e.message("en")) from e
        if not readers:
            raise ConfigError("no PC/SC reader found (name one with --reader or local.reader)")
        name = readers[0]
    try:
        aids = [bytes.fromhex(a) for a in s.sign_aids]
    except ValueError as e:
        raise ConfigError(f"local.sign_aids: {e}") from e
    profiles = [
        CardProfile(p.name, pin_ref=p.pin_ref, key_fid=p.key_fid, cert_fid=p.cert_fid)
        for p in s.card_profiles
    ]
    if settings.local.card_process if process is None else process:
        return CardProcessStore(name, aids=aids, profiles=profiles)
    return CardKeyStore(name, aids=aids, profiles=profiles)


def pkcs11_card_store(module: Path, token_label: str | None) -> CardStore:
    from gateway.hsm.card_pkcs11 import Pkcs11CardStore  # python-pkcs11 only when asked for

    if not module.is_file():
        raise ConfigError(f"PKCS#11 module not found: {module}")
    return Pkcs11CardStore(str(module), token_label=token_label)


def build_local_agent(
    settings: Settings,
    reader: str | None = None,
    *,
    pkcs11_module: str | Path | None = None,
    clock: Clock = system_clock,
) -> LocalAgent:
    """The agent for the card in ``reader`` (or ``local.reader``), through raw APDUs, or
    through the vendor PKCS#11 module of ``pkcs11_module`` (or ``local.pkcs11_module``)."""
    trust = Trust(
        anchors=load_certificate_files(settings.pki.hpki_trust_anchors),
        intermediates=load_certificate_files(settings.pki.hpki_intermediates),
    )
    if not trust.anchors:
        raise ConfigError(
            "pki.hpki_trust_anchors is empty: the card's certificate cannot be checked"
        )
    module = pkcs11_module or settings.local.pkcs11_module
    store = (
        pkcs11_card_store(Path(module), reader or settings.local.reader)
        if module
        else card_store(settings, reader)
    )
    return LocalAgent(
        store=store,
        trust=trust,
        policy=signing_policy(settings),
        tsa=tsa_client(settings),
        grant_seconds=settings.local.grant_seconds,
        clock=clock,
    )
