"""`sandbox cards up|down DIR`: the manifest contract, and standard PC/SC clients through it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.support.gateway import CLI, REPO, run_cli

SELECT_AP = "00A4040C0AD392F000260100000001"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has already exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _pids_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if _alive(p)]


def test_cards_up_and_down(sandbox: dict[str, Any]) -> None:
    d = sandbox["dir"]
    out = run_cli("sandbox", "cards", "up", d, "--json")
    try:
        cards = json.loads(out.stdout)
        manifest = json.loads((Path(d) / "manifest.json").read_text())
        assert manifest["cards"] == cards
        jpki = [c for c in cards if c["kind"] == "jpki"]
        hpki = [c for c in cards if c["kind"] == "hpki"]
        assert len(jpki) + len(hpki) == len(cards)
        assert [c["signer"] for c in jpki] == sorted(s["id"] for s in sandbox["signers"])
        for c in jpki:
            assert set(c) == {"signer", "kind", "reader", "pin", "pcsc_socket"}
            assert len(c["pin"]) == 4 and c["pin"].isdigit()
            assert Path(c["pcsc_socket"]).is_socket()
        # One HPKI card per doctor and pharmacist, with the role its certificate carries.
        card_roles = {"Medical Doctor", "Pharmacist"}
        assert {c["signer"]: c["role"] for c in hpki} == {
            s["id"]: s["role"] for s in sandbox["signers"] if s["role"] in card_roles
        }
        assert {c["role"] for c in hpki} == card_roles
        for c in hpki:
            assert set(c) == {"signer", "kind", "reader", "pin", "pcsc_socket", "role",
                              "certificate"}  # fmt: skip
            assert len(c["pin"]) == 6 and Path(c["certificate"]).is_file()
            mine = next(j for j in jpki if j["signer"] == c["signer"])
            assert c["pcsc_socket"] == mine["pcsc_socket"] and c["reader"] != mine["reader"]
            # Through pcscd: SELECT the signing application, a wrong PIN costs one of 15
            # tries, the manifest's PIN opens it.
            env = {**os.environ, "PCSCLITE_CSOCK_NAME": c["pcsc_socket"]}
            wrong = "0" * 6 if c["pin"] != "0" * 6 else "1" * 6
            tool = subprocess.run(
                ["opensc-tool", "--reader", "1",
                 "-s", "00A4040010E828BD080FA00000039100000000000100",
                 "-s", "0020008106" + wrong.encode().hex(),
                 "-s", "0020008106" + c["pin"].encode().hex(),
                 "-s", "00200081"],
                env=env, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert tool.returncode == 0, tool.stderr
            assert "SW1=0x63, SW2=0xCE" in tool.stdout, tool.stdout
            assert tool.stdout.count("SW1=0x90, SW2=0x00") == 3, tool.stdout
        first = jpki[0]
        env = {**os.environ, "PCSCLITE_CSOCK_NAME": first["pcsc_socket"]}
        scan = subprocess.run(["pcsc_scan", "-r"], env=env, capture_output=True, text=True,
                              timeout=30)  # fmt: skip
        assert scan.returncode == 0 and first["reader"] in scan.stdout
        tool = subprocess.run(
            ["opensc-tool", "--reader", "0", "-s", SELECT_AP, "-s", "00A4020C020006",
             "-s", "00B0000010"],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert tool.returncode == 0, tool.stderr
        assert "4A 50 4B 49 41 50 49 43 43 54 4F 4B 45 4E 32" in tool.stdout.upper()
        status = subprocess.run([*CLI, "card", "status", "--json"], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)[0]["kind"] == "jpki"
        state = json.loads((Path(d) / "cards" / "state.json").read_text())
        pids = [state["server"], *state["pcscd"]]
        assert _pids_alive(pids) == pids
    finally:
        run_cli("sandbox", "cards", "down", d)
    manifest = json.loads((Path(d) / "manifest.json").read_text())
    assert manifest["cards"] == []
    assert _pids_alive(pids) == []
    assert not Path(first["pcsc_socket"]).exists()
