"""The hostile inputs of test_hostile_inputs_http.py, at the one place each is decided, where
no route reaches that place with such an input any more."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from gateway.api import errors


@asynccontextmanager
async def _serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a loopback port of its own (a real listener); its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


async def test_an_error_text_utf8_cannot_carry_still_renders() -> None:
    """A lone surrogate (what aiohttp makes of a header byte that is not UTF-8) in an error's
    text: the body falls back to JSON escapes instead of failing to render (a plain-text 500)."""

    async def refuse(request: web.Request) -> web.Response:
        return errors.render(
            request, status=400, code="invalid_request", description="got text/\udcff"
        )

    app = web.Application()
    app.router.add_post("/csc/v2/x", refuse)
    app.router.add_post("/x", refuse)
    async with _serving(app) as url, aiohttp.ClientSession() as http:
        for path, field in (("/csc/v2/x", "error_description"), ("/x", "detail")):
            async with http.post(url + path) as r:
                raw = await r.read()
                assert r.status == 400, raw
                assert r.content_type in ("application/json", "application/problem+json")
                assert json.loads(raw)[field] == "got text/\udcff"
                assert b"\\udcff" in raw


async def test_japanese_error_text_stays_readable() -> None:
    async def refuse(request: web.Request) -> web.Response:
        return errors.render(request, status=400, code="invalid_request", description="月が不正")

    app = web.Application()
    app.router.add_post("/x", refuse)
    async with _serving(app) as url, aiohttp.ClientSession() as http, http.post(url + "/x") as r:
        raw = await r.read()
        assert "月が不正".encode() in raw and r.charset == "utf-8"
