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

from aiohttp import web
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


class ProxyRequest(web.BaseRequest):
    """aiohttp's request with `head`, the message it was made from (aiohttp's own `message`
    is deprecated), `peer` (what `remote` says, "" for none) and `with_body` (`body_exists`)."""

    # aiohttp's list of known attributes
    ATTRS = web.BaseRequest.ATTRS | frozenset(["head", "peer", "with_body"])
    head: RequestHead
    peer: str
    with_body: bool


def request_factory(
    loop: asyncio.AbstractEventLoop,
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
        return request

    return make
