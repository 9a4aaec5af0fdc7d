"""Pure parts of FIDO2 enrolment and activation: binding, codes, passwords, counters, policy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gateway.auth.activation import SigningSessionPolicy
from gateway.auth.challenges import bound_challenge, canonical_binding
from gateway.auth.fido2 import (
    code_hash,
    hash_password,
    new_enrollment_code,
    new_enrollment_password,
    sign_count_ok,
    verify_password,
)
from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.signing.ledger import token_hash


def test_binding_is_the_documented_canonical_json() -> None:
    a, b = b"\x01" * 32, b"\x00" * 32
    got = canonical_binding(
        credential_id="cred-1", hash_algorithm_oid="2.16.840.1.101.3.4.2.1", hashes=[a, b],
        num_signatures=2,
    )  # fmt: skip
    assert got == (
        b'{"credentialID":"cred-1","hashAlgorithmOID":"2.16.840.1.101.3.4.2.1",'
        b'"hashes":["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",'
        b'"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="],"numSignatures":2}'
    )
    # Order of the hashes does not matter; multiplicity does.
    assert got == canonical_binding(
        credential_id="cred-1", hash_algorithm_oid="2.16.840.1.101.3.4.2.1", hashes=[b, a],
        num_signatures=2,
    )  # fmt: skip
    assert got != canonical_binding(
        credential_id="cred-1", hash_algorithm_oid="2.16.840.1.101.3.4.2.1", hashes=[a, a, b],
        num_signatures=2,
    )  # fmt: skip


def test_bound_challenge_layout() -> None:
    nonce = bytes(range(16))
    c = bound_challenge(nonce, b"{}")
    assert len(c) == 48
    assert c[:16] == nonce
    assert c[16:] == hashlib.sha256(b"{}").digest()


@pytest.mark.parametrize(
    ("stored", "received", "ok"),
    [(0, 0, True), (0, 1, True), (5, 6, True), (5, 5, False), (5, 4, False), (5, 0, False)],
)
def test_sign_count_must_grow(stored: int, received: int, ok: bool) -> None:
    assert sign_count_ok(stored, received) is ok


def test_codes_and_passwords() -> None:
    code = new_enrollment_code()
    assert len(code) == 19 and code.count("-") == 3
    assert code_hash(code) == code_hash(code.lower().replace("-", " "))
    pw = new_enrollment_password()
    stored = hash_password(pw)
    assert stored.startswith("scrypt$") and pw not in stored
    assert verify_password(pw, stored)
    assert not verify_password(pw + "x", stored)
    assert not verify_password(pw, "garbage")
    assert len(token_hash("x")) == 64


def test_session_policy_is_capped() -> None:
    pol = SigningSessionPolicy.from_policy(
        {"signing_session": {"enabled": True, "max_signatures": 5000, "hours": 48}}
    )
    capped = pol.capped(max_hours=18, max_signatures=1000)
    assert (capped.enabled, capped.hours, capped.max_signatures) == (True, 18, 1000)
    assert SigningSessionPolicy.from_policy({}).enabled is False


def _settings(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(
        '[server]\nport = 9443\npublic_url = "https://gw.example.jp"\ntls_cert = "a"\n'
        'tls_key = "b"\nclient_ca = "c"\n' + extra
    )
    return p


def test_rp_id_and_origins(tmp_path: Path) -> None:
    s = load_settings(
        _settings(tmp_path, '[fido2]\nallowed_origins = ["https://emr.example.jp/"]\n'),
        environ={},
    )
    assert s.rp_id() == "gw.example.jp"
    assert s.webauthn_origins() == {
        "https://gw.example.jp",
        "https://gw.example.jp:9443",
        "https://emr.example.jp",
    }
    assert s.activation.sad_ttl_seconds == 300
    assert s.fido2.challenge_ttl_seconds == 120


def test_unknown_fido2_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting 'fido2\.rp_idd'"):
        load_settings(_settings(tmp_path, '[fido2]\nrp_idd = "x"\n'), environ={})
    with pytest.raises(ConfigError, match="signing_session_max_hours"):
        load_settings(
            _settings(tmp_path, "[activation]\nsigning_session_max_hours = 30\n"), environ={}
        )


@pytest.mark.parametrize("authenticators", [1, 3, 16])
def test_request_options_are_python_fido2s_own(authenticators: int) -> None:
    """authenticate/begin builds its options and state from a template of python-fido2's
    output; they must be exactly what python-fido2 itself returns for the same challenge."""
    from fido2.server import Fido2Server
    from fido2.utils import websafe_encode
    from fido2.webauthn import (
        PublicKeyCredentialDescriptor,
        PublicKeyCredentialRpEntity,
        PublicKeyCredentialType,
        UserVerificationRequirement,
    )

    from gateway.audit import AuditLog
    from gateway.auth.fido2 import Fido2Authenticator, _allow_credentials
    from gateway.store.db import Database

    auth = Fido2Authenticator(
        db=Database("sqlite+aiosqlite://"), audit=AuditLog(), rp_id="localhost", rp_name="TEST",
        origins=frozenset({"https://localhost"}),
    )  # fmt: skip
    assert auth._template is not None  # the template is in use, not the fallback
    server = Fido2Server(PublicKeyCredentialRpEntity(name="TEST", id="localhost"))
    for n in range(5):
        challenge = hashlib.sha256(bytes([n])).digest() + bytes(16)
        raw_ids = [hashlib.sha256(bytes([n, i])).digest() for i in range(authenticators)]
        ids = tuple(websafe_encode(r) for r in raw_ids)
        options, state = server.authenticate_begin(
            credentials=[
                PublicKeyCredentialDescriptor(type=PublicKeyCredentialType.PUBLIC_KEY, id=r)
                for r in raw_ids
            ],
            user_verification=UserVerificationRequirement.REQUIRED,
            challenge=challenge,
        )
        ours, our_state = auth._request_options(challenge)
        assert json.dumps(
            {**ours, "allowCredentials": _allow_credentials(ids)}, sort_keys=True
        ) == json.dumps(dict(options.public_key), sort_keys=True)
        assert json.loads(our_state) == json.loads(json.dumps(state))


def _assertion() -> tuple[dict[str, object], object, str]:
    """A software authenticator's assertion (as a browser's JSON), its public key and the
    challenge it signed."""
    import os

    from fido2.utils import websafe_encode

    from tests.support.webauthn import SoftAuthenticator

    soft = SoftAuthenticator(origin="https://localhost")
    challenge = websafe_encode(os.urandom(48))
    options = {
        "challenge": challenge,
        "rpId": "localhost",
        "allowCredentials": [{"id": soft.credential_id_b64, "type": "public-key"}],
    }
    return soft.get(options), soft, challenge


def test_a_browsers_assertion_is_parsed_as_python_fido2_parses_it() -> None:
    """The assertions browsers send (toJSON: id, rawId, type, response, empty extension
    results) are built from their parts; the result equals python-fido2's from_dict."""
    from fido2.webauthn import AuthenticationResponse

    from gateway.auth.fido2 import Fido2Authenticator, _plain_assertion

    sent, _, _ = _assertion()
    trimmed = {k: v for k, v in sent.items() if k not in ("id", "type", "clientExtensionResults")}
    for data in (sent, trimmed):
        ours = _plain_assertion(data)
        assert ours is not None
        assert ours == AuthenticationResponse.from_dict(data)
        assert Fido2Authenticator.parse_assertion(data) == ours


