"""The HPKI card's PC/SC connection in a child process (``local.card_process = true``, the
default): the card store the local agent and ``sign-batch`` use.

Why: in one process the card's thread must take the GIL back from the document-building event
loop after every APDU (twice per signature), and the event loop pays a thread hand-over per
signature. Measured with the virtual card against a bare blocking signing loop
(docs/performance.md): a batch's steady state went from 0.86-0.92x that loop with the card's
thread to 1.03-1.19x with the card process, at 0.67-0.82x the batch process's CPU per
document; the process's start (~0.12 s) is paid once per batch. Signatures are pipelined:
requests are answered in order, so while the card signs one the next is already waiting in
the pipe.

The child (``python -m gateway.hsm.card_child``, plumbing in ``hsm/child.py``) runs an
ordinary :class:`~gateway.hsm.card.CardKeyStore` through its blocking API on its only thread,
so the APDUs, the error codes and texts are exactly those of the in-process store. Every answer
carries the child's card session (generation, connected); the parent mirrors it, so a card
pulled or replaced ends the session here as it does in-process: ``generation`` grows, and
every SAD of the old session is dead. A child that dies ends the session too.

The PIN crosses the private pipe once, inside ``unlock``; the caller's buffer is wiped when it
has been sent, and the child wipes its copy after the VERIFY. It is never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from cryptography import x509

from gateway.card.hpki import DEFAULT_SIGN_AIDS, HPKI_PIN_TRIES, JMA_PROFILE, CardProfile
from gateway.errors import HsmUnavailable
from gateway.hsm.api import StoreKeyHandle
from gateway.hsm.card import CardKeyCommon, key_attributes_of
from gateway.hsm.card_child import decode_error
from gateway.hsm.child import Child, ChildStore

__all__ = ["CardProcessStore"]

_log = logging.getLogger("gateway.hsm")


class CardProcessStore(CardKeyCommon, ChildStore):
    """CardStore of the HPKI card in ``reader``, driven by a child process.

    Same API, errors and texts as :class:`~gateway.hsm.card.CardKeyStore`, which the child runs.
    """

    _module = "gateway.hsm.card_child"
    _what = "HPKI card process"
    _log = _log

    def __init__(
        self,
        reader: str,
        *,
        aids: Sequence[bytes] = DEFAULT_SIGN_AIDS,
        profiles: Sequence[CardProfile] = (JMA_PROFILE,),
        retry_after: int = 5,
        reconnect_interval: float = 1.0,
    ) -> None:
        super().__init__(
            {
                "reader": reader,
                "aids": [a.hex() for a in aids],
                "profiles": [(p.name, p.pin_ref, p.key_fid, p.cert_fid) for p in profiles],
                "retry_after": retry_after,
            },
            reconnect_interval=reconnect_interval,
        )
        self.reader = reader
        self._retry_after = retry_after
        self._cert: x509.Certificate | None = None
        self._cert_der = b""
        self._key_id: str | None = None
        self._access: dict[str, bool] = {}
        self._handles: dict[str, StoreKeyHandle] = {}
        #: Bumped whenever the card session ends (removed, replaced, closed, the child died):
        #: SADs bound to an older generation are dead.
        self.generation = 0
        self._connected = False
        self._child_generation: int | None = None  # the child's own count, last reported

    def __repr__(self) -> str:
        return f"CardProcessStore(reader={self.reader!r}, key_id={self._key_id!r})"

    @property
    def connected(self) -> bool:
        return self._connected

    # ---- CardStore API ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the card process (about 0.15 s of imports) without touching the card."""
        self._closed = False
        await self._ensure_child()

    async def open(self) -> None:
        """Start the card process if needed; find the card, read its certificate (no PIN)."""
        self._closed = False
        self._last_spawn = float("-inf")  # open() always tries now
        self._opened(await self._request("open", ()))

    async def relock(self) -> None:
        """End the card's verified state (a new session: the PIN must be given again)."""
        self._opened(await self._request("open", ()))

    def _opened(self, answer: tuple[bytes, str | None, dict[str, bool]]) -> None:
        cert_der, key_id, access = answer
        if self._cert is None or cert_der != self._cert_der:  # the same card: the same object
            self._cert, self._cert_der = x509.load_der_x509_certificate(cert_der), cert_der
        self._key_id, self._access = key_id, access

    async def close(self) -> None:
        await self._shutdown()

    async def tries_left(self) -> int | None:
        """Tries left without spending one; None when the PIN is verified."""
        left: int | None = await self._request("tries_left", ())
        return left

    async def pin_tries_left(self) -> int | None:
        left = await self.tries_left()
        return HPKI_PIN_TRIES if left is None else left  # verified: the counter is full

    async def unlock(self, pin: bytearray) -> None:
        """VERIFY ``pin`` on the card (in the child), wiping the caller's buffer once sent."""
        try:
            if self._closed:
                raise self._closed_error()
            answer = self._send(await self._ensure_child(), "unlock", (bytes(pin),))
        finally:
            pin[:] = b"\x00" * len(pin)
        await answer

    async def check(self) -> None:
        """Probe the card (tries-left VERIFY, which spends nothing)."""
        await self._request("check", ())

    async def _sign_infos(self, infos: list[bytes]) -> list[bytes]:
        signatures: list[bytes] = await self._request("sign", (infos,))
        return signatures

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        """The card's PrKD access flags (``key_attributes_of``)."""
        self._require(key_id)
        return key_attributes_of(self._access)

    # ---- ChildStore hooks ------------------------------------------------------------------

    def _unavailable(self) -> HsmUnavailable:
        return HsmUnavailable(
            f"HPKI card in {self.reader}: the card process is not running",
            retry_after=self._retry_after,
        )

    def _closed_error(self) -> HsmUnavailable:
        return HsmUnavailable(
            f"HPKI card in {self.reader}: the card store is closed", retry_after=self._retry_after
        )

    def _decode_error(self, error: Any) -> Exception:
        return decode_error(error)

    async def _started(self, child: Child) -> None:
        self._child_generation = None  # a new child counts from 0

    def _state(self, state: Any) -> None:
        generation, connected = state
        if self._child_generation is not None and generation != self._child_generation:
            self._end_session()
        self._child_generation = generation
        self._connected = connected

    def _ended(self) -> None:
        """The child is gone, and the card session with it."""
        if self._connected:
            self._end_session()
        self._connected = False

    def _end_session(self) -> None:
        self.generation += 1
