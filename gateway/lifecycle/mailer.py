"""Out-of-band mail: build Japanese messages, write them to the outbox, send them by SMTP.

Blocking (smtplib): callers in the event loop run :func:`send` in a thread. Nothing here logs a
message body, because delivery mails carry a download password.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.files import write_private


class MailError(GatewayError):
    """The SMTP server refused or could not be reached; the message stays in the outbox."""

    status = 502
    code = "mail_failed"


def build(*, sender: str, to: str | None, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    if to:
        msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain="hpki-gateway.invalid")
    msg.set_content(body, charset="utf-8")
    return msg


def write_eml(path: Path, msg: EmailMessage) -> Path:
    """Write a mail to the outbox, owner-only: the mails carry the download link and password."""
    write_private(path, bytes(msg))
    return path


def smtp_configured(settings: Settings) -> bool:
    return settings.smtp.host is not None


def send(settings: Settings, msg: EmailMessage) -> None:
    """Send one message; raise MailError (never with the message text) when it fails."""
    s = settings.smtp
    if s.host is None:
        raise MailError("SMTP is not configured (smtp.host)")
    if not msg["To"]:
        raise MailError("the facility has no contact e-mail address")
    try:
        with smtplib.SMTP(s.host, s.port, timeout=s.timeout_seconds) as smtp:
            if s.starttls:
                smtp.starttls(context=ssl.create_default_context())
            password = settings.smtp_password()
            if s.username and password:
                smtp.login(s.username, password)
            smtp.send_message(msg)
    except (OSError, smtplib.SMTPException) as e:
        raise MailError(f"SMTP delivery to {s.host}:{s.port} failed: {type(e).__name__}") from e
