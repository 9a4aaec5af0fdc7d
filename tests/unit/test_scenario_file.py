"""The sandbox's scenario file as the middlewares read it on every request: one ``stat``, the
parsed contents shared read-only until the file is replaced; ``active`` hands out a copy."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from gateway.config import Settings
from gateway.scenario_file import active, save, snapshot


def _settings(tmp_path: Path) -> Settings:
    return cast(Settings, SimpleNamespace(base_dir=tmp_path))  # all the file needs of them


def test_snapshot_is_shared_read_only_and_follows_the_file(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert dict(snapshot(settings)) == {} and active(settings) == {}
    save(settings, {"facility:1310000011": ["tsa_down"]})
    first = snapshot(settings)
    assert dict(first) == {"facility:1310000011": ("tsa_down",)}
    assert snapshot(settings) is first  # unchanged file: not read again
    with pytest.raises(TypeError):
        first["facility:1310000011"] = ("hsm_unavailable",)  # type: ignore[index]
    copy = active(settings)
    copy["facility:1310000011"].append("hsm_unavailable")
    assert dict(snapshot(settings)) == {"facility:1310000011": ("tsa_down",)}
    save(settings, {"facility:1310000011": ["tsa_down", "hsm_unavailable"]})
    assert dict(snapshot(settings)) == {"facility:1310000011": ("hsm_unavailable", "tsa_down")}
    save(settings, {})
    assert dict(snapshot(settings)) == {}
