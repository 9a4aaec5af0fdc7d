"""Failure scenarios of the sandbox: switch a facility (or one credential) into a failure and see
the error a vendor's system receives, without breaking the TEST world for good.

Two kinds, by what can be made to fail for one facility while the others go on:

- **On the real component** (:data:`REAL_PATH`): ``tsa_down`` and ``tsa_slow`` send the
  request's timestamp to a dead or a silent TCP port, ``hsm_unavailable`` makes the key store
  fail (``api/scenario_stand_ins.py``); ``ocsp_revoked`` / ``ocsp_unknown`` change what the TEST
  OCSP responder answers (``scenario_file.py``). The request goes through the handler as
  usual: SADs are spent and given back, and the error comes from the code that meets the real
  failure.
- **Overlays** (facility certificate revoked / expired, facility suspended, enrolment locked,
  signer without the role): revoking, expiring or suspending for real could not be reset (a
  revocation is final), so these answer exactly as the gateway answers when the real failure
  happens (same status, ``code`` and description, from the same error classes; the texts of
  docs/api.md) before the handler runs: nothing is signed and no SAD is spent.

Switched on per facility (``facility:<code>``) or per credential (``credential:<id>``) in the
portal (``/portal/scenarios``) or the admin API (``/admin/scenarios``), kept in
``scenarios.json`` beside the sandbox's gateway.toml (every worker reads the same file), and
audited. Outside a sandbox (``service.sandbox = false``) every scenario route answers 403 and the
middleware is not installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.keys import AUDIT, CLOCK, DB, SETTINGS, SIGNERS
from gateway.api.middleware import IDENTITY, Handler, identity
from gateway.api.scenario_stand_ins import HSM_UNAVAILABLE_TEXT, SWITCHED
from gateway.api.schema import parse
from gateway.auth.fido2 import LOCKED_TEXT
from gateway.auth.mtls import ClientIdentity
from gateway.config import Settings
from gateway.errors import (
    AccessDenied,
    GatewayError,
    InvalidRequest,
    RoleNotPermitted,
)
from gateway.scenario_file import OCSP_SCENARIOS, active, save, serial_key

__all__ = ["CATALOG", "REAL_PATH", "Scenario", "routes", "scenario_effects"]

routes = web.RouteTableDef()


#: Scenarios that make the real component fail (the others answer before the handler).
REAL_PATH = frozenset({"tsa_down", "tsa_slow", "hsm_unavailable", "ocsp_revoked", "ocsp_unknown"})


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
    return path.startswith("/auth/fido2/register/")


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
            "access_denied「client certificate <serial> was revoked on <日時>: …」になる。",
            "The facility's client certificate is revoked: every call outside the portal gets "
            "403 access_denied \"client certificate <serial> was revoked on <time>: ...\".",
        ),
        Scenario(
            "facility_certificate_expired", "facility", _outside_portal, 403, "access_denied",
            "施設のクライアント証明書の有効期限切れ。403 access_denied「client certificate "
            "<serial> expired on <日時>」。",
            "The facility's client certificate has expired: 403 access_denied \"client "
            "certificate <serial> expired on <time>\".",
        ),
        Scenario(
            "facility_suspended", "facility", _outside_portal, 403, "access_denied",
            "施設が利用停止中。403 access_denied「facility <code> is suspended since <日時>: …」。",
            "The facility is suspended: 403 access_denied \"facility <code> is suspended since "
            "<time>: ...\".",
        ),
        Scenario(
            "enrolment_locked", "facility", _enrolment, 403, "access_denied",
            "登録コードがパスワードの誤りでロックされている。認証器の登録が 403 access_denied"
            f"「{LOCKED_TEXT}」。",
            "The enrolment code is locked after wrong passwords: registering an authenticator "
            f"gets 403 access_denied \"{LOCKED_TEXT}\".",
        ),
        Scenario(
            "signer_without_role", "credential", _sign_doc, 403, "role_not_permitted",
            "資格のない署名者（処方箋に署名する薬剤師）。signDoc が 403 role_not_permitted"
            "「hcRole Pharmacist may not sign a prescription document (allowed: …)」。",
            "A signer without the role (a pharmacist signing a prescription): signDoc gets 403 "
            "role_not_permitted \"hcRole Pharmacist may not sign a prescription document "
            "(allowed: ...)\".",
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
    save(settings, data)
    await _audit(request, "sandbox.scenario", actor, {"scenario": name, "target": target, "on": on})
    return active(settings)


async def reset(request: web.Request, *, actor: str, only: list[str] | None = None) -> None:
    settings = request.app[SETTINGS]
    _require_sandbox(settings)
    data = active(settings)
    for key in list(data) if only is None else only:
        data.pop(key, None)
        if key.startswith("credential:"):
            credential = key.split(":", 1)[1]
            for k in [k for k in data if k.startswith("serial:") and k.endswith(f":{credential}")]:
                data.pop(k)
    save(settings, data)
    await _audit(request, "sandbox.scenario_reset", actor, {"targets": only or "all"})


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


def _when(request: web.Request) -> str:
    now: datetime = request.app[CLOCK]() if CLOCK in request.app else datetime.now(UTC)
    return now.isoformat()


async def _error(
    request: web.Request, scenario: Scenario, ident: ClientIdentity, body: dict[str, Any]
) -> GatewayError:
    when = _when(request)
    match scenario.name:
        case "facility_certificate_revoked":
            return AccessDenied(
                f"client certificate {ident.certificate_serial} was revoked on {when}: "
                "sandbox scenario facility_certificate_revoked"
            )
        case "facility_certificate_expired":
            return AccessDenied(f"client certificate {ident.certificate_serial} expired on {when}")
        case "facility_suspended":
            return AccessDenied(
                f"facility {ident.institution_code} is suspended since {when}: "
                "sandbox scenario facility_suspended"
            )
        case "enrolment_locked":
            return AccessDenied(LOCKED_TEXT)
        case "signer_without_role":
            return RoleNotPermitted(
                "hcRole Pharmacist may not sign a prescription document "
                "(allowed: Medical Doctor, Dentist)"
            )
    raise AssertionError(scenario.name)  # pragma: no cover - the catalog is closed


@web.middleware
async def scenario_effects(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Installed in a sandbox only (``app.py``), after the identity middleware."""
    ident = request.get(IDENTITY)
    if not isinstance(ident, ClientIdentity) or ident.kind != "facility":
        return await handler(request)
    method, path = request.method, request.path
    candidates = [s for s in CATALOG.values() if s.applies(method, path)]
    if not candidates:
        return await handler(request)
    data = active(request.app[SETTINGS])
    switched = set(data.get(f"facility:{ident.institution_code}", []))
    body: dict[str, Any] = {}
    if method == "POST" and request.content_type == "application/json":
        try:
            parsed = await request.json()  # aiohttp keeps the body for the handler
        except ValueError:
            parsed = None
        body = parsed if isinstance(parsed, dict) else {}
    credential = body.get("credentialID")
    if isinstance(credential, str):
        switched |= set(data.get(f"credential:{credential}", []))
    for scenario in candidates:
        if scenario.name in switched and scenario.name not in REAL_PATH:
            raise await _error(request, scenario, ident, body)
    real = frozenset(s.name for s in candidates if s.name in switched and s.name in REAL_PATH)
    if not real:
        return await handler(request)
    token = SWITCHED.set(real)  # seen by the TSA client and the key store of this request
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
