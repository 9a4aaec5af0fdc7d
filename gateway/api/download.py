"""The delivery listener: one-time download of a facility's PKCS#12, and nothing else.

A separate aiohttp application on its own port, server TLS only (a facility has no client
certificate yet: this is how it gets one). Two routes: ``GET /download/{token}`` shows a small
form, ``POST /download/{token}`` with the download password returns the file once. Wrong
passwords are counted in the store and lock the link (gateway/lifecycle/delivery.py). No other
route of the gateway is reachable here, and nothing here reaches the mTLS routes.
"""

from __future__ import annotations

import html
import re

from aiohttp import web

from gateway.api.keys import CERTIFICATES
from gateway.errors import InvalidRequest, NotFound

routes = web.RouteTableDef()
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{20,100}$")
MAX_FORM_BYTES = 4096

_FORM = """<!doctype html>
<html lang="ja"><head><meta charset="utf-8">
<title>{service} クライアント証明書のダウンロード</title>
<meta name="referrer" content="no-referrer"></head>
<body><h1>クライアント証明書のダウンロード</h1>
<p>メールでお知らせしたダウンロード用パスワードを入力してください。
（パスワード通知書のパスワードではありません）</p>
<form method="post"><label>ダウンロード用パスワード
<input type="password" name="password" autocomplete="off" required></label>
<button type="submit">ダウンロード</button></form></body></html>
"""


def _token(request: web.Request) -> str:
    token = request.match_info["token"]
    if not _TOKEN.match(token):
        raise NotFound("this download link is not valid (a resend replaces older links)")
    return token


@routes.get("/download/{token}")
async def form(request: web.Request) -> web.Response:
    _token(request)
    service = html.escape(request.app[CERTIFICATES].settings.service.name)
    return web.Response(
        text=_FORM.format(service=service),
        content_type="text/html",
        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"},
    )


@routes.post("/download/{token}")
async def download(request: web.Request) -> web.Response:
    token = _token(request)
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise InvalidRequest("form too large")
    try:
        data = await request.post()
    except (ValueError, LookupError) as e:
        # Anyone can send this listener anything: a multipart type without its boundary, a
        # multipart body cut short (ValueError), bytes that are not in the form's charset
        # (UnicodeDecodeError) or a charset Python does not know (LookupError).
        raise InvalidRequest(
            "the form cannot be read: post it as an HTML form does "
            "(application/x-www-form-urlencoded or multipart/form-data, UTF-8)"
        ) from e
    password = data.get("password")
    if not isinstance(password, str) or not password:
        raise InvalidRequest("give the download password in the form field 'password'")
    name, p12 = await request.app[CERTIFICATES].download(token, password, remote=request.remote)
    return web.Response(
        body=p12,
        content_type="application/x-pkcs12",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        },
    )
