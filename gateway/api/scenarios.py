"""Failure scenarios of the sandbox: switch a facility (or one credential) into a failure and see
the error a vendor's system receives, without breaking the TEST world for good.

Three kinds, by what can be made to fail for one facility while the others go on:

- **Real state** (:data:`REAL_STATE`): ``enrolment_locked`` locks the facility's signers'
  active enrolment codes in the store, as five wrong passwords do, and the reset puts back
  exactly what was there (status and attempt counters).
- **On the real component** (:data:`REAL_PATH`): ``tsa_down`` and ``tsa_slow`` send the
  request's timestamp to a dead or a silent TCP port, ``hsm_unavailable`` makes the key store
  fail, ``signer_without_role`` makes the role check read a pharmacist's hcRole
  (``api/scenario_stand_ins.py``); ``ocsp_revoked`` / ``ocsp_unknown`` change what the TEST
  OCSP responder answers (``scenario_file.py``). The request goes through the handler as
  usual: SADs are spent and given back, and the error comes from the code that meets the real
  failure.
- **At the identity check** (facility certificate revoked / expired, facility suspended): a
  revocation is final, a certificate cannot be made to expire and come back, and a really
  suspended facility could not reach the portal to reset; so :func:`scenario_identity`, right
  after the identity middleware, answers what ``auth/mtls.py:identify`` answers for the real
  state (same error class, status, code and description; the date is when the scenario was
  switched on) and drops the identity, as a refused one never has it: nothing is signed, no
  SAD is spent, and the portal stays reachable.

Switched on per facility (``facility:<code>``) or per credential (``credential:<id>``) in the
portal (``/portal/scenarios``) or the admin API (``/admin/scenarios``), kept in
``scenarios.json`` beside the sandbox's gateway.toml (every worker reads the same file), and
audited. Outside a sandbox (``service.sandbox = false``) every scenario route answers 403 and the
middleware is not installed.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update

from gateway.api.keys import AUDIT, CLOCK, DB, SETTINGS, SIGNERS
from gateway.api.middleware import IDENTITY, Handler, identity
from gateway.api.scenario_stand_ins import HSM_UNAVAILABLE_TEXT, SWITCHED
from gateway.api.schema import parse
from gateway.auth.fido2 import LOCKED_TEXT
from gateway.auth.mtls import ClientIdentity
from gateway.config import Settings
from gateway.errors import AccessDenied, InvalidRequest
from gateway.scenario_file import OCSP_SCENARIOS, active, save, serial_key, snapshot
from gateway.store.schema import enrollment, facility, signer_facility

__all__ = [
    "AT_IDENTITY",
    "CATALOG",
    "REAL_PATH",
    "REAL_STATE",
    "Scenario",
    "routes",
    "scenario_effects",
    "scenario_identity",
]

routes = web.RouteTableDef()


#: Scenarios that make the real component fail.
REAL_PATH = frozenset(
    {"tsa_down", "tsa_slow", "hsm_unavailable", "signer_without_role", "ocsp_revoked",
     "ocsp_unknown"}
)  # fmt: skip
#: Scenarios that change the real state in the store (and put it back on reset).
REAL_STATE = frozenset({"enrolment_locked"})
#: Scenarios answered by :func:`scenario_identity`.
AT_IDENTITY = frozenset(
    {"facility_certificate_revoked", "facility_certificate_expired", "facility_suspended"}
)


@dataclass(frozen=True)
class Scenario:
    name: str
    scope: Literal["facility", "credential"]
    #: Which requests it answers: (method, path) -> whether it applies.
    applies: Callable[[str, str], bool]
    status: int
    code: str
    ja: str
    en: str


def _outside_portal(method: str, path: str) -> bool:
    return not (
        path.startswith("/portal") or path in ("/openapi.json", "/health", "/enroll", "/approve")
    )


def _enrolment(method: str, path: str) -> bool:
    return path.startswith("/auth/fido2/register/")  # documents where the locked codes show


def _sign_doc(method: str, path: str) -> bool:
    return path == "/csc/v2/signatures/signDoc"


def _timestamped(method: str, path: str) -> bool:
    return path in ("/csc/v2/signatures/signDoc", "/extend")


def _never(method: str, path: str) -> bool:
    return False  # the effect is on the TEST OCSP responder, not on the gateway's answers


def _keys(method: str, path: str) -> bool:
    return path in ("/csc/v2/signatures/signHash", "/csc/v2/signatures/signDoc")


CATALOG: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "facility_certificate_revoked", "facility", _outside_portal, 403, "access_denied",
            "施設のクライアント証明書が失効している。ポータル以外の全ての呼び出しが 403 "
            "access_denied「client certificate <serial> was revoked on <日時>: sandbox scenario "
            "facility_certificate_revoked」になる（実際の失効と同じ応答。理由の部分は失効時に"
            "記録された理由）。",
            "The facility's client certificate is revoked: every call outside the portal gets "
            "403 access_denied \"client certificate <serial> was revoked on <time>: sandbox "
            "scenario facility_certificate_revoked\" (as for a real revocation, whose reason "
            "is the one recorded).",
        ),
        Scenario(
            "facility_certificate_expired", "facility", _outside_portal, 403, "access_denied",
            "施設のクライアント証明書の有効期限切れ。期限前に開いた接続での呼び出しと同じく "
            "403 access_denied「client certificate <serial> expired on <日時>」。"
            "期限切れの証明書で新しく接続すると、TLS ハンドシェイクで拒否される"
            "（アラート certificate_expired、HTTP の応答なし）。",
            "The facility's client certificate has expired: as on a connection opened before "
            "the expiry, 403 access_denied \"client certificate <serial> expired on <time>\". "
            "A new connection with a really expired certificate is refused in the TLS "
            "handshake (alert certificate_expired, no HTTP answer).",
        ),
        Scenario(
            "facility_suspended", "facility", _outside_portal, 403, "access_denied",
            "施設が利用停止中。ポータル以外の全ての呼び出しが 403 access_denied「facility <code> "
            "is suspended since <日時>: sandbox scenario facility_suspended」。",
            "The facility is suspended: every call outside the portal gets 403 access_denied "
            "\"facility <code> is suspended since <time>: sandbox scenario "
            "facility_suspended\".",
        ),
        Scenario(
            "enrolment_locked", "facility", _enrolment, 403, "access_denied",
            "この施設の署名者の有効な登録コードを、パスワードを 5 回誤ったときと同じくロック"
            "する。そのコードでの認証器の登録が 403 access_denied"
            f"「{LOCKED_TEXT}」。リセットで元の状態に戻る。",
            "Locks the active enrolment codes of the facility's signers, as five wrong "
            "passwords do: registering an authenticator with such a code gets 403 "
            f"access_denied \"{LOCKED_TEXT}\". The reset puts them back as they were.",
        ),
        Scenario(
            "signer_without_role", "credential", _sign_doc, 403, "role_not_permitted",
            "資格のない署名者（処方箋に署名する薬剤師）。この資格情報の hcRole を Pharmacist "
            "として役割を確認し、処方箋の signDoc が 403 role_not_permitted"
            "「hcRole Pharmacist may not sign a prescription document (allowed: …)」"
            "（SAD の確認の後。SAD は返却される）。",
            "A signer without the role (a pharmacist signing a prescription): the role check "
            "reads this credential's hcRole as Pharmacist, and signDoc of a prescription gets "
            "403 role_not_permitted \"hcRole Pharmacist may not sign a prescription document "
            "(allowed: ...)\" (after the SAD check; the SAD is given back).",
        ),
        Scenario(
            "tsa_down", "facility", _timestamped, 503, "tsa_unavailable",
            "タイムスタンプ局が停止。B-T 以上の signDoc と /extend のタイムスタンプ要求が接続を"
            "拒否されるポートに送られ、503 tsa_unavailable（Retry-After: 30）「timestamp "
            "authority <url> is unreachable (ClientConnectorError); nothing was signed」。"
            "SAD は返却される。B-B は署名できる。",
            "The TSA is down: the timestamp request of signDoc at B-T and above and of /extend "
            "goes to a port that refuses connections: 503 tsa_unavailable (Retry-After: 30) "
            "\"timestamp authority <url> is unreachable (ClientConnectorError); nothing was "
            "signed\"; the SAD is given back. B-B still signs.",
        ),
        Scenario(
            "tsa_slow", "facility", _timestamped, 503, "tsa_timeout",
            "タイムスタンプ局が応答しない。タイムスタンプ要求が応答しないポートに送られ、"
            "timestamp.timeout 秒後に 503 tsa_timeout「timestamp authority <url> did not answer "
            "within <n> s; nothing was signed」。SAD は返却される。",
            "The TSA is slow: the timestamp request goes to a port that never answers; after "
            "timestamp.timeout seconds, 503 tsa_timeout \"timestamp authority <url> did not "
            "answer within <n> s; nothing was signed\"; the SAD is given back.",
        ),
        Scenario(
            "ocsp_revoked", "credential", _never, 200, "revoked",
            "TEST OCSP レスポンダがこの資格情報の証明書を revoked と応答する。OCSP を使う検証"
            "（verify --ocsp、外部の検証ソフト）は TOTAL-FAILED / REVOKED などになる。",
            "The TEST OCSP responder answers revoked for this credential's certificate: a "
            "verification asking OCSP (verify --ocsp, any outside verifier) gets TOTAL-FAILED / "
            "REVOKED or the like.",
        ),
        Scenario(
            "ocsp_unknown", "credential", _never, 200, "unknown",
            "TEST OCSP レスポンダがこの資格情報の証明書を unknown と応答する（失効確認が"
            "決まらない、または CRL にフォールバック）。",
            "The TEST OCSP responder answers unknown for this credential's certificate (the "
            "revocation check stays open, or falls back to the CRLs).",
        ),
        Scenario(
            "hsm_unavailable", "facility", _keys, 503, "temporarily_unavailable",
            "HSM が利用不可。signHash と signDoc の署名で鍵ストアが失敗し、503 "
            "temporarily_unavailable（Retry-After: hsm.retry_after）"
            f"「{HSM_UNAVAILABLE_TEXT}」。SAD は返却される。",
            "The HSM is unavailable: the key store fails when signHash or signDoc signs: 503 "
            "temporarily_unavailable (Retry-After: hsm.retry_after) "
            f"\"{HSM_UNAVAILABLE_TEXT}\"; the SAD is given back.",
        ),
    )
}  # fmt: skip


# -- the switched-on scenarios, one JSON file per sandbox -------------------------------------


def _require_sandbox(settings: Settings) -> None:
    if not settings.service.sandbox:
        raise AccessDenied("failure scenarios exist only in a sandbox (service.sandbox = true)")


async def switch(
    request: web.Request, *, name: str, target: str, on: bool, actor: str
) -> dict[str, list[str]]:
    settings = request.app[SETTINGS]
    _require_sandbox(settings)
    scenario = CATALOG.get(name)
    if scenario is None:
        raise InvalidRequest(
            f"Invalid parameter scenario: {name[:60]!r} (one of {sorted(CATALOG)})"
        )
    if not target.startswith(f"{scenario.scope}:") or len(target) <= len(scenario.scope) + 1:
        raise InvalidRequest(f"scenario {name} is switched per {scenario.scope}")
    data = active(settings)
    was_on = name in data.get(target, [])
    names = set(data.get(target, []))
    names = names | {name} if on else names - {name}
    data[target] = sorted(names)
    if scenario.name in OCSP_SCENARIOS:
        # The OCSP responder knows serials, not credentials: keep the serial beside it.
        credential = target.split(":", 1)[1]
        serial = await _serial_of(request, credential)
        key = serial_key(serial, credential)
        data[key] = sorted(
            (set(data.get(key, [])) | {name}) if on else set(data.get(key, [])) - {name}
        )
    if on and not was_on:
        # When it "happened": the date the identity check's answer names, fixed like a real
        # revocation's or suspension's.
        data[_since_key(target, name)] = [_now(request).isoformat()]
    elif not on:
        data.pop(_since_key(target, name), None)
    if name == "enrolment_locked":
        code = target.split(":", 1)[1]
        if on and not was_on:
            data[_locked_key(code)] = await _lock_enrolments(request, code)
        elif not on:
            await _restore_enrolments(request, data.pop(_locked_key(code), []))
    save(settings, data)
    await _audit(request, "sandbox.scenario", actor, {"scenario": name, "target": target, "on": on})
    return active(settings)


async def reset(request: web.Request, *, actor: str, only: list[str] | None = None) -> None:
    settings = request.app[SETTINGS]
    _require_sandbox(settings)
    data = active(settings)
    for key in (
        [k for k in data if k.startswith(("facility:", "credential:"))] if only is None else only
    ):
        data.pop(key, None)
        kind, _, ident = key.partition(":")
        for k in [k for k in data if k.startswith(f"since:{key}:")]:
            data.pop(k)
        if kind == "facility":
            await _restore_enrolments(request, data.pop(_locked_key(ident), []))
        if kind == "credential":
            for k in [k for k in data if k.startswith("serial:") and k.endswith(f":{ident}")]:
                data.pop(k)
    for key in [k for k in data if k.startswith("locked:")] if only is None else []:
        await _restore_enrolments(request, data.pop(key))  # a facility switched off meanwhile
    save(settings, {} if only is None else data)
    await _audit(request, "sandbox.scenario_reset", actor, {"targets": only or "all"})


def _since_key(target: str, name: str) -> str:
    return f"since:{target}:{name}"


def _locked_key(institution_code: str) -> str:
    return f"locked:{institution_code}"


def _now(request: web.Request) -> datetime:
    now: datetime = request.app[CLOCK]() if CLOCK in request.app else datetime.now(UTC)
    return now


async def _lock_enrolments(request: web.Request, institution_code: str) -> list[str]:
    """Lock the active enrolment codes of the facility's signers, as the fifth wrong password
    does (``auth/fido2.py``: status ``locked``); returns what the reset puts back, one
    ``"<id>:<failed_tries>:<checking_tries>"`` per code."""
    signers = (
        select(signer_facility.c.signer_id)
        .join(facility, facility.c.id == signer_facility.c.facility_id)
        .where(facility.c.institution_code == institution_code)
    )
    async with request.app[DB].write() as conn:
        rows = (
            await conn.execute(
                select(enrollment.c.id, enrollment.c.failed_tries, enrollment.c.checking_tries)
                .where(enrollment.c.status == "active", enrollment.c.signer_id.in_(signers))
                .order_by(enrollment.c.id)
            )
        ).all()
        if rows:
            await conn.execute(
                update(enrollment)
                .where(enrollment.c.id.in_([r.id for r in rows]))
                .values(status="locked")
            )
    return [f"{r.id}:{r.failed_tries}:{r.checking_tries}" for r in rows]


async def _restore_enrolments(request: web.Request, saved: list[str]) -> None:
    """Put back what :func:`_lock_enrolments` changed, for the codes still locked (one
    replaced meanwhile by ``signer enroll-code`` stays replaced)."""
    async with request.app[DB].write() as conn:
        for entry in saved:
            enrollment_id, failed, checking = (int(x) for x in entry.split(":"))
            await conn.execute(
                update(enrollment)
                .where(enrollment.c.id == enrollment_id, enrollment.c.status == "locked")
                .values(status="active", failed_tries=failed, checking_tries=checking)
            )


async def _serial_of(request: web.Request, credential: str) -> int:
    for signer in await request.app[SIGNERS].list_signers():
        for c in signer.credentials:
            if c.id == credential and c.certificate is not None:
                return c.certificate.serial_number
    raise InvalidRequest(f"credential {credential[:80]!r} has no certificate")


async def _audit(request: web.Request, action: str, actor: str, detail: dict[str, Any]) -> None:
    async with request.app[DB].write() as conn:
        await request.app[AUDIT].append(conn, action=action, actor=actor, detail=detail)


# -- the effect: the error the real failure gives ----------------------------------------------


def _date(d: datetime) -> str:
    return d.astimezone(UTC).isoformat(timespec="seconds")  # as auth/mtls.py writes dates


def _identity_error(name: str, ident: ClientIdentity, since: datetime) -> AccessDenied:
    """What ``auth/mtls.py:identify`` answers for the real state, word for word."""
    match name:
        case "facility_certificate_revoked":
            return AccessDenied(
                f"client certificate {ident.certificate_serial} was revoked on {_date(since)}: "
                "sandbox scenario facility_certificate_revoked"
            )
        case "facility_certificate_expired":
            return AccessDenied(
                f"client certificate {ident.certificate_serial} expired on {_date(since)}"
            )
        case "facility_suspended":
            return AccessDenied(
                f"facility {ident.institution_code} is suspended since {_date(since)}: "
                "sandbox scenario facility_suspended"
            )
    raise AssertionError(name)  # pragma: no cover - AT_IDENTITY is closed


def _since(
    data: Mapping[str, Sequence[str]], target: str, name: str, fallback: datetime
) -> datetime:
    try:
        return datetime.fromisoformat(data[_since_key(target, name)][0])
    except (KeyError, IndexError, ValueError):
        return fallback


#: When each connection (its TLS session object) first carried a request: a certificate that
#: "expired" after that was checked valid in its TLS handshake, as on a real keep-alive
#: connection; one opened later would have been refused in the handshake. Keyed by the
#: connection's ``ssl.SSLObject``, not its transport: uvloop's transports take no weak
#: reference.
_OPENED: weakref.WeakKeyDictionary[object, datetime] = weakref.WeakKeyDictionary()


#: The switched-on scenarios as this request's first middleware read them: both middlewares
#: see the same file (and read it once).
_ACTIVE = web.RequestKey("scenarios_active", Mapping)


def _active_for(request: web.Request) -> Mapping[str, tuple[str, ...]]:
    data: Mapping[str, tuple[str, ...]] | None = request.get(_ACTIVE)
    if data is None:
        data = request[_ACTIVE] = snapshot(request.app[SETTINGS])
    return data


@functools.lru_cache(maxsize=512)
def _real_path_candidates(method: str, path: str) -> tuple[Scenario, ...]:
    """The signing-path scenarios that apply to a request (a handful of routes: a bounded
    cache instead of every catalog entry's test on every request)."""
    return tuple(s for s in CATALOG.values() if s.name in REAL_PATH and s.applies(method, path))


@web.middleware
async def scenario_identity(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Installed in a sandbox only (``app.py``), right after the identity middleware: the
    certificate and facility scenarios answer there, as the real identity check does, and the
    request then carries no identity (a refused one never has it)."""
    ident = request.get(IDENTITY)
    if (
        isinstance(ident, ClientIdentity)
        and ident.kind == "facility"
        and _outside_portal(request.method, request.path)
    ):
        now = _now(request)
        transport = request.transport
        tls = None if transport is None else transport.get_extra_info("ssl_object")
        opened = now if tls is None else _OPENED.setdefault(tls, now)
        target = f"facility:{ident.institution_code}"
        switched = _active_for(request).get(target, ())
        for name in CATALOG if switched else ():  # revoked before expired before suspended
            if name in AT_IDENTITY and name in switched:
                del request[IDENTITY]
                since = _since(_active_for(request), target, name, now)
                expired_before_connecting = (
                    name == "facility_certificate_expired" and opened >= since
                )
                if expired_before_connecting and transport is not None:
                    # The TLS layer refuses an expired certificate in the handshake and closes
                    # the connection without an alert or an HTTP answer; so does this.
                    transport.abort()
                raise _identity_error(name, ident, since)
    return await handler(request)


@web.middleware
async def scenario_effects(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Installed in a sandbox only (``app.py``), last: the scenarios that act on the signing
    path, for the requests of the facility (or credential) they are switched on for."""
    ident = request.get(IDENTITY)
    if not isinstance(ident, ClientIdentity) or ident.kind != "facility":
        return await handler(request)
    method, path = request.method, request.path
    candidates = _real_path_candidates(method, path)
    if not candidates:
        return await handler(request)
    data = _active_for(request)
    if not data:  # nothing switched on (the usual case): nothing to look up
        return await handler(request)
    switched = set(data.get(f"facility:{ident.institution_code}", ()))
    if (
        any(s.scope == "credential" for s in candidates)
        and any(k.startswith("credential:") for k in data)  # else no body to read for it
        and request.content_type == "application/json"
    ):
        try:
            parsed = await request.json()  # checked by browser_guard; aiohttp keeps the body
        except ValueError:
            parsed = None
        credential = parsed.get("credentialID") if isinstance(parsed, dict) else None
        if isinstance(credential, str):
            switched |= set(data.get(f"credential:{credential}", ()))
    real = frozenset(s.name for s in candidates if s.name in switched)
    if not real:
        return await handler(request)
    token = SWITCHED.set(real)  # seen by the TSA client, the key store and the role policy
    try:
        return await handler(request)
    finally:
        SWITCHED.reset(token)


# -- admin API --------------------------------------------------------------------------------


class ScenarioSwitch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    scenario: str = Field(min_length=1, max_length=64)
    facility: str | None = Field(default=None, min_length=1, max_length=20)
    credential: str | None = Field(default=None, min_length=1, max_length=200)
    on: bool = True


class ScenarioReset(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    facility: str | None = Field(default=None, min_length=1, max_length=20)


def catalog_json() -> list[dict[str, Any]]:
    return [
        {
            "scenario": s.name,
            "scope": s.scope,
            "status": s.status,
            "code": s.code,
            "ja": s.ja,
            "en": s.en,
        }
        for s in CATALOG.values()
    ]


@routes.get("/admin/scenarios")
async def list_scenarios(request: web.Request) -> web.Response:
    """The failure scenarios of the sandbox and which are switched on."""
    settings = request.app[SETTINGS]
    _require_sandbox(settings)
    return web.json_response({"scenarios": catalog_json(), "active": active(settings)})


@routes.post("/admin/scenarios")
async def switch_scenario(request: web.Request) -> web.Response:
    """Switch one scenario on or off for a facility or a credential."""
    _require_sandbox(request.app[SETTINGS])
    req = await parse(request, ScenarioSwitch)
    if (req.facility is None) == (req.credential is None):
        raise InvalidRequest("give exactly one of facility or credential")
    target = f"facility:{req.facility}" if req.facility else f"credential:{req.credential}"
    now = await switch(
        request, name=req.scenario, target=target, on=req.on, actor=identity(request).actor
    )
    return web.json_response({"active": now})


@routes.post("/admin/scenarios/reset")
async def reset_scenarios(request: web.Request) -> web.Response:
    """Switch every scenario off (or those of one facility)."""
    _require_sandbox(request.app[SETTINGS])
    req = await parse(request, ScenarioReset)
    only = [f"facility:{req.facility}"] if req.facility else None
    await reset(request, actor=identity(request).actor, only=only)
    return web.json_response({"active": active(request.app[SETTINGS])})
