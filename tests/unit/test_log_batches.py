"""The log handler of ``setup_logging``: the access lines of one event-loop turn are
formatted and written together when the turn ends (one write), in order, each with its own
request id; any other line, and lines logged where no loop runs, are written at once."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway.logs import JsonFormatter, _BatchingHandler, _RequestIdFilter, request_id_var


class _Stream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, _Stream]]:
    stream = _Stream()
    handler = _BatchingHandler(stream)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("gateway.access")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, stream
    logger.handlers[:] = []
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def _lines(stream: _Stream) -> list[dict[str, object]]:
    return [json.loads(x) for x in stream.getvalue().splitlines()]


def test_one_turns_lines_are_written_together_when_it_ends(
    logged: tuple[logging.Logger, _Stream],
) -> None:
    log, stream = logged

    def request(rid: str) -> None:  # three requests answered in one turn of the loop
        token = request_id_var.set(rid)
        try:
            log.info("answered %s", rid)
        finally:
            request_id_var.reset(token)

    async def main() -> tuple[str, list[dict[str, object]]]:
        for rid in "abc":
            request(rid)
        before = stream.getvalue()  # the turn that logged them has not ended yet
        await asyncio.sleep(0)
        return before, _lines(stream)

    before, lines = asyncio.run(main())
    assert before == ""
    assert [(x["msg"], x["request_id"]) for x in lines] == [
        ("answered a", "a"),
        ("answered b", "b"),
        ("answered c", "c"),
    ]
    assert stream.writes == 1


def test_a_warning_or_another_loggers_line_is_written_at_once_after_the_lines_before_it(
    logged: tuple[logging.Logger, _Stream],
) -> None:
    log, stream = logged
    other = logging.getLogger("gateway.server")

    async def main() -> list[list[str]]:
        seen = []
        log.info("first")
        log.warning("second")
        seen.append([str(x["msg"]) for x in _lines(stream)])
        log.info("third")
        assert log.handlers[0].filter(other.makeRecord("gateway.server", 20, "", 0, "x", (), None))
        log.handlers[0].handle(other.makeRecord("gateway.server", 20, "", 0, "serving", (), None))
        seen.append([str(x["msg"]) for x in _lines(stream)])
        return seen

    assert asyncio.run(main()) == [["first", "second"], ["first", "second", "third", "serving"]]


def test_without_a_loop_a_line_is_written_at_once(logged: tuple[logging.Logger, _Stream]) -> None:
    log, stream = logged
    log.info("from a command")
    assert [x["msg"] for x in _lines(stream)] == ["from a command"]


def test_a_line_left_by_a_loop_that_ended_goes_out_with_the_next_loops(
    logged: tuple[logging.Logger, _Stream],
) -> None:
    """A start-up step's loop (the migration's) may end before the turn that logged its last
    line: that line waits for the next one, which must still be written at the end of its
    own turn (not held back because a write is 'due' on the ended loop)."""
    log, stream = logged

    loop = asyncio.new_event_loop()
    loop.call_soon(log.info, "last line of a loop")
    loop.call_soon(loop.stop)  # its last turn: the write it scheduled never runs
    loop.run_forever()
    loop.close()
    assert stream.getvalue() == ""

    async def serve() -> list[str]:
        log.info("serving")
        await asyncio.sleep(0)
        return [str(x["msg"]) for x in _lines(stream)]

    assert asyncio.run(serve()) == ["last line of a loop", "serving"]
