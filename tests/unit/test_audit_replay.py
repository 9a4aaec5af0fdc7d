"""``audit verify``'s replay of the SAD ledger (``gateway.audit._SadReplay``): each check on
its own, over event fields as the chain holds them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.audit import _SadReplay

H1, H2 = "aa" * 32, "bb" * 32
TS = "2026-11-28T10:00:00.000000+00:00"


def _issued(**over: Any) -> _SadReplay:
    replay = _SadReplay()
    detail = {
        "sad": 7, "credential": "cred-1", "scal": "2", "num_signatures": 2,
        "hashes": [H1, H2], "expires_at": "2026-11-28T10:05:00+00:00", **over,
    }  # fmt: skip
    assert replay.see("sad.issue", TS, "1310000011", json.dumps(detail)) is None
    return replay


def _spend(replay: _SadReplay, *, fac: str = "1310000011", ts: str = TS, **over: Any) -> Any:
    detail = {"sad": 7, "credential": "cred-1", "hashes": [H1], **over}
    return replay.see("signature.sign_hash", ts, fac, json.dumps(detail))


def test_an_approved_spend_passes_and_its_refund_gives_it_back() -> None:
    replay = _issued()
    assert _spend(replay) is None
    assert "not issued for" in _spend(replay)  # H1 was authorized once
    refund = {"sad": 7, "credential": "cred-1", "hashes": [H1], "refunded": True}
    replay.see("signature.failed", TS, "1310000011", json.dumps(refund))
    assert _spend(replay) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sad": 8}, "which no sad.issue event issued"),
        ({"credential": "cred-2"}, "another credential"),
        ({"fac": "1310000029"}, "another facility"),
        ({"ts": "2026-11-28T10:05:00.000000+00:00"}, "after it expired"),
        ({"hashes": [H1, H2, H1]}, "beyond the number of signatures"),
        ({"hashes": ["cc" * 32]}, "not issued for"),
    ],
)
def test_a_spend_outside_its_approval_is_named(kwargs: dict[str, Any], message: str) -> None:
    assert message in _spend(_issued(), **kwargs)


def test_sign_doc_spends_its_document_digests_and_events_without_a_sad_are_skipped() -> None:
    replay = _issued()
    doc = {"sad": 7, "credential": "cred-1", "documents": [{"digest": H2}]}
    assert replay.see("signature.sign_doc", TS, "1310000011", json.dumps(doc)) is None
    again = replay.see("signature.sign_doc", TS, "1310000011", json.dumps(doc))
    assert again is not None and "not issued for" in again
    old = {"credential": "cred-1", "hashes": [H1]}  # an event from before SADs were named
    assert replay.see("signature.sign_hash", TS, "1310000011", json.dumps(old)) is None
