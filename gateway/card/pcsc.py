"""PC/SC transport over pyscard: readers, exclusive connections, APDU exchange.

Blocking (pyscard calls into libpcsclite): async callers run it in a thread. Library errors are
translated here into :class:`CardError` codes (no reader, no card, card removed, pcscd down).
The connection is exclusive while a flow runs (nothing can slip between VERIFY and the
signature) and resets the card when it closes, so a verified PIN never outlives the flow.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Protocol

from smartcard.CardConnection import CardConnection
from smartcard.Exceptions import CardConnectionException, NoCardException, SmartcardException
from smartcard.pcsc.PCSCCardConnection import PCSCCardConnection, translateprotocolheader
from smartcard.scard import (
    SCARD_E_INSUFFICIENT_BUFFER,
    SCARD_E_INVALID_PARAMETER,
    SCARD_E_INVALID_VALUE,
    SCARD_E_NOT_TRANSACTED,
    SCARD_E_SHARING_VIOLATION,
    SCARD_RESET_CARD,
    SCARD_S_SUCCESS,
    SCARD_SHARE_EXCLUSIVE,
    SCardGetErrorMessage,
    SCardTransmit,
)
from smartcard.System import readers as _readers

from gateway.card.apdu import Command, Response
from gateway.card.errors import CardError, CardErrorCode


class CardTransport(Protocol):
    """Anything that exchanges APDUs with one card (PC/SC here; an applet in unit tests)."""

    def transmit(self, command: Command) -> Response: ...


def list_readers() -> list[str]:
    """Names of the PC/SC readers (empty when none); CardError when pcscd cannot be reached."""
    try:
        return [str(r) for r in _readers()]
    except SmartcardException as e:
        raise CardError(CardErrorCode.PCSC_UNAVAILABLE, detail=str(e)) from e
    except Exception as e:  # pyscard's EstablishContextException is not a SmartcardException
        raise CardError(CardErrorCode.PCSC_UNAVAILABLE, detail=type(e).__name__) from e


class PcscConnection:
    """An exclusive connection to the card in one reader."""

    def __init__(self, reader: str) -> None:
        self.reader = reader
        found = None
        try:
            found = next((r for r in _readers() if str(r) == reader), None)
        except Exception as e:
            raise CardError(CardErrorCode.PCSC_UNAVAILABLE, detail=type(e).__name__) from e
        if found is None:
            raise CardError(CardErrorCode.NO_READER)
        conn: CardConnection = found.createConnection()
        try:
            _connect(conn)
        except BaseException:
            # Its PC/SC context goes now, not when the object is collected (a caller that
            # polls for a card would leave one behind per try).
            with contextlib.suppress(Exception):
                conn.release()
            raise
        self._conn: CardConnection | None = conn
        # APDUs go to pyscard's SCardTransmit binding with the connection's handle and
        # protocol: its CardConnection.transmit adds observer events, protocol look-ups and
        # list copies around each APDU, all run holding the GIL that a batch's document
        # building shares with the card's thread.
        pcsc = conn.component if hasattr(conn, "component") else conn
        assert isinstance(pcsc, PCSCCardConnection)
        self._hcard = pcsc.hcard
        self._pci = translateprotocolheader(pcsc.getProtocol())

    @property
    def atr(self) -> bytes:
        if self._conn is None:
            raise CardError(CardErrorCode.CARD_REMOVED)
        return bytes(self._conn.getATR())

    def transmit(self, command: Command) -> Response:
        if self._conn is None:
            raise CardError(CardErrorCode.CARD_REMOVED)
        resp = self._raw(command.encode())
        # T=0 readers: fetch the answer (61 xx) or repeat with the right Le (6C xx).
        if resp.sw1 == 0x6C:
            resp = self._raw(dataclasses.replace(command, le=resp.sw2 or 0x100).encode())
        data = resp.data
        while resp.sw1 == 0x61:
            resp = self._raw(Command(0x00, 0xC0, 0x00, 0x00, le=resp.sw2 or 0x100).encode())
            data += resp.data
        return Response(data, resp.sw)

    def _raw(self, apdu: bytes) -> Response:
        assert self._conn is not None
        hresult, response = SCardTransmit(self._hcard, self._pci, list(apdu))
        if hresult != SCARD_S_SUCCESS:
            detail = SCardGetErrorMessage(hresult)
            if hresult in _REFUSED_BY_READER:
                # The reader or its driver refused the exchange (an extended APDU to a reader
                # without extended length: "Transaction failed."); the card is still there.
                raise CardError(CardErrorCode.READER_ERROR, detail=detail)
            raise CardError(CardErrorCode.CARD_REMOVED, detail=detail)
        if len(response) < 2:
            raise CardError(CardErrorCode.CARD_ERROR, detail="no status word in the answer")
        return Response(bytes(response[:-2]), (response[-2] << 8) | response[-1])

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # the card or pcscd may already be gone
                conn.disconnect()
            with contextlib.suppress(Exception):
                conn.release()

    def __enter__(self) -> PcscConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect(conn: CardConnection) -> None:
    """Connect exclusively (the card reset when the connection ends); CardError if not."""
    try:
        conn.connect(mode=SCARD_SHARE_EXCLUSIVE, disposition=SCARD_RESET_CARD)
    except NoCardException as e:
        raise CardError(CardErrorCode.NO_CARD) from e
    except CardConnectionException as e:
        if _hresult(e) == SCARD_E_SHARING_VIOLATION:
            # Another program holds the card (the JPKI user software, a browser's PKCS#11
            # module): "place your card" would send the doctor the wrong way.
            raise CardError(CardErrorCode.CARD_IN_USE) from e
        raise CardError(CardErrorCode.NO_CARD, detail=str(e)) from e


#: SCardTransmit results of a refused exchange, the session intact (pcsc-lite maps a driver's
#: communication error to NOT_TRANSACTED); anything else ends the session (card removed or
#: reset, reader unplugged, pcscd gone).
_REFUSED_BY_READER = frozenset(
    {
        SCARD_E_NOT_TRANSACTED,
        SCARD_E_INSUFFICIENT_BUFFER,
        SCARD_E_INVALID_PARAMETER,
        SCARD_E_INVALID_VALUE,
    }
)


def _hresult(e: CardConnectionException) -> int | None:
    value = getattr(e, "hresult", None)
    return value if isinstance(value, int) else None
