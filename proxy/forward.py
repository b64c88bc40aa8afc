"""The upstream side (SPEC §6): pooled keep-alive HTTP/1.1 connections, streamed both ways.

    pool = UpstreamPool(config.upstream)                 # one per upstream per process
    response = await pool.send(head, body=request.content, chunked=False)   # UpstreamError
    while (chunk := await response.next_chunk()) is not None: ...   # bounded memory
    response.release()

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

from .config import Upstream
from .errors import Reason

HIGH_WATER: Final = 256 * 1024  # buffered response bytes before the upstream is paused
LOW_WATER: Final = 64 * 1024
BODY_CHUNK: Final = 64 * 1024


class Sink(Protocol):
    """What an upstream connection tells the listener's exchange, outside parser callbacks
    except `response_body`."""

    def response_ready(self, connection: _Connection) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_end(self, connection: _Connection) -> None: ...
    def response_failed(self, connection: _Connection, error: BaseException) -> None: ...
    def upstream_writable(self, writable: bool) -> None: ...


class Traffic:
    """What one exchange moved: body bytes each way, and the upstream's time to headers."""

    __slots__ = ("broken", "bytes_in", "bytes_out", "status", "upstream_seconds")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_seconds: float | None = None
        self.broken: str | None = None  # what failed after the response started
        # The status once a streamed answer's head (or a WebSocket's 101) went out: a client
        # that leaves then cancels the handler before it returns, and is still logged.
        self.status: int | None = None


