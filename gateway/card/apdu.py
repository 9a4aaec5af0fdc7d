"""ISO 7816-4 command and response APDUs, for both sides: the card client and the virtual cards.

Hand-written because pyscard only moves byte lists (it has no APDU model that parses commands,
which the virtual cards need); short and extended lengths, cases 1 to 4.
"""

from __future__ import annotations

from dataclasses import dataclass

SW_OK = 0x9000
SW_END_OF_FILE = 0x6282  # fewer bytes than Le before the end of the file
SW_WRONG_LENGTH = 0x6700
SW_INCOMPATIBLE_FILE = 0x6981
SW_SECURITY_NOT_SATISFIED = 0x6982
SW_PIN_BLOCKED = 0x6983
SW_REFERENCE_DATA_UNUSABLE = 0x6984
SW_CONDITIONS_NOT_SATISFIED = 0x6985
SW_NO_CURRENT_EF = 0x6986
SW_WRONG_DATA = 0x6A80
SW_FILE_NOT_FOUND = 0x6A82
SW_WRONG_P1P2 = 0x6A86
SW_OFFSET_OUT_OF_RANGE = 0x6B00
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00


class ApduFormatError(ValueError):
    """The bytes are not a well-formed command APDU."""


@dataclass(frozen=True, slots=True)
class Command:
    """A command APDU. ``le``: None = no response data expected; 0 is not used (say 256)."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None

    def encode(self) -> bytes:
        """Short form when it fits (Lc <= 255, Le <= 256), extended otherwise."""
        head = bytes((self.cla, self.ins, self.p1, self.p2))
        lc, le = len(self.data), self.le
        if lc > 0xFFFF or (le is not None and not 1 <= le <= 0x10000):
            raise ApduFormatError("Lc or Le out of range")
        if lc <= 0xFF and (le is None or le <= 0x100):
            out = head
            if lc:
                out += bytes((lc,)) + self.data
            if le is not None:
                out += bytes((le & 0xFF,))
            return out
        out = head + b"\x00"
        if lc:
            out += lc.to_bytes(2, "big") + self.data
        if le is not None:
            out += (le & 0xFFFF).to_bytes(2, "big")
        return out

    @classmethod
    def parse(cls, raw: bytes) -> Command:
        """Decode cases 1, 2S/2E, 3S/3E, 4S/4E (ISO 7816-3 §12.1)."""
        if len(raw) < 4:
            raise ApduFormatError("a command APDU has at least 4 bytes")
        cla, ins, p1, p2 = raw[:4]
        body = raw[4:]
        n = len(body)
        if n == 0:
            return cls(cla, ins, p1, p2)
        if n == 1:
            return cls(cla, ins, p1, p2, le=body[0] or 0x100)
        if body[0] != 0:  # short with Lc
            lc = body[0]
            if n == 1 + lc:
                return cls(cla, ins, p1, p2, data=bytes(body[1:]))
            if n == 2 + lc:
                return cls(cla, ins, p1, p2, data=bytes(body[1:-1]), le=body[-1] or 0x100)
            raise ApduFormatError("Lc does not match the command length")
        if n == 3:  # 2E
            le = int.from_bytes(body[1:3], "big")
            return cls(cla, ins, p1, p2, le=le or 0x10000)
        lc = int.from_bytes(body[1:3], "big")
        if lc == 0:
            raise ApduFormatError("extended Lc of 0")
        if n == 3 + lc:
            return cls(cla, ins, p1, p2, data=bytes(body[3:]))
        if n == 5 + lc:
            le = int.from_bytes(body[-2:], "big")
            return cls(cla, ins, p1, p2, data=bytes(body[3:-2]), le=le or 0x10000)
        raise ApduFormatError("extended Lc does not match the command length")


@dataclass(frozen=True, slots=True)
class Response:
    data: bytes
    sw: int

    @property
    def sw1(self) -> int:
        return self.sw >> 8

    @property
    def sw2(self) -> int:
        return self.sw & 0xFF

    @property
    def ok(self) -> bool:
        return self.sw == SW_OK

    def encode(self) -> bytes:
        return self.data + self.sw.to_bytes(2, "big")

    @classmethod
    def parse(cls, raw: bytes) -> Response:
        if len(raw) < 2:
            raise ApduFormatError("a response APDU has at least the two status bytes")
        return cls(bytes(raw[:-2]), int.from_bytes(raw[-2:], "big"))

    @classmethod
    def status(cls, sw: int) -> Response:
        return cls(b"", sw)


def der_length(header: bytes) -> int:
    """Total length (header included) of the DER TLV whose first bytes are ``header``.

    Used to read a certificate with as few READ BINARY commands as possible: read the header
    (at most 6 bytes for lengths below 4 GiB), then loop for the rest.
    """
    if len(header) < 2:
        raise ValueError("DER header too short")
    if header[0] != 0x30:  # a certificate (the only use) is a SEQUENCE
        raise ValueError("not a DER SEQUENCE")
    first = header[1]
    if first < 0x80:
        return 2 + first
    n = first & 0x7F
    if n == 0 or n > 4 or len(header) < 2 + n:
        raise ValueError("unsupported DER length")
    return 2 + n + int.from_bytes(header[2 : 2 + n], "big")
