"""Request parsing: JSON bodies validated into strict pydantic models with CSC-style errors.

The bounded loader itself (``loads``, ``MAX_JSON_DEPTH``, ``UnreadableBody``) is
``gateway/safe_json.py``, re-exported here: the services parse the JSON nested in a body with
it too.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import InvalidRequest
from gateway.safe_json import MAX_JSON_DEPTH as MAX_JSON_DEPTH
from gateway.safe_json import UnreadableBody as UnreadableBody
from gateway.safe_json import loads as loads

M = TypeVar("M", bound=BaseModel)


def _one_printable_line(text: str) -> str:
    if not text.isprintable():
        raise ValueError(
            "must be one line of printable characters (no control or format characters)"
        )
    return text


#: A name a client gives a registration (an authenticator, a card link), shown to officers by
#: the CLI: a newline forged listing lines, a control character rewrote their terminal.
Label = Annotated[str, Field(max_length=200), AfterValidator(_one_printable_line)]


class CscRequest(BaseModel):
    """Base of CSC request bodies: strict types; unknown fields are ignored (clientData etc.)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True, populate_by_name=True)


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
