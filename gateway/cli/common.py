"""What every command shares: the settings, the services, the actor and the output."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from gateway.clock import Clock, system_clock
from gateway.config import Settings, load_settings

Action = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str))
    else:
        print(text)


def settings_of(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def config_flags(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    p.add_argument(
        "-c",
        "--config",
        default=None,
        help="settings file (default: env HPKI_GATEWAY_CONFIG)",
    )
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def read_input(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def write_output(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        Path(path).write_bytes(data)
        print(f"written to {path}", file=sys.stderr)


class Context:
    """The services for one command, built by the app's factory; closed when the command ends.

    ``with_keystore=False`` opens no HSM session: commands that touch no key keep working
    while the token is down.
    """

    def __init__(
        self, settings: Settings, *, with_keystore: bool, clock: Clock = system_clock
    ) -> None:
        from gateway.app import build_services, make_keystore

        self.settings = settings
        self.clock = clock
        self.keystore = make_keystore(settings) if with_keystore else None
        services = build_services(settings, keystore=self.keystore, clock=clock)
        self.db = services.db
        self.audit = services.audit
        self.facilities = services.facilities
        self.certificates = services.certificates
        self.signers = services.signers
        self.fido2 = services.fido2
        self.activation = services.activation

    async def __aenter__(self) -> Context:
        await self.db.migrate()
        if self.keystore is not None:
            await self.keystore.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.keystore is not None:
            await self.keystore.close()
        await self.db.close()
