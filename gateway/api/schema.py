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


async def read_json(request: web.Request) -> object:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from e


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
