"""The sandbox's switched-on failure scenarios, one JSON file beside its gateway.toml.

Shared by the gateway's workers (``api/scenarios.py``: the catalog, the switches, the effects)
and the TEST OCSP responder of ``serve`` (``sandbox/tsa.py``), which run in separate processes:
a file every one of them reads is the simplest shared state, and it is written atomically.

Keys: ``facility:<code>`` and ``credential:<id>`` name what the scenarios are switched on for;
``serial:<hex>:<credential id>`` carries the certificate serial of an OCSP scenario, which is
what the responder sees; ``since:<target>:<scenario>`` when a scenario was switched on (the date
the identity check's answer names); ``locked:<code>`` the enrolment codes ``enrolment_locked``
locked, as ``"<id>:<failed_tries>:<checking_tries>"``, for the reset to put back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from gateway.config import Settings
from gateway.files import replace_atomically

__all__ = ["FILE", "OCSP_SCENARIOS", "active", "ocsp_scenario", "save", "serial_key", "snapshot"]

FILE = "scenarios.json"
#: Scenario name -> what the TEST OCSP responder answers for the certificate.
OCSP_SCENARIOS = {"ocsp_revoked": "revoked", "ocsp_unknown": "unknown"}


def _path(settings: Settings) -> Path:
    return settings.base_dir / FILE


#: The last file read, by path: its identity (device, inode, size, modification time) and
#: what it said. ``save`` replaces the file (a new inode every time), so a file with the same
#: identity says the same: one ``stat`` per request instead of reading and parsing the file
#: (the sandbox's middlewares ask on every request).
_read: dict[str, tuple[tuple[int, int, int, int], Mapping[str, tuple[str, ...]]]] = {}
_EMPTY: Mapping[str, tuple[str, ...]] = MappingProxyType({})


def snapshot(settings: Settings) -> Mapping[str, tuple[str, ...]]:
    """Every switched-on scenario, ``{key: (scenario, ...)}``, read-only: what the sandbox's
    middlewares read on every request (no copy; ``active`` gives one to change)."""
    path = str(settings.base_dir) + "/" + FILE  # os.stat on a str: no Path built per request
    try:
        st = os.stat(path)
    except OSError:
        return _EMPTY
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    seen = _read.get(path)
    if seen is not None and seen[0] == ident:
        return seen[1]
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return _EMPTY
    if not isinstance(data, dict):
        return _EMPTY
    out = MappingProxyType(
        {str(k): tuple(str(x) for x in v) for k, v in data.items() if isinstance(v, list)}
    )
    _read[path] = (ident, out)
    return out


def active(settings: Settings) -> dict[str, list[str]]:
    """Every switched-on scenario: ``{key: [scenario, ...]}`` (empty when none), a copy the
    caller may change."""
    return {k: list(v) for k, v in snapshot(settings).items()}


def save(settings: Settings, data: dict[str, list[str]]) -> None:
    target = _path(settings)
    text = json.dumps({k: sorted(v) for k, v in sorted(data.items()) if v}, indent=2)
    replace_atomically(target, text.encode("utf-8"), mode=0o600)  # never half a file


def serial_key(serial: int, credential: str) -> str:
    return f"serial:{serial:x}:{credential}"


def ocsp_scenario(settings: Settings, serial: int) -> str | None:
    """``"revoked"`` / ``"unknown"`` when an OCSP scenario is on for this serial."""
    if not settings.service.sandbox:
        return None
    prefix = f"serial:{serial:x}:"
    for key, names in snapshot(settings).items():
        if key.startswith(prefix):
            for name in names:
                if name in OCSP_SCENARIOS:
                    return OCSP_SCENARIOS[name]
    return None
