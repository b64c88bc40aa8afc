"""The main listener (SPEC §5-§7): an asyncio Protocol on httptools (llhttp), no web framework.

    listener = Listener(proxy, config)              # limits and timeouts fixed at start
    server = await listener.serve(sock, tls)        # an asyncio.Server
    await listener.drain(timeout)                   # SIGTERM: in-flight finish, idle close

One `Connection` per client connection; llhttp's callbacks fill one `Exchange` per request.
After each read the first request in line starts: the decision runs synchronously when it can
(`decide_now`), the upstream head goes straight into a pooled connection's transport, and the
answer's bytes are relayed as they come (`forward.Sink`), with pause_reading/resume_reading for
back-pressure both ways. A coroutine only where something must wait: a JWKS refetch, a new
upstream connection or a free slot, the token service, a WebSocket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import traceback
from http import HTTPStatus
from time import perf_counter  # a module attribute lookup less, compiled
from typing import Any, Final

import httptools
from multidict import CIMultiDict

from .app import CLIENT_CLOSED, CLIENT_CLOSED_OUTCOME, SERVICE_OUTCOME, SERVICE_PATHS, Proxy
from .authorize import allow_headers, asked_request
from .config import Config
from .decision import Decision, Pending, decide_now
from .errors import CONTRACT, Reason, Rejection
from .forward import UpstreamConnection, UpstreamError, UpstreamPool
from .headers import Forwarding, http_date, request_id, response_head, streamed_head
from .model import RequestView
from .websocket import Tunnel, is_websocket

# --- The proxy's own fixed answers: short, never echoing the request -------------------------

_BAD_REQUEST: Final = (
    b'{"error":{"code":400,"name":"BadRequest","message":"The request could not be parsed."}}'
)
_TIMEOUT: Final = (
    b'{"error":{"code":408,"name":"RequestTimeout",'
    b'"message":"The request did not arrive in time."}}'
)
_UNSUPPORTED: Final = (
    b'{"error":{"code":505,"name":"HTTPVersionNotSupported",'
    b'"message":"The HTTP version is not supported."}}'
)
_TOO_LARGE: Final = (
    b'{"error":{"code":431,"name":"RequestHeaderFieldsTooLarge",'
    b'"message":"A request header is too large."}}'
)
_FIXED: Final = {400: _BAD_REQUEST, 408: _TIMEOUT, 431: _TOO_LARGE, 505: _UNSUPPORTED}
_BAD_PATH: Final = 1  # a refusal: the contract's bad_path answer
_MAX_LENGTH: Final = 1 << 63
_BODY_BUFFER: Final = 64 * 1024  # request body held before its upstream is ready
_MAX_FORM: Final = 64 * 1024  # the token service's form
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"

# Why the client's transport is paused (a bit each); it reads again when none is left.
_HOLD_BODY: Final = 1  # a request body waits for its upstream connection
_HOLD_UPSTREAM: Final = 2  # the upstream's write buffer is full
_HOLD_QUEUE: Final = 4  # a pipelined request waits for the one before it
_HOLD_TUNNEL: Final = 8  # a WebSocket's upstream is not ready or not writable


def own_head(
    status: int,
    headers: list[tuple[str, str]],
    length: int,
    keep_alive: bool,
    server: str | None,
    raw: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """The head of an answer the proxy makes itself: JSON (when it has a body), its length,
    Date, Server; `raw` headers go out as they are (identity values may be UTF-8)."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    if length and not any(name.lower() == "content-type" for name, _ in headers):
        lines.append("Content-Type: application/json")
    lines.append(f"Content-Length: {length}")
    lines.append("Date: " + http_date().decode())
    if server is not None:
        lines.append("Server: " + server)
    for name, value in headers:
        lines.append(f"{name}: {value}")
    if not keep_alive:
        lines.append("Connection: close")
    head = "\r\n".join(lines).encode("latin-1")
    if raw:
        head += b"".join(b"\r\n" + name + b": " + value for name, value in raw)
    return head + b"\r\n\r\n"


def bad_length(values: list[str]) -> bool:
    """True when a Content-Length is not a plain decimal below 2^63 (SPEC §6). llhttp reads
    2^63 to 2^64-1 as a length that the upstream then reads differently: a desync."""
    for value in values:
        if not (value.isascii() and value.isdigit()):
            return True
        digits = value.lstrip("0")  # int() of thousands of digits (leading zeros) would raise
        if len(digits) > 19 or int(digits or "0") >= _MAX_LENGTH:
            return True
    return False


