"""The event loop a gateway worker runs on.

uvloop (libuv, written in Cython) by default: the same asyncio API with a cheaper loop, TCP
transport and TLS layer. Measured on the whole SCAL 2 ceremony (docs/performance.md): about
7 % less worker CPU per ceremony than the standard library's loop, the same code. The standard
loop stays one setting away (``server.event_loop = "asyncio"``) for a platform without uvloop
or to tell a loop problem from a gateway one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

_T = TypeVar("_T")

EventLoopKind = Literal["uvloop", "asyncio"]


def loop_factory(kind: EventLoopKind) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, _T], kind: EventLoopKind) -> _T:
    """``asyncio.run(main)`` on a loop of ``kind``; the log lines still due at the end of
    the loop's last turn are written when it ends (``logs._BatchingHandler``)."""
    try:
        with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
            return runner.run(main)
    finally:
        for handler in logging.getLogger().handlers:
            handler.flush()
