"""aiohttp's low-level server for the main listener, with quiet connection handlers.

    server = make_server(proxy, config)     # an aiohttp `web.Server` calling `proxy.handle`

Kept apart from `app.py` because these classes subclass aiohttp's (which use `__slots__`): in
the compiled build (mypyc, see pyproject.toml) this module stays interpreted.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, InvalidURLError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .app import Proxy
from .config import Config
from .errors import Reason
from .headers import request_id
from .request import request_factory

# --- Malformed HTTP: a fixed short answer that never echoes the request ----------------------

_BAD_REQUEST = (
    b'{"error":{"code":400,"name":"BadRequest","message":"The request could not be parsed."}}'
)
_TIMEOUT = (
    b'{"error":{"code":408,"name":"RequestTimeout",'
    b'"message":"The request did not arrive in time."}}'
)
_TIMEOUT_HEAD = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"Connection: close\r\n%b: %b\r\n%b\r\n"
)
_UNSUPPORTED = (
    b'{"error":{"code":505,"name":"HTTPVersionNotSupported",'
    b'"message":"The HTTP version is not supported."}}'
)
_TOO_LARGE = (
    b'{"error":{"code":431,"name":"RequestHeaderFieldsTooLarge",'
    b'"message":"A request header is too large."}}'
)


_HTTP_1: Final = frozenset({HttpVersion10, HttpVersion11})
_MAX_LENGTH: Final = 1 << 63


def _refusal(message: RawRequestMessage) -> int:
    """The status a parsed head is refused with (0: none): 505 for a version other than 1.0
    and 1.1 (llhttp reads a version-less line as HTTP/0.9, and takes HTTP/2.0), 400 for a bad
    Content-Length."""
    if message.version not in _HTTP_1:
        return 505
    return 400 if _bad_length(message) else 0


def _bad_length(message: RawRequestMessage) -> bool:
    """True when a Content-Length is not a plain decimal below 2^63 (SPEC §6). llhttp refuses
    most such values itself, but reads 2^63 to 2^64-1 as a length (2^64-1 as none at all)
    that the upstream then reads differently: a desync."""
    lengths = message.headers.getall("Content-Length", None)
    if lengths is None:
        return False
    for value in lengths:
        if not (value.isascii() and value.isdigit()):
            return True
        digits = value.lstrip("0")  # int() of thousands of digits (leading zeros) would raise
        if len(digits) > 19 or int(digits or "0") >= _MAX_LENGTH:
            return True
    return False


def _peer(handler: RequestHandler) -> str:
    peer = handler.peername
    return str(peer[0] if isinstance(peer, tuple) else peer or "")


def _in_request_line(exc: BaseException) -> bool:
    """True when aiohttp's C parser raised `exc` on the request line: the innermost frame is
    its llhttp URL callback. (Its pure-Python parser, used only with AIOHTTP_NO_EXTENSIONS,
    raises both from one place: a 431 then, which SPEC §5 allows too.)"""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    # Cython qualifies the name: "aiohttp._http_parser.cb_on_url"
    return tb is not None and tb.tb_frame.f_code.co_name.endswith("cb_on_url")


class _QuietHandler(RequestHandler):
    """aiohttp's connection handler, minus its error page and log lines that echo requests,
    screening each parsed request head for what aiohttp's parser lets through, and timing
    the arrival of each head (SPEC §6 slow clients; aiohttp's keep-alive timer is the idle
    one)."""

    _refused = False  # a head was refused: the rest of the connection's bytes are not read
    # Runs from the connection's start, and from the first byte after an idle keep-alive
    # period, until a whole head has been parsed.
    _head_timer: asyncio.TimerHandle | None = None
    _partial = False  # bytes of a head arrived since the last whole one

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._time_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _time_head(self) -> None:
        manager: Server = self._manager  # type: ignore[assignment]  # made by Server.__call__
        self._head_timer = self._loop.call_later(manager.header_timeout, self._head_late)
        if self._keepalive_handle is not None:  # the head's own timeout governs from now
            self._keepalive_handle.cancel()
            self._keepalive_handle = None

    def _head_late(self) -> None:
        """No whole head within header_timeout: a fixed 408 when part of one came, then close
        (nothing at all came: just close, as HAProxy does for a browser's preconnect)."""
        self._head_timer = None
        manager: Server | None = self._manager  # type: ignore[assignment]
        if self._partial and manager is not None and self.transport is not None:
            rid_name, rid = manager.request_id()
            manager.proxy.log.event(
                "warning", "bad_request", status=408, request_id=rid, client=_peer(self)
            )
            server = manager.proxy.state.config.server_header
            extra = f"Server: {server}\r\n".encode() if server is not None else b""
            head = _TIMEOUT_HEAD % (len(_TIMEOUT), rid_name.encode(), rid.encode(), extra)
            self.transport.write(head)
            self.transport.write(_TIMEOUT)
        self.force_close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        waiter = self._waiter  # pending: the handler waits for the next request (idle)
        idle = waiter is not None and not waiter.done()
        messages = self._messages
        before = len(messages)
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # a whole head arrived
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            self._partial = False
        elif data:
            self._partial = True
            if idle and self._head_timer is None:
                self._time_head()  # part of a head after an idle pause: its deadline runs
        for index in range(before, len(messages)):
            message = messages[index][0]
            status = 0 if isinstance(message, _ErrInfo) else _refusal(message)
            if status:
                # answered like a head the parser refused; nothing after it is a request
                while len(messages) > index:
                    messages.pop()
                error = BadHttpMessage("refused head")
                messages.append((_ErrInfo(status=status, exc=error, message=""), EMPTY_PAYLOAD))
                self._refused = True
                break

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
        elif status in (400, 505) or isinstance(exc, LineTooLong):
            if status == 505:
                body = _UNSUPPORTED
            # an over-long request line is a bad request (the 400); an over-long header, 431
            elif isinstance(exc, LineTooLong) and not _in_request_line(exc):
                status, body = 431, _TOO_LARGE
            else:
                status, body = 400, _BAD_REQUEST
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

    def __init__(self, proxy: Proxy, header_timeout: float = 10.0, **kwargs: Any) -> None:
        loop = asyncio.get_running_loop()
        handler = cast(Any, proxy.handle)  # takes the ProxyRequest that request_factory makes
        factory = request_factory(loop, lambda: proxy.state.config.server_header)
        super().__init__(handler, request_factory=factory, loop=loop, **kwargs)
        self.proxy = proxy
        self.header_timeout = header_timeout

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
    """The main listener's server: header limits fixed from `max_length`, and the client
    timeouts from `limits`, at start."""
    limit = max(8190, config.token.max_length + 1024)
    return Server(
        proxy,
        header_timeout=config.limits.header_timeout,
        keepalive_timeout=config.limits.idle_timeout,
        max_line_size=limit,
        max_field_size=limit,
        access_log=None,
        handler_cancellation=True,
        auto_decompress=False,  # bytes as they came: a decoded body under its old length smuggles
        lingering_time=0,  # a rejected request's body is not drained (SPEC §6): close at once
    )
