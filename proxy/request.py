"""The main listener's request: aiohttp's, plus the parsed message its properties come from.

    server = web.Server(handler, request_factory=request_factory(loop))
    request.head.method, request.head.path, request.head.headers, request.head.raw_headers

aiohttp computes most request properties on first read and caches them (`reify`): about 900
instructions for a first read and half that for each repeat, 7% of a proxied request. The
request path reads the parser's message (`RawRequestMessage`) instead, and the two facts it
needs besides, set here as plain attributes: the peer's address and whether a body comes.
Interpreted even in the compiled build: mypyc cannot compile a subclass of aiohttp's class.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion, RawRequestMessage
from aiohttp.streams import EmptyStreamReader, StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDictProxy


class RequestHead(Protocol):
    """What the request path reads of a `RawRequestMessage`: aiohttp's C parser makes an
    extension type, its Python parser a named tuple (so compiled code must not take it for a
    tuple)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...  # the request target as received
    @property
    def version(self) -> HttpVersion: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]: ...
    @property
    def should_close(self) -> bool: ...
    @property
    def upgrade(self) -> bool: ...  # Connection: upgrade, with an Upgrade header


class Relayed(web.StreamResponse):
    """An upstream's answer streamed back: aiohttp adds `Server` and `Content-Type:
    application/octet-stream` where the upstream sent none; they are taken out again (SPEC
    §6: the answer carries nothing the proxy invents beyond the request id, `Date` and the
    framing)."""

    async def _prepare_headers(self) -> None:
        headers = self.headers
        had_type, had_server = hdrs.CONTENT_TYPE in headers, hdrs.SERVER in headers
        await super()._prepare_headers()
        if not had_type:
            headers.popall(hdrs.CONTENT_TYPE, None)
        if not had_server:
            headers.popall(hdrs.SERVER, None)


class ProxyRequest(web.BaseRequest):
    """aiohttp's request with `head`, the message it was made from (aiohttp's own `message`
    is deprecated), `peer` (what `remote` says, "" for none), `with_body` (`body_exists`)
    and `server_header` (the config's, for the answers the proxy makes itself)."""

    # aiohttp's list of known attributes
    ATTRS = web.BaseRequest.ATTRS | frozenset(["head", "peer", "with_body", "server_header"])
    head: RequestHead
    peer: str
    with_body: bool
    server_header: str | None

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # Every answer aiohttp prepares for this request, once its headers are final: the
        # proxy's own (rejections, parser errors, the token service) say `server_header`,
        # never aiohttp's `Python/3.x aiohttp/3.x`; an upstream's keeps what it sent.
        if type(response) is Relayed:
            return
        if self.server_header is None:
            response.headers.popall(hdrs.SERVER, None)
        else:
            response.headers[hdrs.SERVER] = self.server_header


def request_factory(
    loop: asyncio.AbstractEventLoop,
    server_header: Callable[[], str | None] = lambda: "token-proxy",
) -> Callable[
    [RawRequestMessage, StreamReader, RequestHandler, AbstractStreamWriter, asyncio.Task[None]],
    ProxyRequest,
]:
    """What `web.Server(request_factory=...)` calls to make each request."""

    def make(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> ProxyRequest:
        request = ProxyRequest(message, payload, protocol, writer, task, loop)
        request.head = message
        peername = protocol.peername  # cached per connection; `remote`'s reading of it
        # a tuple of types, not `list | tuple`: interpreted, that union is built on every call
        peer = peername[0] if isinstance(peername, (list, tuple)) else peername or ""
        request.peer = str(peer)
        request.with_body = type(payload) is not EmptyStreamReader
        request.server_header = server_header()  # read per request: a reload may change it
        return request

    return make
