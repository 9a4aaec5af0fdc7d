"""Card errors with messages a doctor understands, in Japanese and English.

Each error has a stable ``code`` (scripts and facility systems branch on it) and a message in
both languages; ``tries_left`` is set for a wrong PIN. Nothing here ever holds the PIN.
"""

from __future__ import annotations

import os
from enum import StrEnum


class CardErrorCode(StrEnum):
    NO_READER = "no_reader"
    NO_CARD = "no_card"
    CARD_REMOVED = "card_removed"
    CARD_IN_USE = "card_in_use"
    READER_ERROR = "reader_error"
    NOT_MY_NUMBER_CARD = "not_my_number_card"
    NOT_HPKI_CARD = "not_hpki_card"
    PIN_FORMAT = "pin_format"
    WRONG_PIN = "wrong_pin"
    PIN_BLOCKED = "pin_blocked"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_REVOKED = "certificate_revoked"
    CARD_ERROR = "card_error"
    PCSC_UNAVAILABLE = "pcsc_unavailable"


_MESSAGES: dict[CardErrorCode, tuple[str, str]] = {
    CardErrorCode.NO_READER: (
        "カードリーダーが見つかりません。リーダーがパソコンに接続されているか確認してください。",
        "No card reader found. Check that the reader is connected to this computer.",
    ),
    CardErrorCode.NO_CARD: (
        "マイナンバーカードが置かれていません。カードをリーダーに置いてください。",
        "No card in the reader. Place your My Number card on the reader.",
    ),
    CardErrorCode.CARD_REMOVED: (
        "処理の途中でカードが外されました。カードを置いたまま、もう一度やり直してください。",
        "The card was removed during the operation. Leave it on the reader and try again.",
    ),
    CardErrorCode.CARD_IN_USE: (
        "カードを他のソフトウェアが使用中です。他のカード利用ソフトを終了してから、もう一度やり直してください。",
        "Another program is using the card. Close other card software and try again.",
    ),
    CardErrorCode.READER_ERROR: (
        "カードリーダーがカードにコマンドを送れませんでした（{detail}）。",
        "The card reader could not pass the command to the card ({detail}).",
    ),
    CardErrorCode.NOT_MY_NUMBER_CARD: (
        "このカードはマイナンバーカードではありません（または読み取れません）。",
        "This card is not a My Number card (or cannot be read).",
    ),
    CardErrorCode.NOT_HPKI_CARD: (
        "このカードはHPKIカードではありません（署名用アプリケーションが見つかりません）。",
        "This card is not an HPKI card (no signing application found).",
    ),
    CardErrorCode.PIN_FORMAT: (
        "利用者証明用暗証番号は数字4桁です。",
        "The user-authentication PIN is 4 digits.",
    ),
    CardErrorCode.WRONG_PIN: (
        "暗証番号が違います。残り{tries}回間違えるとロックされます。",
        "Wrong PIN. The card locks after {tries} more wrong tries.",
    ),
    CardErrorCode.PIN_BLOCKED: (
        "暗証番号がロックされています。お住まいの市区町村の窓口で初期化（再設定）してください。",
        "The PIN is blocked. Have it reset at your municipal office (市区町村の窓口).",
    ),
    CardErrorCode.CERTIFICATE_EXPIRED: (
        "カードの利用者証明用電子証明書の有効期限が切れています。市区町村の窓口で更新してください。",
        "The card's user-authentication certificate has expired. Renew it at your municipal "
        "office.",
    ),
    CardErrorCode.CERTIFICATE_REVOKED: (
        "カードの利用者証明用電子証明書は失効しています。市区町村の窓口にお問い合わせください。",
        "The card's user-authentication certificate has been revoked. Ask your municipal office.",
    ),
    CardErrorCode.CARD_ERROR: (
        "カードとの通信でエラーが発生しました（{detail}）。",
        "The card answered with an error ({detail}).",
    ),
    CardErrorCode.PCSC_UNAVAILABLE: (
        "カードリーダーのサービス（pcscd）に接続できません。",
        "Cannot reach the smart card service (pcscd).",
    ),
}


def default_language() -> str:
    """``ja`` unless the environment asks for English (LANG/LC_ALL not starting with ja)."""
    for var in ("HPKI_GATEWAY_LANG", "LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(var)
        if value:
            return "ja" if value.lower().startswith("ja") else "en"
    return "ja"


class CardError(Exception):
    """A card operation failed; ``message(lang)`` says what to do."""

    def __init__(
        self, code: CardErrorCode, *, tries_left: int | None = None, detail: str = ""
    ) -> None:
        self.code = code
        self.tries_left = tries_left
        self.detail = detail
        super().__init__(self.message("en"))

    def message(self, lang: str = "ja") -> str:
        ja, en = _MESSAGES[self.code]
        text = ja if lang == "ja" else en
        return text.format(tries=self.tries_left, detail=self.detail)

    def to_json_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "error": self.code.value,
            "message_ja": self.message("ja"),
            "message_en": self.message("en"),
        }
        if self.tries_left is not None:
            out["tries_left"] = self.tries_left
        return out
