"""What a virtual card is: an applet that answers APDUs, plus helpers shared by applets."""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Protocol

from gateway.card.apdu import (
    SW_END_OF_FILE,
    SW_OFFSET_OUT_OF_RANGE,
    SW_OK,
    SW_WRONG_P1P2,
    Command,
    Response,
)

#: A card answers at most this many bytes to one READ BINARY (JPKI and HPKI cards both do).
MAX_READ = 256


class CardApplet(Protocol):
    """A card as vpcd sees it. Methods run on the reader's thread, one at a time."""

    @property
    def atr(self) -> bytes: ...

    def power_on(self) -> None: ...

    def power_off(self) -> None: ...

    def reset(self) -> None: ...

    def process(self, command: Command) -> Response: ...


def make_atr(historical: bytes) -> bytes:
    """An ISO 7816-3 ATR offering T=1 with ``historical`` bytes (<= 15) and its check byte."""
    if len(historical) > 15:
        raise ValueError("at most 15 historical bytes")
    body = bytes((0x80 | len(historical), 0x01)) + historical  # T0 (TD1 follows), TD1: T=1
    tck = reduce(lambda a, b: a ^ b, body, 0)
    return b"\x3b" + body + bytes((tck,))


@dataclass(frozen=True)
class BinaryFile:
    """A transparent EF: READ BINARY with offset in P1-P2 (15 bits), at most 256 bytes."""

    content: bytes

    def read(self, command: Command) -> Response:
        if command.p1 & 0x80:  # short EF id addressing: not offered by these cards
            return Response.status(SW_WRONG_P1P2)
        offset = (command.p1 << 8) | command.p2
        if offset >= len(self.content):
            return Response.status(SW_OFFSET_OUT_OF_RANGE)
        want = min(command.le or MAX_READ, MAX_READ)
        chunk = self.content[offset : offset + want]
        return Response(chunk, SW_OK if len(chunk) == want else SW_END_OF_FILE)
