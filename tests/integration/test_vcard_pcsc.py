"""The virtual My Number card behind real pcscd + vpcd, spoken to by standard PC/SC clients."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from smartcard.CardConnection import CardConnection
from smartcard.Exceptions import CardConnectionException
from smartcard.System import readers

from tests.support.pcsc import PcscWorld, make_card

SELECT_AP = "00A4040C0AD392F000260100000001"
OPENSC_APDUS = [SELECT_AP, "00A4020C020006", "00B0000020"]
SHA256_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")


def _connect(name: str) -> CardConnection:
    deadline = time.monotonic() + 10
    while True:
        try:
            r = next(r for r in readers() if str(r) == name)
            conn = r.createConnection()
            try:
                conn.connect()
            except Exception:
                conn.release()
                raise
            return conn
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _tx(conn: CardConnection, hexapdu: str) -> tuple[bytes, int]:
    data, sw1, sw2 = conn.transmit(list(bytes.fromhex(hexapdu)))
    return bytes(data), (sw1 << 8) | sw2


def test_pyscard_reads_token_and_cert_and_signs(pcsc: PcscWorld) -> None:
    card = make_card(pin="2580")
    reader = pcsc.readers[0]
    reader.insert(card.applet)
    try:
        assert [str(r) for r in readers()] == pcsc.pcscd.reader_names
        conn = _connect(reader.name)
        assert bytes(conn.getATR()) == card.applet.atr
        assert _tx(conn, SELECT_AP)[1] == 0x9000
        assert _tx(conn, "00A4020C020006")[1] == 0x9000
        token, sw = _tx(conn, "00B0000020")
        assert sw == 0x9000 and token.rstrip(b" ") == b"JPKIAPICCTOKEN2"
        # The certificate in chunks: no answer is longer than 256 bytes.
        assert _tx(conn, "00A4020C02000A")[1] == 0x9000
        got, offset = b"", 0
        while True:
            chunk, sw = _tx(conn, f"00B0{offset:04X}00")
            assert len(chunk) <= 256
            got += chunk
            offset += len(chunk)
            if sw == 0x6282 or len(chunk) < 256:
                break
            assert sw == 0x9000
        assert got == card.cert_der
        # Tries left without spending one, then a wrong PIN, then the right one.
        assert _tx(conn, "00A4020C020018")[1] == 0x9000
        assert _tx(conn, "00200080")[1] == 0x63C3
        assert _tx(conn, "0020008004" + b"0000".hex())[1] == 0x63C2
        assert _tx(conn, "00200080")[1] == 0x63C2
        # Signing before VERIFY succeeds is refused.
        digest_info = SHA256_PREFIX + hashlib.sha256(b"challenge").digest()
        assert _tx(conn, "00A4020C020017")[1] == 0x9000
        assert _tx(conn, f"802A0080{len(digest_info):02X}{digest_info.hex()}00")[1] == 0x6982
        assert _tx(conn, "00A4020C020018")[1] == 0x9000
        assert _tx(conn, "0020008004" + b"2580".hex())[1] == 0x9000
        assert _tx(conn, "00A4020C020017")[1] == 0x9000
        sig, sw = _tx(conn, f"802A0080{len(digest_info):02X}{digest_info.hex()}00")
        assert sw == 0x9000 and len(sig) == 256
        cert = x509.load_der_x509_certificate(got)
        cert.public_key().verify(sig, b"challenge", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr, call-arg, arg-type]
        conn.disconnect()
        conn.release()
    finally:
        reader.remove()


def test_pin_blocks_after_three_wrong_tries(pcsc: PcscWorld) -> None:
    card = make_card(pin="1111")
    reader = pcsc.readers[1]
    reader.insert(card.applet)
    try:
        conn = _connect(reader.name)
        _tx(conn, SELECT_AP)
        _tx(conn, "00A4020C020018")
        wrong = "0020008004" + b"9999".hex()
        assert [_tx(conn, wrong)[1] for _ in range(3)] == [0x63C2, 0x63C1, 0x63C0]
        assert _tx(conn, wrong)[1] == 0x6984
        assert _tx(conn, "0020008004" + b"1111".hex())[1] == 0x6984  # even the right PIN
        assert _tx(conn, "00200080")[1] == 0x6984
        conn.disconnect()
        conn.release()
    finally:
        reader.remove()


def test_removed_card_is_seen_by_pcsc(pcsc: PcscWorld) -> None:
    card = make_card()
    reader = pcsc.readers[0]
    reader.insert(card.applet)
    conn = _connect(reader.name)
    assert _tx(conn, SELECT_AP)[1] == 0x9000
    reader.remove()  # returns once pcscd has polled the empty slot
    with pytest.raises(CardConnectionException, match=r"(?i)removed"):
        _tx(conn, SELECT_AP)
    with contextlib.suppress(CardConnectionException):
        conn.disconnect()
    conn.release()
    # Another card pushed right after is a new card: powered up, answering.
    reader.insert(make_card().applet)
    try:
        conn2 = _connect(reader.name)
        assert _tx(conn2, SELECT_AP)[1] == 0x9000
        conn2.disconnect()
        conn2.release()
    finally:
        reader.remove()


def test_pcsc_scan_and_opensc_tool_see_the_card(pcsc: PcscWorld) -> None:
    card = make_card()
    reader = pcsc.readers[0]
    reader.insert(card.applet)
    try:
        probe = _connect(reader.name)  # present before the tools look
        probe.disconnect()
        probe.release()
        out = subprocess.run(
            ["pcsc_scan", "-r"], env=pcsc.env(), capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        assert reader.name in out.stdout
        out = subprocess.run(
            ["opensc-tool", "-r", "0", "-a", *(a for h in OPENSC_APDUS for a in ("-s", h))],
            env=pcsc.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        atr_hex = card.applet.atr.hex(":")
        assert atr_hex in out.stdout.lower()
        # opensc-tool prints the response bytes as hex: the token name is in the last answer.
        assert "4A 50 4B 49 41 50 49 43 43 54 4F 4B 45 4E 32" in out.stdout.upper()
        assert out.stdout.count("SW1=0x90, SW2=0x00") == 3
    finally:
        reader.remove()
