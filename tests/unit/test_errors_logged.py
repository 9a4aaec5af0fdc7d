"""How a gateway error is written to the server log: its description and the type of its
cause, never the cause's text (which may carry request data)."""

from __future__ import annotations

import sqlite3

from gateway.errors import InvalidRequest, TemporarilyUnavailable


def test_logged_names_the_cause_type_only() -> None:
    secret = "PIN 1234 in the driver's message"
    try:
        try:
            raise sqlite3.OperationalError(secret)
        except sqlite3.OperationalError as e:
            raise TemporarilyUnavailable("database unavailable", retry_after=2) from e
    except TemporarilyUnavailable as e:
        assert e.logged == "database unavailable (cause: OperationalError)"
        assert secret not in e.logged


def test_logged_without_a_cause_is_the_description() -> None:
    assert InvalidRequest("bad input").logged == "bad input"