@pytest.mark.parametrize(
    "change",
    [
        {"authenticatorAttachment": "cross-platform"},
        {"clientExtensionResults": {"appid": True}},
        {"response": "userHandle"},
        {"id": "AAAA"},
        {"type": "password"},
    ],
)
def test_other_assertion_shapes_are_python_fido2s_to_parse(change: dict[str, object]) -> None:
    """Anything else goes to from_dict, which takes it or refuses it as before (id other
    than rawId, another type: 400)."""
    from fido2.webauthn import AuthenticationResponse

    from gateway.auth.fido2 import Fido2Authenticator, _plain_assertion
    from gateway.errors import InvalidRequest

    sent, _, _ = _assertion()
    data = dict(sent)
    if change == {"response": "userHandle"}:
        data["response"] = {**sent["response"], "userHandle": "dXNlcg"}  # type: ignore[dict-item]
    else:
        data.update(change)
    assert _plain_assertion(data) is None
    try:
        expected = AuthenticationResponse.from_dict(data)
    except Exception:  # noqa: BLE001 - python-fido2 refuses it: so must we
        with pytest.raises(InvalidRequest):
            Fido2Authenticator.parse_assertion(data)
    else:
        assert Fido2Authenticator.parse_assertion(data) == expected


def test_a_stored_es256_key_is_loaded_once_and_verifies_as_python_fido2s() -> None:
    """``_attested`` keeps the credential's public key loaded; python-fido2's
    authenticate_complete accepts the real signature and refuses a changed one."""
    from fido2.cose import ES256
    from fido2.server import Fido2Server
    from fido2.utils import websafe_decode
    from fido2.webauthn import (
        Aaguid,
        AttestedCredentialData,
        PublicKeyCredentialRpEntity,
        UserVerificationRequirement,
    )

    from gateway.auth.fido2 import _ES256, Fido2Authenticator, _attested

    sent, soft, challenge = _assertion()
    stored = AttestedCredentialData.create(
        Aaguid.NONE,
        websafe_decode(soft.credential_id_b64),
        ES256.from_cryptography_key(soft.key.public_key()),
    )
    cred = _attested(bytes(stored))
    assert type(cred.public_key) is _ES256 and dict(cred.public_key) == dict(stored.public_key)
    server = Fido2Server(PublicKeyCredentialRpEntity(name="TEST", id="localhost"))
    state = {"challenge": challenge, "user_verification": UserVerificationRequirement.REQUIRED}
    good = Fido2Authenticator.parse_assertion(sent)
    assert server.authenticate_complete(state, [cred], good) is cred
    response = dict(sent["response"])  # type: ignore[call-overload]
    signature = bytearray(websafe_decode(response["signature"]))
    signature[-1] ^= 1
    from fido2.utils import websafe_encode

    bad = Fido2Authenticator.parse_assertion(
        {**sent, "response": {**response, "signature": websafe_encode(bytes(signature))}}
    )
    with pytest.raises(ValueError, match="Invalid signature"):
        server.authenticate_complete(state, [cred], bad)
