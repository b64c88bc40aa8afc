"""The upstream side (SPEC §6): pooled keep-alive HTTP/1.1 connections, streamed both ways.

    pool = UpstreamPool(config.upstream)        # one per upstream per process
    connection = pool.take() or (await pool.acquire())[0]     # or UpstreamError
    pool.begin(connection, sink, head_only)     # the sink (listener.Exchange) hears the answer
    connection.write(head); ...                 # the body as it comes
    pool.finish(connection, reusable)           # back into the pool, or closed

A small asyncio protocol on httptools (llhttp) parses responses; we only write requests.
Failures before a response are translated once, here: refused, reset or DNS failure →
`UpstreamError(upstream_unavailable)`, a connect or response-header timeout →
`UpstreamError(upstream_timeout)`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from typing import Any, Final, Protocol

import httptools

from .config import Upstream, client_context
from .errors import Reason
from .errors import UpstreamError as UpstreamError  # re-exported: raised here

HIGH_WATER: Final = 256 * 1024  # buffered response bytes before the upstream is paused


class Sink(Protocol):
    """What an upstream connection tells the listener's exchange, outside parser callbacks
    except `response_body`."""

    def response_ready(self, connection: UpstreamConnection) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_end(self, connection: UpstreamConnection) -> None: ...
    def response_failed(self, connection: UpstreamConnection, error: BaseException) -> None: ...
    def upstream_writable(self, writable: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection; parses one response per request."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.pooled = False  # idle in the pool: any byte now is one no request asked for
        self.error: BaseException | None = None
        # The listener's exchange this connection serves (callbacks, no coroutine); None idle.
        self.sink: Sink | None = None
        # One parser for the connection's life: llhttp starts over after each whole message.
        self.parser: Any = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.got_head = False
        self.delivered = False  # the sink was told of the head
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.started = False  # any response byte seen
        self.keep_alive = False
        self.head_only = False
        self._interim = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.complete or self.pooled:
            # After the answer's end or while idle: bytes no request of ours asked for, which
            # the next request would take for its answer (SPEC §6).
            self._discard()
            return
        self.started = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
            if self.complete:  # what followed a whole answer: that answer stands
                self._discard()
            else:
                self._fail(ConnectionError(f"invalid response ({type(error).__name__})"))
                return
        if self.sink is not None:
            self._tell()

    def _tell(self) -> None:
        """Tell the sink what the bytes just parsed brought: called outside the parser's
        callbacks, since the sink may put this connection back in the pool."""
        sink = self.sink
        if sink is None or self.error is not None:
            return
        if not self.delivered:
            if not self.got_head:
                return
            self.delivered = True
            sink.response_ready(self)
            if self.sink is None:  # a whole answer, taken at once
                return
        if self.complete:
            self.sink = None
            sink.response_end(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if not self.complete:
            if self.got_head and exc is None and not self._framed():
                # A body delimited by the connection's close ends with a clean close; a reset
                # cuts it, and the client must see the cut, not a shorter complete body.
                self.on_message_complete()
                self._tell()
            else:
                self._fail(exc or ConnectionResetError("upstream closed the connection"))
        # The parser holds this connection as its callbacks' target: a cycle only a full
        # collection would free. No byte is parsed after the connection is lost.
        self.parser = None

    def _framed(self) -> bool:
        """True when the response's end is known without EOF (a length, chunks, no body)."""
        return (
            self.head_only
            or self.status in (204, 304)
            or any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers)
        )

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_writable(False)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_writable(True)

    def _discard(self) -> None:
        """Never reuse this connection: close it and take it out of the pool now (a request
        could take it from the pool before connection_lost runs)."""
        self.keep_alive = False
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        # llhttp parses on after a whole answer: a second one in the same read, or bytes
        # beyond the framing. The callbacks below ignore it; the connection is never reused.
        if self.complete or self.pooled:
            self._discard()

    def on_status(self, status: bytes) -> None:
        if not self.complete:
            self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.got_head:  # after the head come trailers, which are not forwarded
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:
            return  # a second answer's head: not ours (see on_message_begin)
        status = self.parser.get_status_code()
        if status == 101:
            # The pool never asks for an upgrade (WebSockets take their own path): no answer to
            # a plain request (RFC 9110 §15.2.2), and what follows it is not HTTP.
            self._fail(ConnectionError("a 101 no request asked for"))
            return
        if 100 <= status < 200:
            self._interim = True  # 100 Continue and friends: wait for the final response
            self.headers = []
            self.reason = b""
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.got_head = True
        if self.head_only:
            self.keep_alive = False  # the parser would wait for a body a HEAD never gets
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return  # a body after a HEAD response, or a second answer's: not ours to pass on
        if self.delivered and self.sink is not None:
            self.sink.response_body(body)
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.complete:
            return
        self.complete = True

    def head_timeout(self) -> None:
        if not self.got_head:
            self._fail(TimeoutError("no response head in time"))

    def _fail(self, error: BaseException) -> None:
        if self.error is not None:
            return
        self.error = error
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.response_failed(self, error)

    # used by the pool and the listener's exchange
    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise ConnectionResetError("upstream connection closed")
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections to one upstream, at most `max_connections` at a time."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        # Kept, not looked up per request: Python 3.11's get_running_loop() costs a getpid().
        self.loop = asyncio.get_running_loop()
        self.idle: collections.deque[UpstreamConnection] = collections.deque()
        # A counter, not asyncio.Semaphore: its locked() scans the waiters on every call.
        self.active = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # Connections awaiting a response head -> deadline, in deadline order (every request
        # waits the same timeout). One timer serves them all: a call_later per request cost
        # 2% of the request path.
        self.awaiting: dict[UpstreamConnection, float] = {}
        self._watch: asyncio.TimerHandle | None = None
        self.retired = False  # closed: a reload dropped this upstream
        self.ssl: ssl.SSLContext | None = None
        if upstream.scheme == "https":
            self.ssl = client_context(upstream.ca_file)

    def forget(self, connection: UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)

    def put(self, connection: UpstreamConnection) -> None:
        if self.retired:  # no request will take it from here: close it, not keep it open
            connection.close()
            return
        connection._reset()
        connection.pooled = True
        if connection.transport is not None:
            # Paused for a slow client (or its own buffer): idle, it must read again, or
            # the stray bytes and the close it watches for would go unseen.
            connection.transport.resume_reading()
        self.idle.append(connection)

    async def _connect(self) -> UpstreamConnection:
        loop = self.loop
        up = self.upstream
        try:
            async with asyncio.timeout(up.connect_timeout):
                if up.socket_path is not None:
                    _, protocol = await loop.create_unix_connection(
                        lambda: UpstreamConnection(self), up.socket_path
                    )
                else:
                    _, protocol = await loop.create_connection(
                        lambda: UpstreamConnection(self),
                        up.host,
                        up.port,
                        ssl=self.ssl,
                        server_hostname=up.host if self.ssl else None,
                    )
        except TimeoutError:
            raise UpstreamError(Reason.UPSTREAM_TIMEOUT, "connect timed out") from None
        except (OSError, ssl.SSLError) as error:
            raise UpstreamError(
                Reason.UPSTREAM_UNAVAILABLE, f"connect failed ({type(error).__name__})"
            ) from None
        return protocol

    def take(self) -> UpstreamConnection | None:
        """A slot and a pooled connection at once, or None (a coroutine must wait)."""
        if self.idle and self.active < self.upstream.max_connections:
            self.active += 1
            connection = self.idle.pop()
            connection.pooled = False
            return connection
        return None

    async def acquire(self) -> tuple[UpstreamConnection, bool]:
        """A slot and a connection, waiting or connecting if need be; (connection, reused)."""
        if self.active < self.upstream.max_connections:
            self.active += 1
        else:
            await self._wait_for_slot()
        try:
            if self.idle:
                connection = self.idle.pop()
                connection.pooled = False
                return connection, True
            return await self._connect(), False
        except BaseException:
            self.release_slot()
            raise

    def begin(self, connection: UpstreamConnection, sink: Sink, head_only: bool) -> None:
        """`sink` is told of the answer from now on; its head is timed."""
        connection.sink = sink
        connection.head_only = head_only
        deadline = self.loop.time() + self.upstream.timeout
        self.awaiting[connection] = deadline
        if self._watch is None:
            self._watch = self.loop.call_at(deadline, self._time_out)

    def headed(self, connection: UpstreamConnection) -> None:
        """The answer's head came (or the exchange ended): no more head timeout."""
        self.awaiting.pop(connection, None)

    def finish(self, connection: UpstreamConnection, reusable: bool) -> None:
        """The exchange is over: pool the connection when it can carry another request."""
        self.awaiting.pop(connection, None)
        connection.sink = None
        if reusable and connection.complete and connection.keep_alive and not connection.closed:
            self.put(connection)
        else:
            connection.keep_alive = False
            connection.close()
        self.release_slot()
        if self.retired and not self.awaiting:
            self._unwatch()

    def _time_out(self) -> None:
        """Fail the heads past their deadline; wake again at the next deadline."""
        self._watch = None
        now = self.loop.time()
        for connection, deadline in list(self.awaiting.items()):
            if connection not in self.awaiting:
                continue  # ended by an earlier one's failure
            if deadline > now:
                self._watch = self.loop.call_at(deadline, self._time_out)
                return
            connection.head_timeout()

    async def _wait_for_slot(self) -> None:
        """All max_connections are busy: wait for one, within the upstream's timeout."""
        waiter = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(self.upstream.timeout):
                await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self.release_slot()  # handed a slot while giving up: pass it on
            else:
                waiter.cancel()
            if isinstance(error, TimeoutError):
                raise UpstreamError(Reason.UPSTREAM_TIMEOUT, "no free connection") from None
            raise

    def release_slot(self) -> None:
        """Hand a connection slot to the next waiter, or free it."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1

    def close(self) -> None:
        # The watch stays while heads are awaited on a retired pool (a reload): they keep
        # their timeout. Then it goes (finish), or its timer would keep the pool alive.
        self.retired = True
        while self.idle:
            self.idle.pop().close()
        if not self.awaiting:
            self._unwatch()

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
