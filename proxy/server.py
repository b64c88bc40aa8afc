"""aiohttp's low-level server for the main listener, with quiet connection handlers.

    server = make_server(proxy, config)     # an aiohttp `web.Server` calling `proxy.handle`

Kept apart from `app.py` because these classes subclass aiohttp's (which use `__slots__`): in
the compiled build (mypyc, see pyproject.toml) this module stays interpreted.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import InvalidURLError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .app import Proxy
from .config import Config
from .errors import Reason
from .headers import request_id
from .request import request_factory

# --- Malformed HTTP: a fixed short answer that never echoes the request ----------------------

_BAD_REQUEST = (
    b'{"error":{"code":400,"name":"BadRequest","message":"The request could not be parsed."}}'
)
_TOO_LARGE = (
    b'{"error":{"code":431,"name":"RequestHeaderFieldsTooLarge",'
    b'"message":"A request header is too large."}}'
)


class _QuietHandler(RequestHandler):
    """aiohttp's connection handler, minus its error page and log lines that echo requests."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        manager: Server = self._manager  # type: ignore[assignment]  # made by Server.__call__
        if isinstance(exc, InvalidURLError):  # a target that is not a path: the contract's answer
            response = manager.answer(Reason.BAD_PATH)
        elif status == 400 or isinstance(exc, LineTooLong):
            too_long = isinstance(exc, LineTooLong)
            status, body = (431, _TOO_LARGE) if too_long else (400, _BAD_REQUEST)
            rid_name, rid = manager.request_id()
            manager.proxy.log.event(
                "warning", "bad_request", status=status, request_id=rid, client=request.remote or ""
            )
            response = web.Response(
                status=status, body=body, content_type="application/json", headers={rid_name: rid}
            )
        else:
            response = manager.answer(Reason.INTERNAL)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        pass  # aiohttp's message quotes the offending bytes, which may hold a token


class Server(web.Server):
    """aiohttp's low-level server with `_QuietHandler` connections."""

    def __init__(self, proxy: Proxy, **kwargs: Any) -> None:
        loop = asyncio.get_running_loop()
        handler = cast(Any, proxy.handle)  # takes the ProxyRequest that request_factory makes
        super().__init__(handler, request_factory=request_factory(loop), loop=loop, **kwargs)
        self.proxy = proxy

    def __call__(self) -> RequestHandler:
        return _QuietHandler(self, loop=self._loop, **self._kwargs)

    def request_id(self) -> tuple[str, str]:
        """The request id header's name and a fresh id, for requests that never parsed."""
        return self.proxy.state.config.forward.request_id_header, request_id(None)

    def answer(self, reason: Reason) -> web.Response:
        """The contract's answer to a request aiohttp could not hand to `Proxy.handle`."""
        rid_name, rid = self.request_id()
        return self.proxy.state.errors.response(reason, rid_name, rid)


def make_server(proxy: Proxy, config: Config) -> Server:
    """The main listener's server: header limits fixed from `max_length` at start."""
    limit = max(8190, config.token.max_length + 1024)
    return Server(
        proxy,
        max_line_size=limit,
        max_field_size=limit,
        access_log=None,
        handler_cancellation=True,
        auto_decompress=False,  # bytes as they came: a decoded body under its old length smuggles
    )
