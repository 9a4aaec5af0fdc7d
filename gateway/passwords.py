"""Short secrets typed by people: scrypt verifiers and a counted, locking attempt limit.

Enrolment passwords (FIDO2) and download passwords (PKCS#12 delivery) share both rules:
the store keeps only an scrypt verifier, and wrong guesses are limited per code. hashlib's
scrypt is used directly because the verifier format (``scrypt$N$r$p$salt$dk``) is already
stored in existing databases; passlib/argon2 would change it.

The limit is enforced with two counters on the row: ``failed`` counts wrong passwords that
were checked, ``checking`` the checks under way. An attempt is reserved (``checking + 1``)
before the slow scrypt check, only while ``failed + checking < limit``, so however many guesses
arrive at once at most ``limit`` passwords are ever checked. A wrong password moves its
reservation to ``failed`` and the row locks when ``failed`` reaches the limit; a right one
gives its reservation back. Keeping the two apart is what makes "locked after N wrong
passwords" exact: a single counter cannot tell a reservation held by the right password from a
failure, and locks one guess early when the right password gives its slot back meanwhile.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Table, case, update
from sqlalchemy.ext.asyncio import AsyncConnection

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """An scrypt verifier ``scrypt$N$r$p$salt$dk`` (CPU-heavy: run it in a thread)."""
    salt = salt or secrets.token_bytes(16)
    dk = hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(dk).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check against an scrypt verifier (CPU-heavy: run it in a thread)."""
    try:
        scheme, n, r, p, salt_b64, dk_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        dk = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt_b64),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=32,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(dk, base64.b64decode(dk_b64))


@dataclass(frozen=True)
class AttemptLimit:
    """The attempt counters of one table (see the module docstring).

    ``failed`` and ``checking`` name integer columns of ``table``. Every method takes the
    condition selecting the row while it is still usable (``open_row``): a row that stopped
    being usable is never counted.
    """

    table: Table
    failed: str
    checking: str

    async def reserve(
        self, conn: AsyncConnection, open_row: ColumnElement[bool], limit: int
    ) -> bool:
        """Reserve one check; False when none is left (locked, or all being checked)."""
        t = self.table.c
        res = await conn.execute(
            update(self.table)
            .where(open_row, t[self.failed] + t[self.checking] < limit)
            .values({self.checking: t[self.checking] + 1})
        )
        return res.rowcount == 1

    async def give_back(self, conn: AsyncConnection, open_row: ColumnElement[bool]) -> bool:
        """The reserved check found the right password: its slot is free again."""
        t = self.table.c
        res = await conn.execute(
            update(self.table)
            .where(open_row, t[self.checking] > 0)
            .values({self.checking: t[self.checking] - 1})
        )
        return res.rowcount == 1

    async def failed_check(
        self,
        conn: AsyncConnection,
        row: ColumnElement[bool],
        open_row: ColumnElement[bool],
        limit: int,
        lock: Mapping[str, Any],
    ) -> tuple[int, bool] | None:
        """The reserved check found a wrong password: count it; the ``limit``-th locks.

        Returns (wrong passwords so far, whether this one locked the row). ``row`` selects the
        row whatever its state (a concurrent change must not lose the count); only an
        ``open_row`` is locked, by writing the values ``lock``. None when ``row`` no longer
        selects anything (a download link replaced by a resend while its password was being
        checked): nothing is counted, and the caller answers as for the replaced row.
        """
        t = self.table.c
        counted = (
            await conn.execute(
                update(self.table)
                .where(row)
                .values(
                    {
                        self.failed: t[self.failed] + 1,
                        self.checking: case((t[self.checking] > 0, t[self.checking] - 1), else_=0),
                    }
                )
                .returning(t[self.failed])
            )
        ).one_or_none()
        if counted is None:
            return None
        failed = int(counted[0])
        if failed < limit:
            return failed, False
        res = await conn.execute(update(self.table).where(open_row).values(dict(lock)))
        return failed, res.rowcount == 1