class UpstreamError(Exception):
    """The upstream failed before its response headers; `reason` says how."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Connection(asyncio.Protocol):
    """One upstream connection; parses one response per request."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.pooled = False  # idle in the pool: any byte now is one no request asked for
        self.error: BaseException | None = None
        # The listener's exchange this connection serves (callbacks, no coroutine); None for
        # `send()`'s futures.
        self.sink: Sink | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        # One parser for the connection's life: llhttp starts over after each whole message.
        self.parser: Any = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.got_head = False
        self.delivered = False  # the sink was told of the head
        self.head: asyncio.Future[None] | None = None  # send()'s, made per request
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.started = False  # any response byte seen
        self.keep_alive = False
        self.head_only = False
        self._waiter: asyncio.Future[None] | None = None
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
        self._can_write.set()

    def _framed(self) -> bool:
        """True when the response's end is known without EOF (a length, chunks, no body)."""
        return (
            self.head_only
            or self.status in (204, 304)
            or any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers)
        )

    def pause_writing(self) -> None:
        self._can_write.clear()
        if self.sink is not None:
            self.sink.upstream_writable(False)

    def resume_writing(self) -> None:
        self._can_write.set()
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
        if self.head is not None and not self.head.done():
            self.head.set_result(None)
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
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.complete:
            return
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def head_timeout(self) -> None:
        if not self.got_head:
            self._fail(TimeoutError("no response head in time"))

    def _fail(self, error: BaseException) -> None:
        if self.error is not None:
            return
        self.error = error
        self.keep_alive = False
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved by send(); silence "never retrieved"
        self._wake()
        if self.transport is not None:
            self.transport.close()
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.response_failed(self, error)

    def body_sent(self, sender: asyncio.Future[None]) -> None:
        """A request body that could not be sent whole leaves the connection unusable."""
        if sender.cancelled() or sender.exception() is not None:
            self.keep_alive = False
            if not self.complete:
                self._fail(ConnectionResetError("the request body was cut short"))

    # used by UpstreamPool / Response
    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise ConnectionResetError("upstream connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        await self._can_write.wait()
        if self.closed:
            raise ConnectionResetError("upstream connection closed")

    async def next_chunk(self) -> bytes | None:
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self.buffered < LOW_WATER and self.transport is not None:
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self._waiter = self.loop.create_future()
            await self._waiter
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """An upstream response whose headers arrived; the body streams from `body()`."""

    def __init__(self, connection: _Connection, pool: UpstreamPool) -> None:
        self._connection = connection
        self._pool = pool
        self.status = connection.status
        self.reason = connection.reason.decode("latin-1")
        self.headers = connection.headers
        self.sender: asyncio.Task[None] | None = None
        self._done = False

    @property
    def complete(self) -> bool:
        """True when the whole body has already arrived."""
        return self._connection.complete and self._connection.error is None

    def buffered_body(self) -> bytes:
        """The whole body, when `complete`."""
        chunks = self._connection.chunks
        body = b"".join(chunks)
        chunks.clear()
        return body

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body; None after the last (a method, not an async generator:
        mypyc compiles no async generators)."""
        return await self._connection.next_chunk()

    def release(self) -> None:
        """Return the connection to the pool when it can carry another request."""
        if self._done:
            return
        self._done = True
        connection = self._connection
        sender = self.sender
        if sender is not None and (
            not sender.done() or sender.cancelled() or sender.exception() is not None
        ):
            # A body still coming, or cut short: the upstream waits for bytes that never come
            # and would read the next request as them. Checked here, not only in body_sent:
            # that done-callback runs a loop turn after the sender fails.
            sender.cancel()
            connection.close()
        elif connection.complete and connection.keep_alive and not connection.closed:
            self._pool.put(connection)
        else:
            connection.close()
        self._pool.release_slot()

    def abort(self) -> None:
        """Close the connection: the exchange did not finish."""
        if self._done:
            return
        self._done = True
        self._connection.keep_alive = False
        self._connection.close()
        if self.sender is not None:
            self.sender.cancel()
        self._pool.release_slot()


class UpstreamPool:
    """Keep-alive connections to one upstream, at most `max_connections` at a time."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        # Kept, not looked up per request: Python 3.11's get_running_loop() costs a getpid().
        self.loop = asyncio.get_running_loop()
        self.idle: collections.deque[_Connection] = collections.deque()
        # A counter, not asyncio.Semaphore: its locked() scans the waiters on every call.
        self.active = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # Connections awaiting a response head -> deadline, in deadline order (every request
        # waits the same timeout). One timer serves them all: a call_later per request cost
        # 2% of the request path.
        self.awaiting: dict[_Connection, float] = {}
        self._watch: asyncio.TimerHandle | None = None
        self.retired = False  # closed: a reload dropped this upstream
        self.ssl: ssl.SSLContext | None = None
        if upstream.scheme == "https":
            self.ssl = ssl.create_default_context()
            if upstream.ca_file:
                self.ssl.load_verify_locations(upstream.ca_file)

    def forget(self, connection: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)

    def put(self, connection: _Connection) -> None:
        if self.retired:  # no request will take it from here: close it, not keep it open
            connection.close()
            return
        connection._reset()
        connection.pooled = True
        self.idle.append(connection)

    async def _connect(self) -> _Connection:
        loop = self.loop
        up = self.upstream
        try:
            async with asyncio.timeout(up.connect_timeout):
                if up.socket_path is not None:
                    _, protocol = await loop.create_unix_connection(
                        lambda: _Connection(self), up.socket_path
                    )
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Connection(self),
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

    async def send(
        self,
        head: bytes,
        body: Any = None,
        chunked: bool = False,
        head_only: bool = False,
        traffic: Traffic | None = None,
    ) -> Response:
        """Send a request head (and stream `body`, an aiohttp StreamReader); await the head."""
        if self.active < self.upstream.max_connections:
            self.active += 1
        else:
            await self._wait_for_slot()
        traffic = traffic or Traffic()
        try:
            for attempt in range(2):
                reused = bool(self.idle)
                connection = self.idle.pop() if reused else await self._connect()
                connection.pooled = False
                connection.head_only = head_only
                connection.head = self.loop.create_future()
                sender = None
                retry = False
                self.awaiting[connection] = self.loop.time() + self.upstream.timeout
                if self._watch is None:
                    self._watch = self.loop.call_at(self.awaiting[connection], self._time_out)
                try:
                    connection.write(head)
                    if body is not None:
                        sender = asyncio.ensure_future(
                            _send_body(connection, body, chunked, traffic)
                        )
                        sender.add_done_callback(connection.body_sent)
                    await connection.head
                except BaseException as error:
                    connection.close()
                    if sender is not None:
                        sender.cancel()
                    if isinstance(error, TimeoutError):
                        raise UpstreamError(
                            Reason.UPSTREAM_TIMEOUT, "no response head in time"
                        ) from None
                    if not isinstance(error, ConnectionError | OSError):
                        raise
                    # A kept-alive connection the upstream closed meanwhile: one fresh try, when
                    # nothing of a body had to be replayed.
                    if not (reused and body is None and not connection.started and attempt == 0):
                        raise UpstreamError(
                            Reason.UPSTREAM_UNAVAILABLE,
                            f"connection failed ({type(error).__name__})",
                        ) from None
                    retry = True
                finally:
                    del self.awaiting[connection]
                if retry:  # after the finally: mypyc compiles no `continue` inside one
                    continue
                response = Response(connection, self)
                response.sender = sender
                return response
        except BaseException:
            self.release_slot()
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def take(self) -> _Connection | None:
        """A slot and a pooled connection at once, or None (a coroutine must wait)."""
        if self.idle and self.active < self.upstream.max_connections:
            self.active += 1
            connection = self.idle.pop()
            connection.pooled = False
            return connection
        return None

    async def acquire(self) -> tuple[_Connection, bool]:
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

    def begin(self, connection: _Connection, sink: Sink, head_only: bool) -> None:
        """`sink` is told of the answer from now on; its head is timed."""
        connection.sink = sink
        connection.head_only = head_only
        deadline = self.loop.time() + self.upstream.timeout
        self.awaiting[connection] = deadline
        if self._watch is None:
            self._watch = self.loop.call_at(deadline, self._time_out)

    def headed(self, connection: _Connection) -> None:
        """The answer's head came (or the exchange ended): no more head timeout."""
        self.awaiting.pop(connection, None)

    def finish(self, connection: _Connection, reusable: bool) -> None:
        """The exchange is over: pool the connection when it can carry another request."""
        self.awaiting.pop(connection, None)
        connection.sink = None
        if reusable and connection.complete and connection.keep_alive and not connection.closed:
            self.put(connection)
        else:
            connection.keep_alive = False
            connection.close()
        self.release_slot()

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
        # The watch stays: heads still awaited on a retired pool (a reload) keep their timeout.
        self.retired = True
        while self.idle:
            self.idle.pop().close()


async def _send_body(connection: _Connection, body: Any, chunked: bool, traffic: Traffic) -> None:
    """Stream a request body upstream, re-chunked when it came chunked."""
    while chunk := await body.readany():
        traffic.bytes_in += len(chunk)
        if chunked:
            connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            connection.write(chunk)
        await connection.drain()
    if chunked:
        connection.write(b"0\r\n\r\n")
