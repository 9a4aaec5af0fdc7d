"""``hpki-gateway local serve``: the CSC-shaped API of the remote gateway, on loopback only,
for the card in this PC's reader.

Routes and bodies are the remote gateway's (``info``, ``credentials/list``,
``credentials/info``, ``credentials/authorize``, ``signatures/signHash``,
``signatures/signDoc``), so a facility system integrates once; what differs is presence:
``authData`` id ``"pin"`` instead of ``"webauthn"``. Every request must carry the per-install
secret (``Authorization: Bearer``, compared in constant time): the file holding it is 0600, so
another local user's process cannot drive the card. Request bodies are never logged (the
PIN travels in authorize).
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import logging
import secrets
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from gateway.api.csc import CONFORMANCE_LEVELS, METHODS, RSA_SIGN_ALGOS, SIGNATURE_FORMATS
from gateway.api.decode import decode_hashes, digest_algorithm
from gateway.api.errors import from_gateway_error, render
from gateway.api.schema import CscRequest, parse
from gateway.api.sign_doc_io import check_entries, jobs_of, response_body
from gateway.api.sign_doc_schema import SignDocRequest
from gateway.api.signing import AuthorizeRequest, SignHashRequest
from gateway.api.signing import _algorithm as sign_hash_algorithm
from gateway.card.errors import CardError
from gateway.errors import GatewayError, InvalidRequest
from gateway.files import write_private
from gateway.local.agent import LocalAgent, NoCard, PinRejected
from gateway.logs import where_raised

log = logging.getLogger("gateway.local")

AGENT = web.AppKey("local_agent", LocalAgent)
SECRET = web.AppKey("local_secret", bytes)
MAX_HASHES = 1000
LOOPBACK = "127.0.0.1"


def load_or_create_secret(path: Path) -> bytes:
    """The per-install secret (created 0600 on first use)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, secrets.token_urlsafe(32).encode())
    secret = path.read_bytes().strip()
    if len(secret) < 32:
        raise ValueError(f"{path} does not hold a usable secret")
    return secret


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        given = request.headers.get("Authorization", "")
        expected = b"Bearer " + request.app[SECRET]
        if not hmac.compare_digest(given.encode("utf-8", "replace"), expected):
            return render(
                request,
                status=401,
                code="unauthorized",
                description="this agent answers only callers holding its per-install secret",
                headers={"WWW-Authenticate": "Bearer"},
            )
        response: web.StreamResponse = await handler(request)
        return response
    except PinRejected as e:
        body: dict[str, Any] = {"error": e.code, "error_description": e.client_description}
        body["tries_left"] = e.tries_left
        return web.json_response(body, status=e.status)
    except GatewayError as e:
        return from_gateway_error(request, e)
    except CardError as e:
        return render(request, status=503, code=e.code.value, description=e.message("en"))
    except web.HTTPException as e:
        return render(request, status=e.status, code="invalid_request", description=e.reason)
    except Exception as e:  # noqa: BLE001 - the last resort: a 500 in the API's format
        # Neither a stack trace nor the exception's text: either may carry the request's data
        # (a PIN's characters and their positions). Its type and where it was raised are
        # enough to find the fault.
        where = where_raised(e.__traceback__)
        log.error("unhandled %s on %s at %s", type(e).__name__, request.path, where)
        return render(
            request,
            status=500,
            code="server_error",
            description="internal error of the local agent; its log says where",
        )


class InfoRequest(CscRequest):
    lang: str | None = None


class LocalAuthorizeRequest(AuthorizeRequest):
    documentType: Literal["prescription", "dispensing"] | None = None
    """Optional: the card's hcRole is checked before the PIN. Anything else is 400 with
    pydantic's message, which does not repeat the value."""


class CredentialInfoRequest(CscRequest):
    credentialID: str
    certificates: str = "single"
    certInfo: bool = False
    authInfo: bool = False


class ListRequest(CscRequest):
    credentialInfo: bool = False


routes = web.RouteTableDef()


@routes.post("/csc/v2/info")
async def info(request: web.Request) -> web.Response:
    await parse(request, InfoRequest)
    return web.json_response(
        {
            "specs": "2.0.0.2",
            "name": "hpki-gateway local agent",
            "region": "JP",
            "lang": "ja-JP",
            "description": "local signing with the HPKI card in this PC's reader",
            "authType": ["external"],
            "methods": METHODS,  # the remote gateway's, all of them served here
            "signAlgorithms": {"algos": RSA_SIGN_ALGOS},
            "signature_formats": SIGNATURE_FORMATS,
            "conformance_levels": CONFORMANCE_LEVELS,
            "presenceMethods": ["pin"],
        }
    )


