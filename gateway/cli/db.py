"""``db``: the store's schema."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.common import config_flags, emit, settings_of


async def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from gateway.store.db import Database

    db = Database(settings_of(args).database_url())
    try:
        await db.migrate()
        rev = await db.current_revision()
    finally:
        await db.close()
    emit(args, {"revision": rev}, f"database schema at revision {rev}")
    return 0


def register(sub: Any) -> None:
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="sub", required=True)
    p = db.add_parser("upgrade", help="apply migrations up to the newest schema")
    config_flags(p)
    p.set_defaults(func=cmd_db_upgrade)
