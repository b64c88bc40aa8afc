"""The main listener (SPEC §5-§7): an asyncio Protocol on httptools (llhttp), no web framework.

    listener = Listener(proxy, config)              # limits and timeouts fixed at start
    server = await listener.serve(sock, tls)        # an asyncio.Server
    await listener.drain(timeout)                   # SIGTERM: in-flight finish, idle close

One `Connection` per client connection; llhttp's callbacks fill one `exchange.Exchange` per
request, and after each read the first request in line starts. Pipelined requests wait their
turn (reading paused); the timeouts, the parser's refusals and the drain on SIGTERM live here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from typing import Any

import httptools
from multidict import CIMultiDict

from .answers import BAD_PATH, HOLD_BODY, HOLD_QUEUE, HOLD_TUNNEL, Reply, bad_length
from .app import Proxy
from .config import Config
from .deadlines import Deadlines
from .errors import BAD_REQUEST_BODY
from .exchange import Exchange
from .websocket import Tunnel, is_websocket


class Connection(asyncio.Protocol):
    """One client connection: parses requests, answers them in order."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.proxy = listener.proxy
        self.loop = listener.loop
        self.transport: asyncio.Transport | None = None
        self.parser: Any = httptools.HttpRequestParser(self)
        self.peer = ""
        self.queue: collections.deque[Exchange] = collections.deque()  # heads parsed, in order
        self.parsing: Exchange | None = None  # the request llhttp is in
        self.deadlines = Deadlines(
            self.loop, listener.header_timeout, listener.idle_timeout, self.head_late, self.close
        )
        self.holds = 0
        self.write_paused = False  # the client's transport buffer is full
        self.closing = False  # close once the answers in line are out (drain, Connection: close)
        self.closed = False
        self.reading = True  # False: no byte more is parsed
        self.upgrade = False  # the current head asks for an upgrade (llhttp's reading)
        self.tunnel: Tunnel | None = None
        self.waiter: asyncio.Future[None] | None = None  # the token service waits for its form
        self.upgrading = False  # a WebSocket handshake's head came: frames wait for the tunnel
        self.pending_frames = b""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, (list, tuple)) else str(peer or "")
        self.listener.connections.add(self)
        self.deadlines.head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reading = False
        self.listener.connections.discard(self)
        self.deadlines.stop()
        if self.tunnel is not None:
            self.tunnel.client_lost()
        while self.queue:
            exchange = self.queue.popleft()
            if exchange.begun and not exchange.answered:
                exchange.abandon()
        self._wake()
        # The parser holds this connection as its callbacks' target, and a half-parsed
        # exchange holds it as its client: cycles a young collection does not free (the
        # thresholds in runtime.py make full ones rare). No byte is parsed after this.
        self.parser = self.parsing = None
        self.listener.gone()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.upgrading:
            self.pending_frames += data
            self.hold(HOLD_TUNNEL)
            return
        if not self.reading:
            return
        self.deadlines.idle_by = 0.0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded(data[upgrade.args[0] :])
        except httptools.HttpParserError as error:
            self.malformed(error)
        self.advance()

    def pause_writing(self) -> None:
        self._writable(False)

    def resume_writing(self) -> None:
        self._writable(True)

    def _writable(self, writable: bool) -> None:
        """The client's write buffer filled or drained: what feeds it waits or goes on."""
        self.write_paused = not writable
        exchange = self.queue[0] if self.queue else None
        upstream = exchange.upstream if exchange is not None else None
        if upstream is not None and upstream.transport is not None:
            if writable:
                upstream.transport.resume_reading()
            else:
                upstream.transport.pause_reading()
        if self.tunnel is not None:
            self.tunnel.client_writable(writable)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.parsing = Exchange(self)
        if not self.deadlines.head_by and not self.queue:
            self.deadlines.head()

    def on_url(self, url: bytes) -> None:
        exchange = self.parsing
        if exchange is not None:
            exchange.url += url
            if len(exchange.url) > self.listener.line_limit:
                exchange.refusal = 400
                raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.parsing
        if exchange is not None and not exchange.headed:  # after the head: trailers, dropped
            if len(name) + len(value) > self.listener.line_limit:
                exchange.refusal = 431
                raise _Refused
            exchange.raw.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.parsing
        if exchange is None:
            return
        self.deadlines.head_by = 0.0
        parser = self.parser
        exchange.method = parser.get_method().decode("latin-1")
        version = parser.get_http_version()
        exchange.keep_alive = parser.should_keep_alive()
        exchange.upgrade = parser.should_upgrade()
        exchange.headed = True
        exchange.head_only = exchange.method == "HEAD"
        # one C call for the multidict; its lookups below are C too
        headers: CIMultiDict[str] = CIMultiDict(
            [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in exchange.raw]
        )
        exchange.headers = headers
        lengths = headers.getall("Content-Length", None)
        exchange.chunked = "Transfer-Encoding" in headers
        if "Expect" in headers:
            exchange.expect = headers["Expect"].lower() == "100-continue"
        if version not in ("1.1", "1.0"):
            exchange.refusal = 505
        elif lengths and bad_length(lengths):
            exchange.refusal = 400
        exchange.old = version == "1.0"
        if exchange.chunked:
            exchange.has_body = True
        elif lengths:
            exchange.has_body = lengths[0].lstrip("0") != ""
        self.queue.append(exchange)
        if exchange.refusal:
            raise _Refused
        if len(self.queue) > 1:
            self.hold(HOLD_QUEUE)

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is not None and not exchange.done:
            exchange.body_in(body)
            self._wake()

    def on_message_complete(self) -> None:
        exchange = self.parsing
        self.parsing = None
        if exchange is None:
            return
        exchange.finished_reading = True
        if not exchange.done:
            exchange.body_end()
        self._wake()
        if not exchange.keep_alive:
            self.reading = False  # nothing after a last request is read (SPEC §6)

    # the connection's course

    def advance(self) -> None:
        """Start the first request in line, when it has not started yet."""
        while self.queue and not self.closed:
            exchange = self.queue[0]
            if exchange.begun:
                return
            exchange.begun = True
            exchange.start()
            if self.queue and self.queue[0] is exchange:
                return  # still going: the rest waits
        if not self.queue and not self.closed:
            if self.closing or (not self.reading and self.parsing is None):
                self.close()
            elif self.parsing is None and not self.deadlines.idle_by:
                self.deadlines.idle()

    def answered(self, exchange: Reply) -> None:
        """`exchange`'s answer is whole: on to the next, or close."""
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        if not exchange.keep_alive:
            self.reading = False
            self.queue.clear()
            self.close()
            return
        self.release(HOLD_QUEUE)
        if self.parsing is not None and not self.deadlines.head_by and not self.queue:
            self.deadlines.head()  # part of the next head came while this one was answered
        self.advance()

    def malformed(self, error: Exception | None = None) -> None:
        """llhttp refused the bytes: the fixed 400 (431, 505) in its turn, then close. A
        request whose body broke mid-way gets the 400 when its answer has not started, else
        the cut; its upstream connection is closed, never pooled."""
        self.reading = False
        exchange = self.parsing
        self.parsing = None
        if exchange is None or not exchange.headed:
            exchange = exchange or Exchange(self)
            # a target that is not a path: the contract's answer, not the parser's
            bad_path = isinstance(error, httptools.HttpParserInvalidURLError)
            exchange.refusal = exchange.refusal or (BAD_PATH if bad_path else 400)
            self.queue.append(exchange)
            return
        if exchange.refusal or exchange.answered:
            return
        if not exchange.begun:
            exchange.refusal = 400
            return
        exchange.keep_alive = False
        exchange.let_go()
        if exchange.done:
            return
        if exchange.status is None:
            exchange.outcome, exchange.reason = "bad_request", ""
            rid_name = self.proxy.state.config.forward.request_id_header
            exchange.own(400, [(rid_name, exchange.rid)], BAD_REQUEST_BODY)
        else:
            exchange.broken = "the request body was malformed"
            self.abort()
            exchange.finish()

    def upgraded(self, rest: bytes) -> None:
        """llhttp stops after an upgrade's head. A WebSocket handshake's following bytes are
        frames for the tunnel; any other upgrade is a plain request (h2c is not spoken here),
        and a fresh parser reads on."""
        for _ in range(len(rest) + 1):  # each round consumes bytes: bounded
            exchange = self.queue[-1] if self.queue else None
            if exchange is not None and is_websocket(exchange.method, exchange.headers):
                self.upgrading = True
                self.pending_frames = rest
                self.hold(HOLD_TUNNEL)
                return
            self.parser = httptools.HttpRequestParser(self)
            if not rest:
                return
            try:
                self.parser.feed_data(rest)
                return
            except httptools.HttpParserUpgrade as upgrade:
                rest = rest[upgrade.args[0] :]
            except httptools.HttpParserError as error:
                self.malformed(error)
                return

    def head_late(self) -> None:
        """No whole head within header_timeout: a fixed 408 when part of one came, then close
        (nothing at all came: just close, as HAProxy does for a browser's preconnect)."""
        if self.closed or self.queue:
            return
        self.reading = False
        if self.parsing is not None:
            exchange = self.parsing
            self.parsing = None
            self.queue.append(exchange)
            exchange.refusal = 408
            self.advance()
        else:
            self.close()

    def hold(self, reason: int) -> None:
        if not self.holds and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.holds |= reason

    def release(self, reason: int) -> None:
        if not self.holds & reason:
            return
        self.holds &= ~reason
        if not self.holds and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def stop_reading(self) -> None:
        """No byte more is read: a rejected body stays unread (SPEC §6)."""
        self.reading = False
        self.parsing = None
        self.hold(HOLD_BODY)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.waiter = None

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        """Cut the connection: a half-sent answer must not look whole."""
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def drain(self) -> None:
        """SIGTERM: close when idle, else after the answers in line."""
        self.closing = True
        if not self.queue and self.tunnel is None:
            self.close()


class _Refused(Exception):
    """Raised in a parser callback to stop parsing: the head is refused."""


class Listener:
    """The main listener's connections, their limits and timeouts (fixed at start)."""

    def __init__(self, proxy: Proxy, config: Config) -> None:
        self.proxy = proxy
        self.loop = asyncio.get_running_loop()
        self.line_limit = max(8190, config.token.max_length + 1024)
        self.header_timeout = config.limits.header_timeout
        self.idle_timeout = config.limits.idle_timeout
        self.connections: set[Connection] = set()
        self.server: asyncio.Server | None = None
        self._empty: asyncio.Future[None] | None = None

    async def serve(self, sock: Any, tls: ssl.SSLContext | None = None) -> asyncio.Server:
        self.server = await self.loop.create_server(
            lambda: Connection(self), sock=sock, ssl=tls, backlog=1024
        )
        return self.server

    def gone(self) -> None:
        if not self.connections and self._empty is not None and not self._empty.done():
            self._empty.set_result(None)

    async def drain(self, grace: float) -> None:
        """Stop accepting; close idle connections; let the rest finish within `grace`."""
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            connection.drain()
        if self.connections:
            self._empty = self.loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._empty
        for connection in list(self.connections):
            connection.abort()
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await self.server.wait_closed()
