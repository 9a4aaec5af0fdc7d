"""The batch's group writer on a real directory: what it reports per file, whatever fails."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway.local import batch


async def _write(out: Path, items: list[tuple[str, str, bytes]]) -> list[tuple[str, Any]]:
    got: list[tuple[str, Any]] = []
    writer = batch._GroupWriter(out, asyncio.get_running_loop(), got.extend)
    for item in items:
        writer.submit(*item)
    await writer.aclose()  # every group reported when it returns
    return got


@pytest.mark.parametrize("n", [3, 20])  # a file fsync each / one syncfs for the group
def test_every_file_written_and_reported_once(tmp_path: Path, n: int) -> None:
    items = [(f"rx-{i}.csv", f"rx-{i}.xml", f"<doc n='{i}'/>".encode()) for i in range(n)]
    got = asyncio.run(_write(tmp_path, items))
    assert got == [(key, None) for key, _, _ in items]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for _, name, _ in items)
    assert all((tmp_path / name).read_bytes() == data for _, name, data in items)


def test_an_unexpected_failure_is_reported_for_each_file_of_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only OSError: any failure while writing a group reaches the report as that group's
    files failed, and the batch waiting for them goes on (no slot is left taken)."""

    def boom(path: str, data: bytes, *, fsync: bool) -> None:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(batch, "_write_file", boom)
    got = asyncio.run(_write(tmp_path, [("a.csv", "a.xml", b"<a/>"), ("b.csv", "b.xml", b"<b/>")]))
    assert [key for key, _ in got] == ["a.csv", "b.csv"]
    assert all(isinstance(e, RuntimeError) for _, e in got)
    assert list(tmp_path.iterdir()) == []


def test_the_event_loop_hands_over_full_groups_at_once_and_the_rest_after_the_gather_time(
    tmp_path: Path,
) -> None:
    """A full group goes to the writer thread as soon as it is gathered; what is left goes
    after GATHER seconds without the batch ending (a slow card's documents are not held back
    until the end), each group reported in one call."""

    async def run() -> list[list[tuple[str, Any]]]:
        calls: list[list[tuple[str, Any]]] = []
        both = asyncio.Event()

        def written(group: list[tuple[str, Any]]) -> None:
            calls.append(group)
            if sum(len(c) for c in calls) == batch.GROUP + 6:
                both.set()

        writer = batch._GroupWriter(tmp_path, asyncio.get_running_loop(), written)
        for i in range(batch.GROUP + 6):
            writer.submit(f"rx-{i}.csv", f"rx-{i}.xml", b"<doc/>")
        await asyncio.wait_for(both.wait(), 60)  # not closed yet: the timer handed them over
        await writer.aclose()
        return calls

    calls = asyncio.run(run())
    assert [len(c) for c in calls] == [batch.GROUP, 6]
    assert all(error is None for c in calls for _, error in c)
    assert len(list(tmp_path.glob("rx-*.xml"))) == batch.GROUP + 6
