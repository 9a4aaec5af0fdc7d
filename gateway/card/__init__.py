"""The card client for the facility PC: PC/SC transport (pyscard), APDUs, the JPKI application.

Importable by a facility system (``from gateway.card import JpkiCard, open_card``) as well as
used by ``hpki-gateway card ...``. Nothing here talks to the gateway's database or keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.card.errors import CardError, CardErrorCode

if TYPE_CHECKING:
    from gateway.card.jpki import JpkiCard, open_jpki_card

__all__ = ["CardError", "CardErrorCode", "JpkiCard", "open_jpki_card"]


def __getattr__(name: str) -> Any:
    # The JPKI client on first use: the HPKI card process imports this package too, and
    # starts faster without it.
    if name in ("JpkiCard", "open_jpki_card"):
        from gateway.card import jpki

        return getattr(jpki, name)
    raise AttributeError(name)
