"""replace_atomically on a real directory: whole files, modes, nothing left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway import files


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_a_new_file_takes_the_given_mode_and_no_temporary_file_stays(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    files.replace_atomically(target, b"secret", mode=0o600)
    assert target.read_bytes() == b"secret"
    assert _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]


def test_without_a_mode_the_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "signed.xml"
    target.write_bytes(b"<old/>")
    target.chmod(0o640)
    files.replace_atomically(target, b"<new/>")
    assert target.read_bytes() == b"<new/>"
    assert _mode(target) == 0o640


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "crl.der"
    target.write_bytes(b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        files.replace_atomically(target, b"new", mode=0o644)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["crl.der"]
