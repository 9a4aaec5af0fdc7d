"""What a virtual card is: an applet that answers APDUs, plus helpers shared by applets."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from functools import reduce
from typing import Protocol

from asn1crypto.algos import DigestInfo
from cryptography.hazmat.primitives import hashes

from gateway.card.apdu import (
    SW_END_OF_FILE,
    SW_FILE_NOT_FOUND,
    SW_INCOMPATIBLE_FILE,
    SW_NO_CURRENT_EF,
    SW_OFFSET_OUT_OF_RANGE,
    SW_OK,
    SW_REFERENCE_DATA_UNUSABLE,
    SW_WRONG_LENGTH,
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
    #: The most a READ BINARY answers; less than asked is allowed (ISO 7816-4), and some cards
    #: answer 9000 with fewer bytes than Le before the end of the file.
    max_read: int = MAX_READ

    def read(self, command: Command) -> Response:
        if command.p1 & 0x80:  # short EF id addressing: not offered by these cards
            return Response.status(SW_WRONG_P1P2)
        offset = (command.p1 << 8) | command.p2
        if offset >= len(self.content):
            return Response.status(SW_OFFSET_OUT_OF_RANGE)
        want = min(command.le or MAX_READ, MAX_READ)
        chunk = self.content[offset : offset + min(want, self.max_read)]
        if len(chunk) < want and offset + len(chunk) < len(self.content):
            return Response(chunk, SW_OK)  # a short answer, more to read
        return Response(chunk, SW_OK if len(chunk) == want else SW_END_OF_FILE)


class FileApplet:
    """What both virtual cards do alike: one application SELECTed by AID (``00 A4 04 00``),
    EFs by file id (``00 A4 02 0C``), READ BINARY of transparent EFs, and a PIN with a try
    counter (``63 Cx`` tries left, ``69 84`` once blocked; the empty VERIFY asks without
    spending a try). A reset or a new SELECT of the application forgets the PIN.

    Subclasses (dataclasses) hold ``aid``, ``tries_left`` and ``_files`` and call
    ``self._forget()`` when built; they name EFs that SELECT finds but READ BINARY refuses
    (a key, a PIN) in ``_hidden``.
    """

    aid: bytes
    tries_left: int
    _files: dict[int, BinaryFile]
    _hidden: frozenset[int] = frozenset()
    _selected: bool
    _ef: int | None
    _verified: bool

    @property
    def blocked(self) -> bool:
        return self.tries_left <= 0

    def power_on(self) -> None:
        self._forget()

    def power_off(self) -> None:
        self._forget()

    def reset(self) -> None:
        self._forget()

    def _forget(self) -> None:
        self._selected, self._ef, self._verified = False, None, False

    def _select(self, c: Command) -> Response:
        if c.p1 == 0x04:
            if c.data != self.aid:
                return Response.status(SW_FILE_NOT_FOUND)
            self._forget()
            self._selected = True
            return Response.status(SW_OK)
        if c.p1 == 0x02:
            if len(c.data) != 2:
                return Response.status(SW_WRONG_LENGTH)
            fid = int.from_bytes(c.data, "big")
            if not self._selected or (fid not in self._files and fid not in self._hidden):
                return Response.status(SW_FILE_NOT_FOUND)
            self._ef = fid
            return Response.status(SW_OK)
        return Response.status(SW_WRONG_P1P2)

    def _read_binary(self, c: Command) -> Response:
        if self._ef is None:
            return Response.status(SW_NO_CURRENT_EF)
        f = self._files.get(self._ef)
        if f is None:  # a key or a PIN: selectable, never readable
            return Response.status(SW_INCOMPATIBLE_FILE)
        return f.read(c)

    def _check_pin(self, given: bytes, pin: bytes, max_tries: int) -> Response:
        """VERIFY's answer once the command's own checks passed."""
        if self.blocked:
            return Response.status(SW_REFERENCE_DATA_UNUSABLE)
        if not given:  # tries left, without spending one
            return Response.status(SW_OK if self._verified else 0x63C0 | self.tries_left)
        if hmac.compare_digest(given, pin):
            self.tries_left, self._verified = max_tries, True
            return Response.status(SW_OK)
        self.tries_left -= 1
        self._verified = False
        return Response.status(0x63C0 | self.tries_left)  # the last wrong one: 63 C0


def parse_digest_info(
    data: bytes, algorithms: Mapping[str, hashes.HashAlgorithm]
) -> tuple[hashes.HashAlgorithm, bytes] | None:
    """The hash algorithm and digest of a DER DigestInfo, or None when it is not one (or names
    an algorithm outside ``algorithms``, or the digest has the wrong length)."""
    try:
        info = DigestInfo.load(data, strict=True)
        algorithm = algorithms[info["digest_algorithm"]["algorithm"].native]
        digest = bytes(info["digest"].native)
    except (ValueError, KeyError, TypeError):
        return None
    if len(digest) != algorithm.digest_size:
        return None
    return algorithm, digest


@dataclass
class T0Answers:
    """A card answering as T=0 cards do, around any applet: data never comes with the command
    that asked for it but is announced (``61 xx``) and fetched with GET RESPONSE (``00 C0``,
    in pieces of at most ``xx``), and a READ BINARY asking for more than the file holds is
    told the right length (``6C xx``) instead of being answered short. The host's transport
    (``card/pcsc.py``) must follow both."""

    inner: CardApplet
    _pending: bytes = b""
    gets: int = 0  # GET RESPONSE commands served, for tests

    @property
    def atr(self) -> bytes:
        return self.inner.atr

    def power_on(self) -> None:
        self._pending = b""
        self.inner.power_on()

    def power_off(self) -> None:
        self._pending = b""
        self.inner.power_off()

    def reset(self) -> None:
        self._pending = b""
        self.inner.reset()

    def process(self, command: Command) -> Response:
        if command.cla == 0x00 and command.ins == 0xC0:
            if not self._pending:
                return Response.status(0x6985)  # conditions of use not satisfied
            self.gets += 1
            want = command.le or 0x100
            chunk, self._pending = self._pending[:want], self._pending[want:]
            more = len(self._pending)
            return Response(chunk, 0x9000 if not more else 0x6100 | min(more, 0xFF))
        self._pending = b""
        r = self.inner.process(command)
        if r.sw == SW_END_OF_FILE and command.ins == 0xB0 and r.data:
            return Response.status(0x6C00 | (len(r.data) & 0xFF))  # ask again with this Le
        if not r.data or r.sw != 0x9000:
            return r
        self._pending = r.data
        return Response.status(0x6100 | (len(r.data) & 0xFF))
