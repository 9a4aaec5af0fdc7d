"""Request parsing: JSON bodies validated into strict pydantic models with CSC-style errors."""

from __future__ import annotations

import json
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


class CscRequest(BaseModel):
    """Base of CSC request bodies: strict types; unknown fields are ignored (clientData etc.)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True, populate_by_name=True)


class UnreadableBody(InvalidRequest):
    """A body that is not acceptable JSON (400): counted in the refusal summary
    (api/limits.py), not audited one row each."""


#: Deepest nesting of arrays and objects a request body may have (the deepest real body, a
#: signDoc request with authData, has 4 levels).
MAX_JSON_DEPTH = 32


def _depth(value: object) -> int:
    """Nesting depth of a parsed value, iteratively (no recursion on hostile input)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((c, level + 1) for c in children)
    return deepest


def loads(raw: bytes | str, *, what: str = "request body") -> object:
    """``json.loads`` for untrusted input: every failure is InvalidRequest (400).

    Besides malformed JSON: nesting past :data:`MAX_JSON_DEPTH` (the C parser recurses once
    per level and gives up with RecursionError near the interpreter's limit, which would
    otherwise be a 500) and integers past Python's 4,300-digit conversion limit
    (``ValueError``, also a 500 before).
    """
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableBody(f"{what} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise UnreadableBody(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels") from e
    except ValueError as e:
        raise UnreadableBody(f"{what} has a number with too many digits") from e
    if _depth(data) > MAX_JSON_DEPTH:
        raise UnreadableBody(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return data


#: The body, parsed once (api/middleware.py:browser_guard reads it before the handler).
_PARSED: web.RequestKey[object] = web.RequestKey("json_body")


async def read_json(request: web.Request) -> object:
    if _PARSED in request:
        return request[_PARSED]
    raw = await request.read()
    data = loads(raw) if raw.strip() else {}
    request[_PARSED] = data
    return data


async def parse(request: web.Request, model: type[M]) -> M:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "missing":
            raise InvalidRequest(f"Missing (or invalid type) parameter {field}") from e
        raise InvalidRequest(f"Invalid parameter {field}: {err['msg']}") from e
