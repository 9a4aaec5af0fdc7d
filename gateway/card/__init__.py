"""The card client for the facility PC: PC/SC transport (pyscard), APDUs, the JPKI application.

Importable by a facility system (``from gateway.card import JpkiCard, open_card``) as well as
used by ``hpki-gateway card ...``. Nothing here talks to the gateway's database or keys.
"""

from gateway.card.errors import CardError, CardErrorCode
from gateway.card.jpki import JpkiCard, open_jpki_card

__all__ = ["CardError", "CardErrorCode", "JpkiCard", "open_jpki_card"]
