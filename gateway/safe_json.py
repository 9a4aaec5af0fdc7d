"""JSON from untrusted input, bounded: the one loader for request bodies and for the JSON a
client nests inside them (the ``authData`` values of ``credentials/authorize``).

Every failure is :class:`UnreadableBody` (an ``InvalidRequest``, 400): besides malformed JSON,
nesting past :data:`MAX_JSON_DEPTH` (the C parser recurses once per level and gives up with
RecursionError near the interpreter's limit, which would otherwise be a 500) and integers past
Python's 4,300-digit conversion limit (``ValueError``, also a 500 before). Below the HTTP layer
so that the services parsing such values (``auth/jpki.py``) use it too; ``api/schema.py``
re-exports it.
"""

from __future__ import annotations

import json

from gateway.errors import InvalidRequest


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
    """``json.loads`` for untrusted input: every failure is InvalidRequest (400), its text
    starting with ``what``."""
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
