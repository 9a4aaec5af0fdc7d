"""Institution codes: 10 digits = prefecture 01-47 + fee table 1/3/4 + 7-digit number."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.lifecycle.facilities import validate_institution_code


@pytest.mark.parametrize("code", ["1310000011", "0110000018", "4740000010", "2730000012"])
def test_valid(code: str) -> None:
    assert validate_institution_code(code) == code


@pytest.mark.parametrize(
    ("code", "needle"),
    [
        ("131000001", "exactly 10 digits"),
        ("13100000111", "exactly 10 digits"),
        ("13100000a1", "exactly 10 digits"),
        ("１３１０００００１１", "exactly 10 digits"),  # full-width digits
        ("0010000011", "prefecture 00"),
        ("4810000011", "prefecture 48"),
        ("1320000011", "fee table 2"),
        ("1350000011", "fee table 5"),
        (" 1310000011", "exactly 10 digits"),
    ],
)
def test_invalid(code: str, needle: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        validate_institution_code(code)
    assert needle in e.value.description