class Exchange:
    """One request: its parsed head, its body on the way, and the answer's progress. It is
    also the upstream connection's `Sink`."""

    __slots__ = (
        "answered",
        "app",
        "asked",
        "authorizing",
        "begun",
        "body",
        "body_done",
        "broken",
        "buffered",
        "bytes_in",
        "bytes_out",
        "chunked",
        "client",
        "decided",
        "done",
        "expect",
        "finished_reading",
        "has_body",
        "head_bytes",
        "head_only",
        "headed",
        "headers",
        "keep_alive",
        "method",
        "old",
        "outcome",
        "pool",
        "raw",
        "reason",
        "refusal",
        "reply_chunked",
        "retried",
        "reused",
        "rid",
        "started",
        "status",
        "task",
        "upgrade",
        "upstream",
        "upstream_seconds",
        "upstream_started",
        "url",
        "writing",
    )

    def __init__(self, client: Connection) -> None:
        self.client = client
        self.url = b""
        self.raw: list[tuple[bytes, bytes]] = []
        self.method = ""
        self.asked = ""  # authorize mode: the method asked about, the one logged
        self.authorizing = False  # authorize mode: a decision answers 200, nothing forwarded
        self.headers: CIMultiDict[str] | None = None
        self.old = False  # HTTP/1.0
        self.keep_alive = True
        self.has_body = False
        self.chunked = False  # the body came chunked: it goes upstream re-chunked
        self.expect = False
        self.head_only = False
        self.refusal = 0  # a fixed answer instead of a decision (400, 431, 505)
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.body_done = False
        self.finished_reading = False  # the whole request (head and body) was parsed
        self.writing = False  # the body goes straight upstream as it comes
        self.rid = ""
        self.started = 0.0
        self.decided: Decision | Rejection | None = None
        self.outcome = "forwarded"
        self.reason = ""
        self.app = ""
        self.status: int | None = None  # once the answer's head went out
        self.answered = False  # the answer is whole
        self.done = False  # logged and counted
        self.bytes_in = 0
        self.bytes_out = 0
        self.broken: str | None = None
        self.upstream_seconds: float | None = None
        self.upstream_started = 0.0
        self.pool: UpstreamPool | None = None
        self.upstream: UpstreamConnection | None = None
        self.reply_chunked = False  # the answer is chunked by us
        self.task: asyncio.Task[None] | None = None
        self.begun = False  # its turn came
        self.headed = False  # its head was parsed whole
        self.upgrade = False  # llhttp read an upgrade in its head
        self.reused = False  # its upstream connection came from the pool
        self.retried = False
        self.head_bytes = b""  # what went upstream, for the one retry

    # --- the request body, from the client's parser ---

    def body_in(self, data: bytes) -> None:
        upstream = self.upstream
        if self.writing and upstream is not None:
            if upstream.closed:
                return  # its failure is told to response_failed
            self.bytes_in += len(data)
            if self.chunked:
                upstream.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                upstream.write(data)
            return
        self.body.append(data)
        self.buffered += len(data)
        if self.buffered > _BODY_BUFFER:
            self.client.hold(_HOLD_BODY)

    def body_end(self) -> None:
        self.body_done = True
        upstream = self.upstream
        if self.writing and upstream is not None and self.chunked and not upstream.closed:
            upstream.write(_LAST_CHUNK)

    def take_body(self) -> bytes:
        """The buffered body (the token service's form)."""
        body = b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        return body

    # --- the decision ---

    def start(self) -> None:
        """The request's turn: decide and forward, reject, or hand over to a coroutine."""
        client = self.client
        proxy = client.proxy
        state = proxy.state
        config = state.config
        self.started = perf_counter()
        proxy.metrics.in_flight(1)
        if self.refusal:
            self.fixed(self.refusal)
            return
        headers = self.headers
        assert headers is not None  # noqa: S101 - set with the head
        rid_name = config.forward.request_id_header
        self.rid = request_id(headers.get(rid_name))
        target = self.url.decode("utf-8", "surrogateescape")
        service = config.token_service is not None and proxy.service is not None
        if service and target.partition("?")[0] in SERVICE_PATHS:
            self.outcome = SERVICE_OUTCOME
            self.task = asyncio.ensure_future(self.serve_token(target))
            return
        try:
            if config.mode == "authorize":  # SPEC §10: a gateway asks about another request
                self.authorizing = True
                view = asked_request(config.authorize, self.method, target, self.raw,
                                     client.peer, proxy.scheme, self.has_body)  # fmt: skip
                self.asked = view.method
            else:
                view = RequestView(
                    self.method, target, headers, client.peer, proxy.scheme, self.has_body
                )
            decided = decide_now(view, config, state.verifier, proxy.clock())
        except Rejection as rejection:
            self.reject(rejection)
            return
        except Exception:
            self.internal()
            return
        if isinstance(decided, Pending):
            self.task = asyncio.ensure_future(self.decide_later(decided))
            return
        self.forward(decided)

    async def decide_later(self, pending: Pending) -> None:
        try:
            decision = await pending.resume()
        except Rejection as rejection:
            self.reject(rejection)
            return
        except Exception:
            self.internal()
            return
        finally:
            self.task = None
        if not self.done:
            self.forward(decision)

    def forward(self, decision: Decision) -> None:
        self.decided = decision
        self.app = decision.app
        client = self.client
        proxy = client.proxy
        state = proxy.state
        config = state.config
        if self.authorizing:  # the allow answer: 200, no body, the identity headers (§10)
            rid_name = config.forward.request_id_header
            self.own(200, [], b"", allow_headers(decision, config.forward, rid_name, self.rid))
            return
        route = decision.route
        upstream, pool = state.upstreams[route.upstream if route is not None else None]
        verified = decision.verified
        found = decision.found
        headers = self.headers
        assert headers is not None  # noqa: S101
        host = headers.get("Host")
        host_bytes = host.encode("utf-8", "surrogateescape") if host is not None else None
        facts = Forwarding(
            host_bytes if upstream.preserve_host and host_bytes else upstream.host_header.encode(),
            host_bytes,
            client.peer,
            proxy.scheme,
            self.rid,
            verified.identity if verified is not None else (),
            verified.claims_header if verified is not None else None,
            found.source if found is not None and not config.forward.token else None,
            self.chunked,
        )
        path = upstream.base_path + decision.target.path
        if self.upgrade and is_websocket(self.method, headers):
            expires_in = (
                verified.exp + config.token.leeway - proxy.clock()
                if verified is not None and verified.exp is not None
                else None
            )
            head = state.plan.websocket_head(path, decision.target.query, tuple(self.raw), facts)
            self.task = asyncio.ensure_future(
                Tunnel(self, client, upstream, pool.ssl).run(head, expires_in)
            )
            return
        head = state.plan.request_head(
            self.method, path, decision.target.query, tuple(self.raw), facts
        )
        if self.expect and self.has_body and not self.body_done:
            client.write(_CONTINUE)  # decided: now the body may come
        self.pool = pool
        self.head_bytes = head
        self.upstream_started = perf_counter()
        connection = pool.take()
        if connection is None:
            self.task = asyncio.ensure_future(self.connect(pool, head))
            return
        self.send(connection, head, True)

    async def connect(self, pool: UpstreamPool, head: bytes) -> None:
        try:
            connection, reused = await pool.acquire()
        except UpstreamError as error:
            self.task = None
            self.pool = None
            self.upstream_failed(error.reason, error.detail)
            return
        finally:
            self.task = None
        if self.done:  # the client left meanwhile
            pool.finish(connection, False)
            return
        self.send(connection, head, reused)

    def send(self, connection: UpstreamConnection, head: bytes, reused: bool) -> None:
        """Write the head and what came of the body; the rest follows as it comes."""
        pool = self.pool
        assert pool is not None  # noqa: S101
        self.upstream = connection
        self.reused = reused
        pool.begin(connection, self, self.head_only)
        if self.client.write_paused and connection.transport is not None:
            connection.transport.pause_reading()  # the client reads slowly: wait for it
        try:
            connection.write(head)
            for chunk in self.body:
                self.bytes_in += len(chunk)
                connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk)
            if self.body_done and self.chunked:
                connection.write(_LAST_CHUNK)
        except ConnectionError as error:
            self.response_failed(connection, error)
            return
        self.body.clear()
        self.buffered = 0
        self.writing = True
        self.client.release(_HOLD_BODY)

    # --- the upstream's answer (forward.Sink) ---

    def response_ready(self, connection: UpstreamConnection) -> None:
        pool = self.pool
        if pool is not None:
            pool.headed(connection)
        self.upstream_seconds = perf_counter() - self.upstream_started
        client = self.client
        config = client.proxy.state.config
        rid_name = config.forward.request_id_header
        status = connection.status
        reason = connection.reason.decode("latin-1")
        # The client's connection carries on only when its request was read whole.
        keep_alive = self.keep_alive and self.body_done and not client.closing
        if connection.complete and not self.head_only and status not in (204, 304):
            chunks = connection.chunks
            body = b"".join(chunks) if len(chunks) != 1 else chunks[0]
            chunks.clear()
            connection.buffered = 0
            self.keep_alive = keep_alive
            self.status = status
            self.bytes_out = len(body)
            head = response_head(
                status, reason, connection.headers, rid_name, self.rid, len(body), keep_alive,
                self.old,
            )  # fmt: skip
            client.write(head + body)
            connection.sink = None
            self.response_end(connection)
            return
        head, chunked, delimited = streamed_head(
            status, reason, connection.headers, rid_name, self.rid, keep_alive, self.old,
            self.head_only,
        )  # fmt: skip
        self.keep_alive = keep_alive and not delimited
        self.reply_chunked = chunked
        self.status = status
        client.write(head)
        if connection.chunks:
            for chunk in connection.chunks:
                self.response_body(chunk)
            connection.chunks.clear()
            connection.buffered = 0

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.reply_chunked:
            self.client.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.client.write(data)

    def response_end(self, connection: UpstreamConnection) -> None:
        if self.reply_chunked:
            self.client.write(_LAST_CHUNK)
        self.upstream = None
        pool = self.pool
        if pool is not None:
            self.pool = None
            # A body still coming: the upstream would read the next request as its rest.
            pool.finish(connection, self.body_done and self.writing)
        self.answer_done()

    def response_failed(self, connection: UpstreamConnection, error: BaseException) -> None:
        self.upstream = None
        pool = self.pool
        started = connection.started
        if pool is None:
            return  # not ours any more
        self.pool = None
        pool.finish(connection, False)
        if self.done:
            return
        if self.status is not None:  # the answer started: the client must see a cut
            self.broken = f"upstream failed mid-response ({type(error).__name__})"
            self.keep_alive = False
            self.client.abort()
            self.finish()
            return
        if isinstance(error, TimeoutError):
            self.upstream_failed(Reason.UPSTREAM_TIMEOUT, "no response head in time")
            return
        if self.reused and not started and not self.has_body and not self.retried:
            # A kept-alive connection the upstream closed meanwhile: one fresh try, when
            # nothing of a body had to be replayed.
            self.retried = True
            self.pool = pool
            self.task = asyncio.ensure_future(self.connect(pool, self.head_bytes))
            return
        self.upstream_failed(
            Reason.UPSTREAM_UNAVAILABLE, f"connection failed ({type(error).__name__})"
        )

    def upstream_writable(self, writable: bool) -> None:
        if writable:
            self.client.release(_HOLD_UPSTREAM)
        else:
            self.client.hold(_HOLD_UPSTREAM)

    # --- the proxy's own answers ---

    def own(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        raw: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Write an answer the proxy made; the connection closes after it unless the request
        was read whole."""
        client = self.client
        keep_alive = self.keep_alive and self.finished_reading and not client.closing
        self.keep_alive = keep_alive
        server = client.proxy.state.config.server_header
        length = len(body)
        if self.head_only:
            body = b""
        self.status = status
        self.bytes_out = len(body)
        client.write(own_head(status, headers, length, keep_alive, server, raw) + body)
        self.answer_done()

    def reject(self, rejection: Rejection) -> None:
        if self.done:
            return
        self.decided = rejection
        self.reason, self.app = rejection.reason.value, rejection.app
        self.outcome = CONTRACT[rejection.reason].name
        # never read a rejected body (Expect: 100-continue): answer, then close
        if self.has_body and not self.body_done:
            self.keep_alive = False
            self.client.stop_reading()
        self.contract(rejection.reason, rejection.retry_after, rejection.allow)

    def contract(
        self, reason: Reason, retry_after: int | None = None, allow: str | None = None
    ) -> None:
        """The contract's answer for `reason` (SPEC §5)."""
        errors = self.client.proxy.state.errors
        status, body, challenge = errors.rendered(reason)
        rid_name = self.client.proxy.state.config.forward.request_id_header
        headers = [(rid_name, self.rid)]
        if challenge is not None:
            headers.append(("WWW-Authenticate", challenge))
        if retry_after is not None:
            headers.append(("Retry-After", str(retry_after)))
        if allow is not None:
            headers.append(("Allow", allow))
        self.own(status, headers, body)

    def upstream_failed(self, reason: Reason, detail: str) -> None:
        if self.done:
            return
        self.reason, self.outcome = reason.value, CONTRACT[reason].name
        self.broken = detail
        if self.has_body and not self.body_done:
            self.keep_alive = False
            self.client.stop_reading()
        self.contract(reason)

    def internal(self) -> None:
        self.reason, self.outcome = Reason.INTERNAL.value, CONTRACT[Reason.INTERNAL].name
        self.client.proxy.log.event(
            "error", "internal_error", request_id=self.rid, traceback=traceback.format_exc()
        )
        self.keep_alive = False
        self.client.stop_reading()
        self.contract(Reason.INTERNAL)

    def fixed(self, status: int) -> None:
        """A request that never parsed (400, 431, 505, 408): a fixed answer, then close."""
        client = self.client
        proxy = client.proxy
        rid_name = proxy.state.config.forward.request_id_header
        self.rid = request_id(None)
        self.outcome = "bad_request"
        if status != _BAD_PATH:
            proxy.log.event(
                "warning", "bad_request", status=status, request_id=self.rid, client=client.peer
            )
        self.keep_alive = False
        self.done = True  # never a request: no access line, no count
        proxy.metrics.in_flight(-1)
        headers = [(rid_name, self.rid)]
        if status == _BAD_PATH:
            status, body, _ = proxy.state.errors.rendered(Reason.BAD_PATH)
        else:
            body = _FIXED[status]
        server = proxy.state.config.server_header
        client.write(own_head(status, headers, len(body), False, server) + body)
        self.answered = True
        client.answered(self)

    async def serve_token(self, target: str) -> None:
        """The token service's paths: the form is read whole (at most 64 KB) first."""
        client = self.client
        service = client.proxy.service
        assert service is not None  # noqa: S101
        headers = self.headers
        assert headers is not None  # noqa: S101
        try:
            while not self.body_done and self.buffered <= _MAX_FORM:
                client.release(_HOLD_BODY)
                client.waiter = asyncio.get_running_loop().create_future()
                await client.waiter
            too_large = self.buffered > _MAX_FORM
            if not self.body_done:
                self.keep_alive = False
                client.stop_reading()
            self.bytes_in = self.buffered
            body = self.take_body()
            status, answer_headers, answer, self.reason = await service(
                self.method, target.partition("?")[0], headers, body, too_large
            )
        except Exception:
            self.internal()
            return
        finally:
            self.task = None
        if self.done:
            return
        rid_name = client.proxy.state.config.forward.request_id_header
        self.own(status, [*answer_headers, (rid_name, self.rid)], answer)

    # --- the end ---

    def answer_done(self) -> None:
        """The answer is whole: log it, then the connection moves on to the next request."""
        self.answered = True
        self.finish()
        self.client.answered(self)

    def abandon(self) -> None:
        """The client left before the answer was whole."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        upstream, pool = self.upstream, self.pool
        self.upstream = self.pool = None
        if upstream is not None and pool is not None:
            pool.finish(upstream, False)
        # (waiting for a connection: cancelled, acquire() gives the slot back)
        self.finish()

    def finish(self) -> None:
        """One access line and one count per request (SPEC §7)."""
        if self.done:
            return
        self.done = True
        proxy = self.client.proxy
        metrics = proxy.metrics
        metrics.in_flight(-1)
        decided = self.decided
        upstream_name = _upstream_name(decided)
        if self.broken is not None:
            proxy.log.event(
                "warning", "upstream_error", request_id=self.rid, upstream=upstream_name,
                error=self.broken,
            )  # fmt: skip
        status = self.status
        outcome = self.outcome
        if status is None:
            # No answer went out: the client left before one. Still one access line and one
            # count, as nginx logs its 499.
            status = CLIENT_CLOSED
            if not isinstance(decided, Decision) and outcome != SERVICE_OUTCOME:
                outcome = CLIENT_CLOSED_OUTCOME  # left while the decision was pending
        elapsed = perf_counter() - self.started
        if outcome != SERVICE_OUTCOME:
            metrics.request(outcome, self.reason, self.app, elapsed)
        if self.upstream_seconds is not None:
            metrics.upstream(upstream_name, self.upstream_seconds)
        if proxy.state.config.access_log:
            route = ""
            if isinstance(decided, Decision):
                path = decided.target.path
                route = decided.route.pattern.pattern if decided.route is not None else ""
            elif decided is not None and decided.path is not None:
                path, route = decided.path, decided.route
            else:
                path = self.url.decode("utf-8", "surrogateescape").partition("?")[0][:2048]
                if outcome == SERVICE_OUTCOME:
                    route = path  # one of the service's fixed paths
            proxy.log.access(
                self.rid, self.asked or self.method, path, route, status, outcome, self.reason,
                self.app, self.client.peer, elapsed, self.upstream_seconds, self.bytes_in,
                self.bytes_out,
            )  # fmt: skip


def _upstream_name(decided: Decision | Rejection | None) -> str:
    """The upstream a request went to, for logs and metrics."""
    if isinstance(decided, Decision) and decided.route is not None and decided.route.upstream:
        return decided.route.upstream
    return "default"


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
        self.head_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
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
        self.head_timer = self.loop.call_later(self.listener.header_timeout, self.head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reading = False
        self.listener.connections.discard(self)
        for timer in (self.head_timer, self.idle_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.idle_timer = None
        if self.tunnel is not None:
            self.tunnel.client_lost()
        while self.queue:
            exchange = self.queue.popleft()
            if exchange.begun and not exchange.answered:
                exchange.abandon()
        self._wake()
        self.listener.gone()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.upgrading:
            self.pending_frames += data
            self.hold(_HOLD_TUNNEL)
            return
        if not self.reading:
            return
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded(data[upgrade.args[0] :])
        except httptools.HttpParserError as error:
            self.malformed(error)
        self.advance()

    def pause_writing(self) -> None:
        self.write_paused = True
        exchange = self.queue[0] if self.queue else None
        upstream = exchange.upstream if exchange is not None else None
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()
        if self.tunnel is not None:
            self.tunnel.client_writable(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        exchange = self.queue[0] if self.queue else None
        upstream = exchange.upstream if exchange is not None else None
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()
        if self.tunnel is not None:
            self.tunnel.client_writable(True)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.parsing = Exchange(self)
        if self.head_timer is None and not self.queue:
            self.head_timer = self.loop.call_later(self.listener.header_timeout, self.head_late)

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
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
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
            self.hold(_HOLD_QUEUE)

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
            elif self.parsing is None and self.idle_timer is None:
                self.idle_timer = self.loop.call_later(self.listener.idle_timeout, self.close)

    def answered(self, exchange: Exchange) -> None:
        """`exchange`'s answer is whole: on to the next, or close."""
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        if not exchange.keep_alive:
            self.reading = False
            self.queue.clear()
            self.close()
            return
        self.release(_HOLD_QUEUE)
        if self.parsing is not None and self.head_timer is None and not self.queue:
            # part of the next head came while this one was answered: its deadline runs
            self.head_timer = self.loop.call_later(self.listener.header_timeout, self.head_late)
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
            exchange.refusal = exchange.refusal or (_BAD_PATH if bad_path else 400)
            self.queue.append(exchange)
            return
        if exchange.refusal or exchange.answered:
            return
        if not exchange.begun:
            exchange.refusal = 400
            return
        exchange.keep_alive = False
        upstream, pool = exchange.upstream, exchange.pool
        exchange.upstream = exchange.pool = None
        if upstream is not None and pool is not None:
            pool.finish(upstream, False)
        if exchange.task is not None:
            exchange.task.cancel()
            exchange.task = None
        if exchange.done:
            return
        if exchange.status is None:
            exchange.outcome, exchange.reason = "bad_request", ""
            rid_name = self.proxy.state.config.forward.request_id_header
            exchange.own(400, [(rid_name, exchange.rid)], _BAD_REQUEST)
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
                self.hold(_HOLD_TUNNEL)
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
        self.head_timer = None
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
        self.hold(_HOLD_BODY)

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
