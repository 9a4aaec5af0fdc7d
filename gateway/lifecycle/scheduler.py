"""The lifecycle scheduler: scheduled revocations, expiry reminders, mail, CRL refresh.

Idempotent in the store, so cron (``hpki-gateway scheduler run-once``) and every ``serve`` worker
may run it at the same time:
- a scheduled revocation is an ``UPDATE ... WHERE status = 'active'``: one runner changes the
  row, the others change nothing and skip the audit record;
- a reminder is claimed by inserting its ``notification`` row, unique on (certificate, kind):
  the INSERT of a second runner fails and that runner moves on; the notification and its audit
  record commit together;
- a mail is claimed by setting ``smtp_claimed_at`` where it was NULL (or stale), so one runner
  sends it;
- the CRL is rewritten atomically (rename), so concurrent rewrites are harmless;
- expired WebAuthn challenges and SADs are purged ``activation.purge_after_hours`` after they
  expired, by a conditional ``DELETE ... WHERE expires_at < cutoff``: a second runner deletes
  nothing, and a live SAD (``expires_at`` in the future) never matches. The audit log is never
  purged: each SAD's issuance and use stay recorded there (``signature.authorize``, ...).

Reminder schedule (HPKI.md §6): 90, 60, 30, 15 and 7 days before expiry, then daily, and at
expiry. "Days before" are JST calendar days (0 = the expiry day). When the scheduler was not
running on a reminder day, the most recent reminder that is due is sent late, once; older ones
that were missed are not sent (a stale "90 days left" mail would mislead).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from gateway.auth import challenges as auth_challenges
from gateway.clock import JST, days_left, jst_date
from gateway.errors import GatewayError, TemporarilyUnavailable
from gateway.lifecycle import mailer
from gateway.lifecycle.certificates import ClientCertificateService
from gateway.lifecycle.notice import jp_date
from gateway.signing import ledger
from gateway.store.schema import notification

log = logging.getLogger("gateway.scheduler")

EXPIRED_NOTICE_WINDOW = timedelta(days=30)  # "at expiry": not for certificates long expired
SMTP_CLAIM_STALE = timedelta(minutes=10)  # a runner that died mid-send releases its claim


def milestones(reminder_days: list[int]) -> list[int]:
    """[90, 60, 30, 15, 7, 6, 5, 4, 3, 2, 1, 0]: the configured days, then every day."""
    days = sorted(set(reminder_days), reverse=True)
    daily = list(range(min(days) - 1, -1, -1)) if days else []
    return days + daily


def reminder_kind(not_after: datetime, now: datetime, schedule: list[int]) -> str | None:
    """The reminder due now for a certificate, or None (before the first one)."""
    if now >= not_after:
        return "expired"
    left = days_left(not_after, now)
    reached = [m for m in schedule if m >= left]
    if not reached:
        return None
    return f"expiry-{min(reached)}d"


@dataclass
class SchedulerReport:
    revoked: list[str] = field(default_factory=list)
    reminders: list[dict[str, Any]] = field(default_factory=list)
    mailed: int = 0
    mail_errors: int = 0
    crl_published: bool = False
    purged: dict[str, int] = field(default_factory=lambda: {"sads": 0, "challenges": 0})
    archives: list[dict[str, Any]] = field(default_factory=list)

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Skipped(Exception):
    """Another instance holds the scheduler lock this round."""


class Scheduler:
    def __init__(self, *, service: ClientCertificateService) -> None:
        self.service = service
        self.settings = service.settings
        self.db = service.db
        self.audit = service.audit

    @property
    def clock(self) -> Any:
        return self.service.clock

    async def run_once(self) -> SchedulerReport:
        report = SchedulerReport()
        report.revoked = await self.service.revoke_due()
        report.crl_published = bool(report.revoked)
        report.reminders = await self.claim_reminders()
        report.mailed, report.mail_errors = await self.send_pending_mail()
        if not report.crl_published:
            report.crl_published = await self.service.refresh_crl()
        report.purged = await self.purge_expired()
        from gateway.sign.renewal import renew_configured  # ES-A renewal (signatures.md)

        report.archives = await renew_configured(
            self.settings, db=self.db, audit=self.audit, clock=self.clock
        )
        return report

    async def purge_expired(self) -> dict[str, int]:
        """Delete SADs and challenges (WebAuthn, My Number card) that expired more than
        ``activation.purge_after_hours`` ago (idempotent; a live SAD never qualifies)."""
        now = self.clock()
        cutoff = now - timedelta(hours=self.settings.activation.purge_after_hours)
        async with self.db.write() as conn:
            sads = await ledger.purge_expired(conn, before=cutoff)
            challenges = await auth_challenges.purge_expired(conn, before=cutoff)
            if sads or challenges:
                await self.audit.append(
                    conn,
                    action="maintenance.purge_expired",
                    actor="system:scheduler",
                    detail={
                        "sads": sads,
                        "challenges": challenges,
                        "expired_before": cutoff.isoformat(),
                    },
                    now=now,
                )
        return {"sads": sads, "challenges": challenges}

    async def claim_reminders(self) -> list[dict[str, Any]]:
        now = self.clock()
        schedule = milestones(self.settings.certificates.reminder_days)
        horizon = now + timedelta(days=max(schedule) + 1)
        async with self.db.read() as conn:
            rows = await self.service.registry.reminder_candidates_in(
                conn, now=now, horizon=horizon, expired_since=now - EXPIRED_NOTICE_WINDOW
            )
            existing = {
                (r.certificate_id, r.kind)
                for r in (
                    await conn.execute(
                        select(notification.c.certificate_id, notification.c.kind).where(
                            notification.c.certificate_id.in_([r.id for r in rows] or [-1])
                        )
                    )
                ).all()
            }
        created = []
        for r in rows:
            kind = reminder_kind(r.not_after, now, schedule)
            if kind is None or (r.id, kind) in existing:
                continue
            subject, body = self.reminder_text(r, kind, now)
            due = self._due_at(r.not_after, kind)
            try:
                async with self.db.write() as conn:
                    await conn.execute(
                        insert(notification).values(
                            facility_id=r.facility_id,
                            certificate_id=r.id,
                            kind=kind,
                            due_at=due,
                            created_at=now,
                            recipient=r.contact_email,
                            subject=subject,
                            body=body,
                        )
                    )
                    await self.audit.append(
                        conn,
                        action="notification.expiry_reminder",
                        actor="system:scheduler",
                        facility_code=r.institution_code,
                        detail={
                            "serial": r.serial_hex,
                            "kind": kind,
                            "expires": r.not_after.isoformat(),
                        },
                        now=now,
                    )
            except IntegrityError:
                continue  # another runner claimed this reminder
            created.append(
                {"serial": r.serial_hex, "institution_code": r.institution_code, "kind": kind}
            )
        return created

    @staticmethod
    def _due_at(not_after: datetime, kind: str) -> datetime:
        if kind == "expired":
            return not_after
        n = int(kind.removeprefix("expiry-").removesuffix("d"))
        day = jst_date(not_after) - timedelta(days=n)
        return datetime(day.year, day.month, day.day, tzinfo=JST)

    def reminder_text(self, r: Any, kind: str, now: datetime) -> tuple[str, str]:
        service = self.settings.service.name
        terminal = r.terminal_label or "－"
        head = (
            f"{r.name} ご担当者様\n\n"
            f"医療機関等コード: {r.institution_code}\n"
            f"端末名称: {terminal}\n"
            f"証明書シリアル番号: {r.serial_hex}\n"
            f"有効期限: {jp_date(r.not_after)}\n\n"
        )
        if kind == "expired":
            subject = (
                f"【{service}】クライアント証明書の有効期限が切れました（{r.institution_code}）"
            )
            body = head + (
                f"{service} に接続するためのクライアント証明書の有効期限が切れました。\n"
                "この証明書ではゲートウェイに接続できず、電子処方箋などの署名ができません。\n"
                "新しい証明書の発行を登録担当窓口に申請してください（期限切れ後は新規発行になります）。\n"
            )
            return subject, body
        left = days_left(r.not_after, now)
        when = "本日が有効期限です" if left == 0 else f"有効期限まであと{left}日です"
        subject = f"【{service}】クライアント証明書の{when}（{r.institution_code}）"
        if json.loads(r.policy or "{}").get("auto_renewal"):
            return subject, head + self._auto_renewal_text(r, left, now)
        body = head + (
            f"{service} に接続するためのクライアント証明書の{when}。\n"
            "期限が切れると、この証明書ではゲートウェイに接続できなくなり、署名ができなくなります。\n\n"
            "【ご対応のお願い】\n"
            "1. 有効期限内に、登録担当窓口へ証明書の更新をお申し込みください"
            "（申請フォームから「再申請」、備考に「有効期限による更新」とご記入ください。"
            "システムベンダー様による代理申請もできます）。\n"
            "2. 新しい証明書とパスワード通知書が届いたら、"
            "システムベンダー様へ設定をご依頼ください。\n"
            "3. 更新後の証明書の発行日から1か月後に、現在の証明書は自動的に失効します。\n"
            "   その間は新旧どちらの証明書でも接続できます。\n"
            "期限内の更新であれば切れ目なく利用できます。期限切れの後は新規の発行手続きが必要です"
            f"（発行料に加えて郵送手数料{self.settings.fees.postage_yen}円がかかります）。\n\n"
            "貴施設のシステムが hpki-gateway client renew を毎日実行するよう設定すると、"
            "次回からは申請なしで自動的に更新されます（システムベンダー様にご相談ください）。\n"
        )
        return subject, body

    def _auto_renewal_text(self, r: Any, left: int, now: datetime) -> str:
        """For a facility whose own system renews over EST (``hpki-gateway client renew``):
        renewal is automatic, and this is when; what to check if it does not happen."""
        service = self.settings.service.name
        window = self.settings.certificates.renewal_window_days
        opens = jst_date(r.not_after) - timedelta(days=window)
        if left > window:
            when = (
                f"{opens.year}年{opens.month}月{opens.day}日（有効期限の{window}日前）以降の"
                "最初の実行で、貴施設のシステムが自動的に更新します。"
            )
        else:
            when = (
                f"{opens.year}年{opens.month}月{opens.day}日から自動更新の期間に入っており、"
                "貴施設のシステムの次回の実行（毎日）で更新されます。"
            )
        return (
            f"{service} に接続するためのクライアント証明書は、貴施設のシステム"
            "（hpki-gateway client renew）が自動で更新します。お申し込みは不要です。\n"
            f"{when}\n"
            "更新後も、現在の証明書は新しい証明書の発行日から1か月間は使えます。\n\n"
            "有効期限の7日前を過ぎても更新されない場合は、システムベンダー様に"
            "自動更新の実行結果（終了コード10が更新、0が更新不要、それ以外は失敗）を"
            "ご確認いただくか、登録担当窓口へ更新をお申し込みください。\n"
        )

    async def send_pending_mail(self) -> tuple[int, int]:
        if not mailer.smtp_configured(self.settings):
            return 0, 0
        now = self.clock()
        async with self.db.read() as conn:
            pending = (
                await conn.execute(
                    select(notification).where(
                        and_(
                            notification.c.sent_at.is_(None),
                            notification.c.recipient.is_not(None),
                            or_(
                                notification.c.smtp_claimed_at.is_(None),
                                notification.c.smtp_claimed_at < now - SMTP_CLAIM_STALE,
                            ),
                        )
                    )
                )
            ).all()
        sent = errors = 0
        for n in pending:
            async with self.db.write() as conn:
                res = await conn.execute(
                    update(notification)
                    .where(
                        and_(
                            notification.c.id == n.id,
                            notification.c.sent_at.is_(None),
                            or_(
                                notification.c.smtp_claimed_at.is_(None),
                                notification.c.smtp_claimed_at < now - SMTP_CLAIM_STALE,
                            ),
                        )
                    )
                    .values(smtp_claimed_at=now)
                )
            if res.rowcount != 1:
                continue
            msg = mailer.build(
                sender=self.settings.smtp.sender, to=n.recipient, subject=n.subject, body=n.body
            )
            try:
                await asyncio.to_thread(mailer.send, self.settings, msg)
            except GatewayError as e:
                errors += 1
                log.warning("reminder %s not mailed: %s", n.id, e.description)
                async with self.db.write() as conn:
                    await conn.execute(
                        update(notification)
                        .where(notification.c.id == n.id)
                        .values(error=e.description[:500])
                    )
                continue
            sent += 1
            async with self.db.write() as conn:
                await conn.execute(
                    update(notification)
                    .where(notification.c.id == n.id)
                    .values(sent_at=self.clock(), error=None)
                )
        return sent, errors

    async def loop(
        self,
        interval: float,
        stop: asyncio.Event,
        on_run: Callable[[str], None] | None = None,
    ) -> None:
        """Run until ``stop`` is set; a failing run is logged and retried next interval.
        ``on_run`` hears each run's outcome ("ok", "failed", "skipped": another instance
        held the lock), for the metrics."""
        while not stop.is_set():
            outcome = "failed"
            try:
                # One instance at a time across every gateway sharing the store (PostgreSQL
                # advisory lock); the others skip this round.
                async with self.db.exclusive("hpki-gateway.scheduler") as mine:
                    if not mine:
                        outcome = "skipped"
                        raise _Skipped
                    report = await self.run_once()
                outcome = "ok"
                purged = report.purged["sads"] + report.purged["challenges"]
                if report.revoked or report.reminders or report.mailed or purged:
                    log.info(
                        "scheduler: %s revoked, %s reminders, %s mailed, %s expired rows purged",
                        len(report.revoked),
                        len(report.reminders),
                        report.mailed,
                        purged,
                    )
            except _Skipped:
                pass
            except TemporarilyUnavailable as e:
                # The store locked past its busy time-out, or down: an operating condition with
                # its own line, not a stack trace (what a fault run and an operator read).
                log.warning("scheduler run failed: %s; retrying in %s s", e.logged, interval)
            except Exception:
                log.exception("scheduler run failed; retrying in %s s", interval)
            if on_run is not None:
                on_run(outcome)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
