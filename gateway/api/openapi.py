"""``GET /openapi.json``: the OpenAPI 3.1 document of every route, generated, never written.

Built from what the app really runs:

- the paths and methods: every route table in ``app.ROUTES`` (and the delivery listener's);
- the request body of a handler: the pydantic model it validates with, found in its source
  (``parse(request, Model)``) and rendered by pydantic's ``model_json_schema`` — the schema the
  handler enforces, so the two cannot drift;
- the response body: the pydantic model named in :data:`RESPONSE_MODELS` where a handler renders
  one; HTML for the pages;
- the errors: the ones every route shares (mTLS, size, media type, 500, 503), the
  :class:`~gateway.errors.GatewayError` classes raised in the handler's module, and the ones the
  services behind a path raise (:data:`SERVICE_ERRORS`), each with its stable ``code``.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from gateway import errors as gw_errors
from gateway.api.sign_doc_schema import SignDocResponse

__all__ = ["build", "routes"]

routes = web.RouteTableDef()

OPENAPI_VERSION = "3.1.0"
_PARSE = re.compile(r"parse\(\s*request\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")

#: Handlers that render a pydantic model as their answer.
RESPONSE_MODELS: dict[tuple[str, str], type[BaseModel]] = {
    ("POST", "/csc/v2/signatures/signDoc"): SignDocResponse,
}

#: Errors raised by the services behind a path (not in the handler's module), by path prefix.
SERVICE_ERRORS: dict[str, tuple[type[gw_errors.GatewayError], ...]] = {
    "/auth/fido2/register/": (
        gw_errors.WrongPassword,
        gw_errors.Locked,
        gw_errors.Gone,
        gw_errors.NotFound,
        gw_errors.AccessDenied,
    ),
    "/auth/fido2/authenticate/": (gw_errors.NotFound, gw_errors.Locked),
    "/csc/v2/credentials/authorize": (gw_errors.Locked, gw_errors.NotFound),
    "/csc/v2/signatures/": (
        gw_errors.RoleNotPermitted,
        gw_errors.HsmUnavailable,
        gw_errors.KeyNotFound,
        gw_errors.TsaUnavailable,
        gw_errors.TsaTimeout,
        gw_errors.RevocationUnavailable,
    ),
    "/extend": (gw_errors.TsaUnavailable, gw_errors.TsaTimeout),
    "/admin/": (gw_errors.NotFound, gw_errors.Conflict),
    "/download/": (gw_errors.WrongPassword, gw_errors.Locked, gw_errors.Gone, gw_errors.NotFound),
    "/portal/": (gw_errors.NotFound,),
}

_UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


def _error_classes() -> list[type[gw_errors.GatewayError]]:
    out: list[type[gw_errors.GatewayError]] = []
    todo: list[type[gw_errors.GatewayError]] = [gw_errors.GatewayError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(out, key=lambda c: (c.status, c.code, c.__name__))


def error_codes() -> dict[str, int]:
    """Every stable error code and its HTTP status (plus the ones aiohttp's own errors map to)."""
    codes = {c.code: c.status for c in _error_classes()}
    codes.update({"method_not_allowed": 405, "payload_too_large": 413, "not_found": 404})
    return dict(sorted(codes.items()))


def _source_of(handler: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(handler)
    except (OSError, TypeError):
        return ""


def request_model(handler: Callable[..., Any]) -> type[BaseModel] | None:
    """The model the handler validates its JSON body with (``parse(request, Model)``)."""
    found = _PARSE.search(_source_of(handler))
    if found is None:
        return None
    model = getattr(sys.modules[handler.__module__], found.group(1), None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{handler.__qualname__} parses with {found.group(1)}, not a model")
    return model


@cache
def _raised_in_module(module: str) -> tuple[type[gw_errors.GatewayError], ...]:
    """The GatewayError classes a module raises by name (``raise X(...)``)."""
    mod = sys.modules[module]
    try:
        tree = ast.parse(inspect.getsource(mod))
    except (OSError, TypeError):
        return ()
    found: list[type[gw_errors.GatewayError]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else None
            cls = getattr(mod, name, None) if name else None
            if isinstance(cls, type) and issubclass(cls, gw_errors.GatewayError):
                found.append(cls)
    return tuple(found)


def _errors_for(method: str, path: str, handler: Callable[..., Any], parses: bool) -> set[str]:
    codes = {"access_denied", "server_error", "temporarily_unavailable"}
    if method in _UNSAFE:
        codes |= {"payload_too_large", "unsupported_media_type"}
    if parses or "{" in path:
        codes.add("invalid_request")
    codes |= {c.code for c in _raised_in_module(handler.__module__)}
    for prefix, classes in SERVICE_ERRORS.items():
        if path.startswith(prefix):
            codes |= {c.code for c in classes}
    return codes


Route = tuple[str, str, Callable[..., Any]]


def app_routes(app: web.Application) -> list[Route]:
    """(method, path, handler) of every route the app's router serves (HEAD twins left out)."""
    out = []
    for r in app.router.routes():
        if r.method in ("HEAD", "*") or r.resource is None:
            continue
        out.append((r.method.upper(), r.resource.canonical, r.handler))
    return out


def table_routes(tables: Iterable[web.RouteTableDef]) -> list[Route]:
    out = []
    for table in tables:
        for r in table:
            if isinstance(r, web.RouteDef) and r.method != "HEAD":
                out.append((r.method.upper(), r.path, r.handler))
    return out


def _schema_ref(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        components[name] = sub
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root"
    return f"{method.lower()}_{words}"


def _tag(path: str) -> str:
    for prefix, tag in (
        ("/csc/", "CSC API v2"),
        ("/auth/", "FIDO2"),
        ("/admin", "Admin"),
        ("/portal", "Portal"),
        ("/download/", "Delivery listener"),
    ):
        if path.startswith(prefix):
            return tag
    return "Gateway"


def build(
    routes_: Iterable[Route],
    *,
    title: str,
    version: str,
    server_url: str | None,
) -> dict[str, Any]:
    components: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    codes = error_codes()
    answered: set[str] = set()  # the codes some route may answer with
    for method, path, handler in routes_:
        model = request_model(handler)
        op = _operation(method, path, handler, model, components)
        errors = sorted(_errors_for(method, path, handler, model is not None))
        answered.update(errors)
        op["responses"] = {
            "200": _success(method, path, components),
            **_error_responses(path, errors, codes),
        }
        paths.setdefault(path, {})[method.lower()] = op
    components.update(_error_schemas(answered))
    spec: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": (
                "Every route of the gateway's main listener (mutual TLS with a facility or "
                "administrator client certificate) and of the delivery listener (/download/)."
            ),
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "mutualTLS": {
                    "type": "mutualTLS",
                    "description": "A client certificate issued by the facility client CA",
                }
            },
        },
    }
    if server_url:
        spec["servers"] = [{"url": server_url}]
    return spec


def _operation(
    method: str, path: str, handler: Any, model: Any, components: dict[str, Any]
) -> dict[str, Any]:
    """The operation without its responses: id, tag, summary, path parameters, body."""
    doc = inspect.getdoc(handler) or ""
    op: dict[str, Any] = {
        "operationId": _operation_id(method, path),
        "tags": [_tag(path)],
        "summary": doc.splitlines()[0] if doc else f"{method} {path}",
        "security": [{"mutualTLS": []}],
    }
    params = re.findall(r"{([^}/:]+)", path)
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in params
        ]
    if model is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _schema_ref(model, components)}},
        }
    elif path.startswith("/portal/") and method == "POST":
        op["requestBody"] = {
            "required": True,
            "content": {"multipart/form-data": {"schema": {"type": "object"}}},
        }
    elif path.startswith("/download/") and method == "POST":
        form = {"type": "object", "properties": {"password": {"type": "string"}}}
        op["requestBody"] = {
            "required": True,
            "content": {"application/x-www-form-urlencoded": {"schema": form}},
        }
    return op


