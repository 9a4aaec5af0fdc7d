"""Time for the certificate lifecycle: an injectable clock, Japanese calendar dates, months.

Every service that decides by time (issuance dates, the 14-day download window, reminders,
scheduled revocation) takes a ``Clock`` instead of calling ``datetime.now``: tests then walk
through three years in milliseconds without sleeping, and the CLI and server pass
:func:`system_clock`.

Dates shown to facilities (expiry date, days left, "one month after the issue date") are
calendar dates in Japan (JST, UTC+9; Japan has no daylight saving time, so a fixed offset is
exact and needs no tz database).
"""

from __future__ import annotations

import calendar
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone

Clock = Callable[[], datetime]
"""Returns the current time as an aware UTC datetime."""

JST = timezone(timedelta(hours=9), "JST")


def system_clock() -> datetime:
    return datetime.now(UTC)


def add_months(when: datetime, months: int) -> datetime:
    """The same wall-clock time ``months`` calendar months later, in JST.

    A day that does not exist in the target month is clamped to the month's last day: one month
    after 31 January is 28 (or 29) February, one month after 31 March is 30 April. This is how
    Japanese contracts count 「1か月後」 (民法 143条: the period ends on the corresponding day,
    or on the last day of the month when there is none), and it never skips into the month after.
    """
    local = when.astimezone(JST)
    month_index = local.month - 1 + months
    year = local.year + month_index // 12
    month = month_index % 12 + 1
    day = min(local.day, calendar.monthrange(year, month)[1])
    return local.replace(year=year, month=month, day=day).astimezone(UTC)


def jst_date(when: datetime) -> date:
    return when.astimezone(JST).date()


def days_left(not_after: datetime, now: datetime) -> int:
    """Calendar days (JST) from today until the expiry date; 0 on the expiry day itself."""
    return (jst_date(not_after) - jst_date(now)).days
