"""The HPKI card process itself (``python -m gateway.hsm.card_child``): a
:class:`~gateway.hsm.card.CardKeyStore` driven through its blocking API on this process's only
thread, for :class:`~gateway.hsm.card_process.CardProcessStore` in the parent. Kept apart from
the parent's side so that the child imports no asyncio: it starts in what the card store's
own imports cost. Also the error codec of both sides.
"""

from __future__ import annotations

import sys
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from gateway.card.errors import CardError, CardErrorCode
from gateway.card.hpki import CardProfile
from gateway.errors import HsmUnavailable, KeyNotFound
from gateway.hsm.child_main import Served, child_main


def encode_error(e: Exception) -> tuple[Any, ...]:
    if isinstance(e, CardError):
        return ("CardError", e.code.value, e.tries_left, e.detail)
    if isinstance(e, KeyNotFound):
        return ("KeyNotFound", e.description, e.retry_after)
    if isinstance(e, HsmUnavailable):
        return ("HsmUnavailable", e.description, e.retry_after)
    return ("ValueError", str(e))


def decode_error(error: tuple[Any, ...]) -> Exception:
    kind = error[0]
    if kind == "CardError":
        _, code, tries_left, detail = error
        return CardError(CardErrorCode(code), tries_left=tries_left, detail=detail)
    if kind == "KeyNotFound":
        return KeyNotFound(error[1], retry_after=error[2])
    if kind == "HsmUnavailable":
        return HsmUnavailable(error[1], retry_after=error[2])
    return ValueError(error[1])


def _serve(config: dict[str, Any]) -> Served:
    from gateway.hsm.card import CardKeyStore

    store = CardKeyStore(
        config["reader"],
        aids=[bytes.fromhex(a) for a in config["aids"]],
        profiles=[CardProfile(*p) for p in config["profiles"]],
        retry_after=config["retry_after"],
    )

    def open_card() -> tuple[bytes, str | None, dict[str, bool]]:
        store.open_blocking()
        cert = store.cached_certificate
        assert cert is not None
        return cert.public_bytes(Encoding.DER), store.key_id, store.access

    def unlock(pin: bytes) -> None:
        # The unpickled bytes cannot be overwritten (nor could the in-process store's copy
        # for pyscard); the buffer the card call works from is wiped.
        store.unlock_blocking(bytearray(pin))

    return Served(
        {
            "open": open_card,
            "close": store.close_blocking,
            "tries_left": store.tries_left_blocking,
            "unlock": unlock,
            "check": store.check_blocking,
            "sign": store.sign_infos_blocking,
        },
        reported=(CardError, HsmUnavailable, KeyNotFound, ValueError),
        encode_error=encode_error,
        failed=("HsmUnavailable", f"HPKI card in {store.reader}: the card operation failed", 5),
        state=lambda: (store.generation, store.connected),
        close=store.close_blocking,
    )


def main() -> int:
    return child_main("HPKI card process", _serve)


if __name__ == "__main__":
    sys.exit(main())