def _success(method: str, path: str, components: dict[str, Any]) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "Success"}
    response_model = RESPONSE_MODELS.get((method, path))
    if response_model is not None:
        ok["content"] = {"application/json": {"schema": _schema_ref(response_model, components)}}
    elif path.startswith("/portal") or path in ("/enroll", "/approve"):
        ok["content"] = {"text/html": {"schema": {"type": "string"}}}
    else:
        ok["content"] = {"application/json": {"schema": {"type": "object"}}}
    return ok


def _error_responses(path: str, errors: list[str], codes: dict[str, int]) -> dict[str, Any]:
    """One response per HTTP status, listing the error codes it carries."""
    csc = path.startswith("/csc/")
    error_ref, media, field = (
        ("CscError", "application/json", "error")
        if csc
        else ("Problem", "application/problem+json", "code")
    )
    by_status: dict[int, list[str]] = {}
    for code in errors:
        by_status.setdefault(codes[code], []).append(code)
    return {
        str(status): {
            "description": "Error codes: " + ", ".join(names),
            "content": {
                media: {
                    "schema": {
                        "allOf": [
                            {"$ref": f"#/components/schemas/{error_ref}"},
                            {"properties": {field: {"enum": names}}},
                        ]
                    }
                }
            },
        }
        for status, names in sorted(by_status.items())
    }


def _error_schemas(answered: set[str]) -> dict[str, Any]:
    return {
        "ErrorCode": {"type": "string", "enum": sorted(answered)},
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details (every path outside /csc/)",
            "required": ["type", "title", "status", "detail", "code"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "instance": {"type": "string"},
                "code": {"$ref": "#/components/schemas/ErrorCode"},
                "request_id": {"type": "string"},
            },
        },
        "CscError": {
            "type": "object",
            "description": "CSC API v2 error (paths under /csc/)",
            "required": ["error", "error_description"],
            "properties": {
                "error": {"$ref": "#/components/schemas/ErrorCode"},
                "error_description": {"type": "string"},
                "request_id": {"type": "string"},
            },
        },
    }


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of every route."""
    from importlib.metadata import PackageNotFoundError, version

    from gateway.api import download
    from gateway.api.keys import SETTINGS

    settings = request.app[SETTINGS]
    try:
        v = version("hpki-gateway")
    except PackageNotFoundError:
        v = "0"
    spec = build(
        [*app_routes(request.app), *table_routes([download.routes])],
        title=settings.service.name,
        version=v,
        server_url=settings.server.public_url,
    )
    return web.json_response(spec)
