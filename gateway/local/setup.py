"""Build the local agent from the settings (the same TOML as the gateway's, or a small one with
``[pki]``, ``[timestamp]``, ``[signing]`` and ``[local]``)."""

from __future__ import annotations

from gateway.card.errors import CardError
from gateway.card.hpki import CardProfile
from gateway.card.pcsc import list_readers
from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.hsm.card import CardKeyStore
from gateway.local.agent import LocalAgent, Trust
from gateway.pki.load import load_certificate_files
from gateway.sign.setup import signing_policy, tsa_client


def card_store(settings: Settings, reader: str | None = None) -> CardKeyStore:
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
    return CardKeyStore(name, aids=aids, profiles=profiles)


def build_local_agent(settings: Settings, reader: str | None = None) -> LocalAgent:
    trust = Trust(
        anchors=load_certificate_files(settings.pki.hpki_trust_anchors),
        intermediates=load_certificate_files(settings.pki.hpki_intermediates),
    )
    if not trust.anchors:
        raise ConfigError(
            "pki.hpki_trust_anchors is empty: the card's certificate cannot be checked"
        )
    return LocalAgent(
        store=card_store(settings, reader),
        trust=trust,
        policy=signing_policy(settings),
        tsa=tsa_client(settings),
        grant_seconds=settings.local.grant_seconds,
    )
