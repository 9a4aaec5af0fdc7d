"""vpcd's socket protocol: one :class:`VirtualReader` per vpcd slot, holding one card.

Every message either way is a 2-byte big-endian length and a payload. A 1-byte payload from
vpcd is a control byte (00 power off, 01 power on, 02 reset, 04 "send the ATR", answered with
the ATR); anything else is a command APDU answered with one response APDU. vpcd listens and the
card connects; a closed connection is a removed card, a new connection an inserted one.

Both moves are synchronous with pcscd's view: ``insert`` returns once pcscd has found the
card, powered it up and polled it again (so a client connecting right after finds it ready),
``remove`` once vpcd has polled and found the slot empty (see ``_wait_empty_polled``).
Without the latter, a card pulled and another one pushed within one polling interval would
look to pcscd like the same card, still powered, and its next command would fail.

The connection is opened by ``connect`` (see :func:`gateway.vcard.pcscd.Pcscd.connector`: it
reaches vpcd's port inside pcscd's private network namespace), so this module never listens on
any interface. No APDU is logged: VERIFY carries the PIN.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

from gateway.card.apdu import ApduFormatError, Command, Response
from gateway.vcard.applet import CardApplet

log = logging.getLogger(__name__)

CTRL_OFF, CTRL_ON, CTRL_RESET, CTRL_ATR = 0, 1, 2, 4
_SW_WRONG_LENGTH = Response.status(0x6700).encode()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    # Without QUICKACK after each read the delayed ACKs throttle vpcd to ~20 APDUs a second.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    return buf


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">H", len(payload)) + payload)


class VirtualReader:
    """One vpcd slot. ``insert`` connects a card, ``remove`` pulls it out (closes the socket)."""

    def __init__(self, *, name: str, connect: Callable[[], socket.socket]) -> None:
        self.name = name
        self._connect = connect
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._applet: CardApplet | None = None
        self._seen = threading.Event()  # vpcd asked for the ATR: pcscd saw the card
        self._ready = threading.Event()  # ... and polled it again after powering it up
        self._atr_after_power_on = 0

    @property
    def applet(self) -> CardApplet | None:
        return self._applet

    def insert(self, applet: CardApplet, *, timeout: float = 10.0) -> None:
        """Put ``applet`` in this reader (a card already there is pulled out first)."""
        self.remove()
        sock = self._connect()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._seen.clear()
            self._ready.clear()
            self._atr_after_power_on = -1
            self._sock, self._applet = sock, applet
            self._thread = threading.Thread(
                target=self._serve, args=(sock, applet), name=f"vpcd {self.name}", daemon=True
            )
            self._thread.start()
        # Powered up and polled again: normally well under a second. A pcscd that does not
        # power cards on insertion never gets there; then the first poll has to do.
        if not self._ready.wait(min(timeout, 5.0)) and not self._seen.wait(timeout):
            raise TimeoutError(f"pcscd did not poll {self.name} within {timeout} s")

    def remove(self, *, timeout: float = 10.0) -> None:
        """Pull the card out; returns once pcscd has polled the empty slot."""
        with self._lock:
            sock, thread = self._sock, self._thread
            self._sock = self._thread = self._applet = None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._wait_empty_polled(timeout)

    def _wait_empty_polled(self, timeout: float) -> None:
        """Be "no card" for two polls: connect, and hang up when vpcd asks for the ATR.

        vpcd polls one slot at a time, so when the second connection is asked, the "no card"
        answer of the first one has been handled by pcscd.
        """
        deadline = time.monotonic() + timeout
        for _ in range(2):
            try:
                probe = self._connect()
            except Exception:  # noqa: BLE001 - pcscd gone: nobody left to see the card
                return
            try:
                probe.settimeout(0.2)
                while time.monotonic() < deadline:
                    try:
                        head = _recv_exact(probe, 2)
                    except TimeoutError:
                        continue
                    if head is None:
                        break
                    (n,) = struct.unpack(">H", head)
                    msg = _recv_exact(probe, n) if n else b""
                    if msg is None or msg == bytes((CTRL_ATR,)):
                        break
            except OSError:
                pass
            finally:
                probe.close()

    def _serve(self, sock: socket.socket, applet: CardApplet) -> None:
        try:
            while True:
                head = _recv_exact(sock, 2)
                if head is None:
                    return
                (n,) = struct.unpack(">H", head)
                msg = _recv_exact(sock, n) if n else b""
                if msg is None:
                    return
                if n == 1:
                    ctrl = msg[0]
                    if ctrl == CTRL_ATR:
                        _send(sock, applet.atr)
                        self._seen.set()
                        if self._atr_after_power_on >= 0:
                            self._atr_after_power_on += 1
                            # The first ATR read is part of the power-up, the next a poll.
                            if self._atr_after_power_on >= 2:
                                self._ready.set()
                    elif ctrl == CTRL_ON:
                        applet.power_on()
                        self._atr_after_power_on = max(self._atr_after_power_on, 0)
                    elif ctrl == CTRL_OFF:
                        applet.power_off()
                    elif ctrl == CTRL_RESET:
                        applet.reset()
                    continue
                try:
                    command = Command.parse(msg)
                except ApduFormatError:
                    _send(sock, _SW_WRONG_LENGTH)
                    continue
                _send(sock, applet.process(command).encode())
        except OSError:
            return  # removed, or pcscd went away
        except Exception:  # a bug in an applet must not hang the reader: the card "dies"
            log.exception("virtual card in %s failed", self.name)
            with contextlib.suppress(OSError):
                sock.close()
