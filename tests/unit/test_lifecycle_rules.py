"""Lifecycle rules without I/O: calendar months, reminder days, codes, labels, secrets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.clock import JST, add_months, days_left
from gateway.errors import ConfigError, GatewayError, InvalidRequest
from gateway.lifecycle.delivery import P12Wrapper, hash_password, verify_password
from gateway.lifecycle.facilities import (
    normalize_serial,
    validate_dental_link,
    validate_terminal_label,
)
from gateway.lifecycle.scheduler import milestones, reminder_kind


@pytest.mark.parametrize(
    ("start", "months", "expected"),
    [
        (datetime(2026, 1, 31, 10, tzinfo=JST), 1, datetime(2026, 2, 28, 10, tzinfo=JST)),
        (datetime(2028, 1, 31, 10, tzinfo=JST), 1, datetime(2028, 2, 29, 10, tzinfo=JST)),
        (datetime(2026, 3, 31, 10, tzinfo=JST), 1, datetime(2026, 4, 30, 10, tzinfo=JST)),
        (datetime(2026, 12, 15, 10, tzinfo=JST), 1, datetime(2027, 1, 15, 10, tzinfo=JST)),
        (datetime(2026, 1, 31, 10, tzinfo=JST), 39, datetime(2029, 4, 30, 10, tzinfo=JST)),
        (datetime(2026, 5, 31, 10, tzinfo=JST), -1, datetime(2026, 4, 30, 10, tzinfo=JST)),
        # 20:00 UTC on 31 January is already 1 February in Japan: the JST calendar counts.
        (datetime(2026, 1, 31, 20, tzinfo=UTC), 1, datetime(2026, 3, 1, 5, tzinfo=JST)),
    ],
)
def test_add_months_counts_japanese_calendar_months(
    start: datetime, months: int, expected: datetime
) -> None:
    assert add_months(start, months) == expected


def test_days_left_is_in_jst_calendar_days() -> None:
    expiry = datetime(2027, 3, 1, 9, tzinfo=JST)
    assert days_left(expiry, datetime(2027, 2, 28, 23, 59, tzinfo=JST)) == 1
    assert days_left(expiry, datetime(2027, 3, 1, 0, 0, tzinfo=JST)) == 0
    assert days_left(expiry, datetime(2027, 2, 28, 15, 1, tzinfo=UTC)) == 0  # 00:01 JST


def test_milestones() -> None:
    assert milestones([90, 60, 30, 15, 7]) == [90, 60, 30, 15, 7, 6, 5, 4, 3, 2, 1, 0]
    assert milestones([30, 3]) == [30, 3, 2, 1, 0]


@pytest.mark.parametrize(
    ("days_before", "kind"),
    [
        (120, None),
        (91, None),
        (90, "expiry-90d"),
        (75, "expiry-90d"),
        (60, "expiry-60d"),
        (31, "expiry-60d"),
        (30, "expiry-30d"),
        (15, "expiry-15d"),
        (8, "expiry-15d"),
        (7, "expiry-7d"),
        (6, "expiry-6d"),
        (1, "expiry-1d"),
        (0, "expiry-0d"),
    ],
)
def test_reminder_kind(days_before: int, kind: str | None) -> None:
    expiry = datetime(2029, 4, 30, 10, tzinfo=JST)
    now = datetime(2029, 4, 30, 8, tzinfo=JST) - timedelta(days=days_before)
    assert reminder_kind(expiry, now, milestones([90, 60, 30, 15, 7])) == kind


def test_reminder_kind_at_expiry() -> None:
    expiry = datetime(2029, 4, 30, 10, tzinfo=JST)
    schedule = milestones([90, 60, 30, 15, 7])
    assert reminder_kind(expiry, expiry - timedelta(seconds=1), schedule) == "expiry-0d"
    assert reminder_kind(expiry, expiry, schedule) == "expired"


@pytest.mark.parametrize(
    ("medical", "dental", "needle"),
    [
        ("1340000019", "1330000015", "medical"),
        ("1310000011", "1310000029", "not a dental"),
        ("1310000011", "2730000012", "prefecture 27"),
        ("1310000011", "13300000", "exactly 10 digits"),
    ],
)
def test_dental_link_rules(medical: str, dental: str, needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle):
        validate_dental_link(medical, dental)
    validate_dental_link("1310000011", "1330000015")


@pytest.mark.parametrize(
    ("label", "needle"),
    [("", "empty"), ("   ", "empty"), ("a" * 65, "longer than 64"), ("端末\n01", "control")],
)
def test_terminal_label_rules(label: str, needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle):
        validate_terminal_label(label)
    assert validate_terminal_label(" 総合受付 端末01 ") == "総合受付 端末01"


@pytest.mark.parametrize(
    ("given", "expected"), [("0x0A1B", "a1b"), ("0A:1B", "a1b"), ("A1B", "a1b"), ("00", "0")]
)
def test_serial_forms(given: str, expected: str) -> None:
    assert normalize_serial(given) == expected


def test_serial_not_hex() -> None:
    with pytest.raises(InvalidRequest, match="not hexadecimal"):
        normalize_serial("xyz")


def test_download_password_verifier() -> None:
    stored = hash_password("Abc234")
    assert "Abc234" not in stored and stored.startswith("scrypt$")
    assert verify_password("Abc234", stored)
    assert not verify_password("abc234", stored)
    assert not verify_password("Abc234", "garbage")


def test_p12_wrapping_is_bound_to_the_serial() -> None:
    w = P12Wrapper(b"k" * 32)
    blob = w.wrap(b"pkcs12 bytes", "a1")
    assert b"pkcs12 bytes" not in blob
    assert w.unwrap(blob, "a1") == b"pkcs12 bytes"
    with pytest.raises(GatewayError, match="cannot be decrypted"):
        w.unwrap(blob, "a2")
    with pytest.raises(GatewayError, match="cannot be decrypted"):
        P12Wrapper(b"x" * 32).unwrap(blob, "a1")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        P12Wrapper(b"short")