async def _credential_info(agent: LocalAgent, cid: str, certificates: str) -> dict[str, Any]:
    cert = await agent.certificate(cid)
    now = agent.clock()
    valid = cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    tries = await agent.tries_left()
    out: dict[str, Any] = {
        "description": "HPKI card signing key (RSA-2048)",
        "key": {"status": "enabled", "algo": RSA_SIGN_ALGOS, "len": 2048},
        "cert": {
            "status": "valid" if valid else "expired",
            "issuerDN": cert.issuer.rfc4514_string(),
            "serialNumber": format(cert.serial_number, "x"),
            "subjectDN": cert.subject.rfc4514_string(),
            "validFrom": cert.not_valid_before_utc.strftime("%Y%m%d%H%M%SZ"),
            "validTo": cert.not_valid_after_utc.strftime("%Y%m%d%H%M%SZ"),
        },
        "auth": {
            "mode": "explicit",
            "objects": [{"type": "Password", "id": "pin", "format": "A", "label": "PIN"}],
        },
        "authMode": "explicit",
        "PIN": {"presence": "true", "format": "A", "label": "HPKI card PIN"},
        "SCAL": "2",
        "multisign": MAX_HASHES,
        "pin_tries_left": tries,  # null: the card's PKCS#11 module does not tell
    }
    if certificates in ("single", "chain"):
        der = cert.public_bytes(serialization.Encoding.DER)
        out["cert"]["certificates"] = [base64.b64encode(der).decode()]
        if certificates == "chain":
            try:
                path = agent.check_certificate(cert, None)
            except GatewayError:
                path = [cert]
            out["cert"]["certificates"] += [
                base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                for c in path[1:]
            ]
    return out


@routes.post("/csc/v2/credentials/list")
async def credentials_list(request: web.Request) -> web.Response:
    req = await parse(request, ListRequest)
    agent = request.app[AGENT]
    ids = await agent.credential_ids()
    body: dict[str, Any] = {"credentialIDs": ids}
    if req.credentialInfo:
        body["credentialInfos"] = [
            {"credentialID": c, **await _credential_info(agent, c, "single")} for c in ids
        ]
    return web.json_response(body)


@routes.post("/csc/v2/credentials/info")
async def credentials_info(request: web.Request) -> web.Response:
    req = await parse(request, CredentialInfoRequest)
    agent = request.app[AGENT]
    return web.json_response(await _credential_info(agent, req.credentialID, req.certificates))


def _pin(auth_data: list[Any]) -> bytearray:
    for item in auth_data:
        if item.id == "pin" and isinstance(item.value, str):
            try:
                return bytearray(item.value.encode("utf-8"))
            except UnicodeEncodeError:
                # A lone surrogate (JSON's "\ud834"): no card takes it. ``from None``: the
                # encoding error holds the PIN and the character's position.
                raise InvalidRequest(
                    "Invalid parameter authData: the PIN is not text that can be sent to the card"
                ) from None
    raise InvalidRequest(
        'Missing (or invalid type) parameter authData: expected [{"id": "pin", "value": "<PIN>"}]'
    )


@routes.post("/csc/v2/credentials/authorize")
async def authorize(request: web.Request) -> web.Response:
    req = await parse(request, LocalAuthorizeRequest)
    agent = request.app[AGENT]
    raw = req.hashes if req.hashes is not None else req.hash
    hashes = decode_hashes(raw, field="hashes", max_count=MAX_HASHES) if raw is not None else None
    algorithm = digest_algorithm(req.hashAlgorithmOID or "2.16.840.1.101.3.4.2.1")
    document_type = req.documentType
    sad = await agent.authorize(
        credential_id=req.credentialID,
        pin=_pin(list(req.authData)),
        num_signatures=req.numSignatures,
        hashes=hashes,
        algorithm=algorithm,
        document_type=document_type,
    )
    return web.json_response({"SAD": sad, "expiresIn": agent.grant_seconds})


@routes.post("/csc/v2/signatures/signHash")
async def sign_hash(request: web.Request) -> web.Response:
    req = await parse(request, SignHashRequest)
    agent = request.app[AGENT]
    raw = req.hashes if req.hashes is not None else req.hash
    if not raw:
        raise InvalidRequest("Missing (or invalid type) parameter hashes")
    hashes = decode_hashes(raw, field="hashes", max_count=MAX_HASHES)
    algorithm = sign_hash_algorithm(req)  # the remote gateway's rules, to the letter
    signatures = await agent.sign_hash(
        credential_id=req.credentialID, sad=req.SAD, hashes=hashes, algorithm=algorithm
    )
    return web.json_response({"signatures": [base64.b64encode(s).decode() for s in signatures]})


@routes.post("/csc/v2/signatures/signDoc")
async def sign_doc(request: web.Request) -> web.Response:
    req = await parse(request, SignDocRequest)
    agent = request.app[AGENT]
    check_entries(req, policy=agent.policy, tsa=agent.tsa)  # as on the remote gateway
    results = await agent.sign_documents(
        credential_id=req.credentialID, sad=req.SAD, jobs=jobs_of(req)
    )
    return web.json_response(response_body(results))


def create_local_app(
    agent: LocalAgent, secret: bytes, *, max_body: int = 64 << 20
) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=max_body)
    app[AGENT] = agent
    app[SECRET] = secret
    app.add_routes(routes)

    async def start(app: web.Application) -> None:
        # The card process starts with the agent, not with the first request (a failure to
        # start is reported by the request that needs the card).
        with contextlib.suppress(Exception):
            await agent.store.start()

    async def close(app: web.Application) -> None:
        await agent.close()

    app.on_startup.append(start)
    app.on_cleanup.append(close)
    return app


__all__ = ["LOOPBACK", "NoCard", "create_local_app", "load_or_create_secret"]
