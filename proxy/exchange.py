"""One request on the main listener (SPEC §5-§7): its head, its body on the way, the decision,
the upstream connection, the answer's bytes.

    exchange = Exchange(connection)        # made by listener.Connection as llhttp parses a head
    exchange.start()                       # its turn: decide, then forward, reject or wait
    exchange.body_in(data); exchange.body_end()

The common case runs in callbacks: `decide_now`, a pooled connection's transport written
directly, the answer relayed as `forward.Sink`. A coroutine only where something must wait
(a JWKS refetch, a new upstream connection, the token service's form, a WebSocket).
"""

from __future__ import annotations

import asyncio
import collections
from time import perf_counter  # a module attribute lookup less, compiled
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDict

from .answers import HOLD_BODY, HOLD_UPSTREAM, Reply, serve_token
from .app import SERVICE_OUTCOME, SERVICE_PATHS
from .authorize import allow_headers, asked_request
from .decision import Decision, Pending, decide_now
from .errors import Reason, Rejection
from .forward import UpstreamConnection, UpstreamError, UpstreamPool
from .headers import Forwarding, request_id, response_head, streamed_head
from .model import Headers, RequestView
from .websocket import Tunnel, is_websocket

if TYPE_CHECKING:
    from .listener import Connection

_BODY_BUFFER: Final = 64 * 1024  # request body held before its upstream is ready
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"


class Exchange(Reply):
    """One request: its parsed head, its body on the way, its upstream connection. It is
    also that connection's `Sink`."""

    # fmt: off
    __slots__ = (
        "authorizing", "begun", "body", "buffered", "chunked", "expect", "head_bytes", "headed",
        "headers", "old", "pool", "raw", "refusal", "reply_chunked", "retried", "reused", "task",
        "upgrade", "upstream", "upstream_started", "writing",
    )
    # fmt: on

    def __init__(self, client: Connection) -> None:
        super().__init__(client)
        self.raw: list[tuple[bytes, bytes]] = []
        self.authorizing = False  # authorize mode: a decision answers 200, nothing forwarded
        self.headers: CIMultiDict[str] | None = None
        self.old = False  # HTTP/1.0
        self.chunked = False  # the body came chunked: it goes upstream re-chunked
        self.expect = False
        self.refusal = 0  # a fixed answer instead of a decision (400, 431, 505)
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.writing = False  # the body goes straight upstream as it comes
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
            self.client.hold(HOLD_BODY)

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
            self.task = asyncio.ensure_future(serve_token(self, target))
            return
        try:
            if config.mode == "authorize":  # SPEC §10: a gateway asks about another request
                self.authorizing = True
                view = asked_request(config.authorize, self.view(target, headers))
                self.asked = view.method
            else:
                view = self.view(target, headers)
            decided = decide_now(view, config, state.verifier, proxy.clock(), None, self.reached)
        except Exception as error:
            self.failed(error)
            return
        if isinstance(decided, Pending):
            self.task = asyncio.ensure_future(self.decide_later(decided))
            return
        self.forward(decided)

    async def decide_later(self, pending: Pending) -> None:
        try:
            decision = await pending.resume()
        except Exception as error:
            self.failed(error)
            return
        finally:
            self.task = None
        if not self.done:
            self.forward(decision)

    def view(self, target: str, headers: Headers) -> RequestView:
        """What the decision sees of this request."""
        return RequestView(
            method=self.method,
            target=target,
            headers=headers,
            peer=self.client.peer,
            scheme=self.client.proxy.scheme,
            has_body=self.has_body,
        )

    def failed(self, error: Exception) -> None:
        """The decision failed: the contract's answer for a rejection, else a 500."""
        if isinstance(error, Rejection):
            self.reject(error)
        else:
            self.internal()

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
        self.client.release(HOLD_BODY)

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
                status,
                reason,
                connection.headers,
                request_id_name=rid_name,
                rid=self.rid,
                length=len(body),
                keep_alive=keep_alive,
                old_client=self.old,
            )
            client.write(head + body)
            connection.sink = None
            self.response_end(connection)
            return
        head, chunked, delimited = streamed_head(
            status,
            reason,
            connection.headers,
            request_id_name=rid_name,
            rid=self.rid,
            keep_alive=keep_alive,
            old_client=self.old,
            head_only=self.head_only,
        )
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
            self.client.release(HOLD_UPSTREAM)
        else:
            self.client.hold(HOLD_UPSTREAM)

    # --- the end ---

    def abandon(self) -> None:
        """The client left before the answer was whole."""
        self.let_go()
        self.finish()

    def let_go(self) -> None:
        """Its coroutine cancelled, its upstream connection closed, never pooled."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        upstream, pool = self.upstream, self.pool
        self.upstream = self.pool = None
        if upstream is not None and pool is not None:
            pool.finish(upstream, False)
        # (waiting for a connection: cancelled, acquire() gives the slot back)
