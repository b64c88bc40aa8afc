"""The proxy's own answers and the record of each request (SPEC §5, §7).

    reply.own(status, headers, body)     # an answer the proxy makes: JSON, its length, Date
    reply.reject(rejection)              # the contract's answer to a Rejection
    reply.answer_done()                  # whole: logged, counted, on to the next request

`Reply` is the part of a request (`exchange.Exchange`) that is answered and recorded: one
access line and one count per request. The fixed 400/408/431/505 bodies never echo the request;
`bad_length` is one reason for the 400.
"""

from __future__ import annotations

import asyncio
import traceback
from http import HTTPStatus
from time import perf_counter  # a module attribute lookup less, compiled
from typing import TYPE_CHECKING, Final

from .app import CLIENT_CLOSED, CLIENT_CLOSED_OUTCOME, SERVICE_OUTCOME
from .decision import Decision, Reached
from .errors import CONTRACT, Reason, Rejection
from .errors import FIXED_BODIES as _FIXED
from .headers import http_date, request_id

if TYPE_CHECKING:
    from .exchange import Exchange
    from .listener import Connection

# --- The proxy's own fixed answers are errors.FIXED_BODIES: short, never echoing the request

BAD_PATH: Final = 1  # a refusal: the contract's bad_path answer
_MAX_LENGTH: Final = 1 << 63
_MAX_FORM: Final = 64 * 1024  # the token service's form

# Why the client's transport is paused (a bit each); it reads again when none is left.
HOLD_BODY: Final = 1  # a request body waits for its upstream connection
HOLD_UPSTREAM: Final = 2  # the upstream's write buffer is full
HOLD_QUEUE: Final = 4  # a pipelined request waits for the one before it
HOLD_TUNNEL: Final = 8  # a WebSocket's upstream is not ready or not writable


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


class Reply:
    """What a request answered and what its access line says; `exchange.Exchange` adds the
    request's way in and out."""

    # fmt: off
    __slots__ = (
        "answered", "app", "asked", "body_done", "broken", "bytes_in", "bytes_out", "client",
        "decided", "done", "finished_reading", "has_body", "head_only", "keep_alive", "method",
        "outcome", "reached", "reason", "rid", "started", "status", "upstream_seconds", "url",
    )
    # fmt: on

    def __init__(self, client: Connection) -> None:
        self.client = client
        self.url = b""
        self.method = ""
        self.asked = ""  # authorize mode: the method asked about, the one logged
        self.keep_alive = True
        self.head_only = False
        self.has_body = False
        self.body_done = False
        self.finished_reading = False  # the whole request (head and body) was parsed
        self.rid = ""
        self.started = 0.0
        self.decided: Decision | Rejection | None = None
        self.reached = Reached()  # the path and route the access line shows, once known
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
        # Kept for the access line; its traceback would hold the frames that raised it, and
        # they this exchange: a cycle only a full collection frees (rare: runtime.py).
        self.decided = rejection.with_traceback(None)
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
        if status != BAD_PATH:
            proxy.log.event(
                "warning", "bad_request", status=status, request_id=self.rid, client=client.peer
            )
        self.keep_alive = False
        self.done = True  # never a request: no access line, no count
        proxy.metrics.in_flight(-1)
        headers = [(rid_name, self.rid)]
        if status == BAD_PATH:
            status, body, _ = proxy.state.errors.rendered(Reason.BAD_PATH)
        else:
            body = _FIXED[status]
        server = proxy.state.config.server_header
        client.write(own_head(status, headers, len(body), False, server) + body)
        self.answered = True
        client.answered(self)

    def answer_done(self) -> None:
        """The answer is whole: log it, then the connection moves on to the next request."""
        self.answered = True
        self.finish()
        self.client.answered(self)

    def finish(self) -> None:
        """One access line and one count per request (SPEC §7)."""
        if self.done:
            return
        self.done = True
        proxy = self.client.proxy
        metrics = proxy.metrics
        metrics.in_flight(-1)
        decided = self.decided
        upstream = upstream_name(decided)
        if self.broken is not None:
            proxy.log.event(
                "warning", "upstream_error", request_id=self.rid, upstream=upstream,
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
            metrics.upstream(upstream, self.upstream_seconds)
        if proxy.state.config.access_log:
            route = ""
            reached = self.reached
            if decided is not None and reached.path is not None:
                path, route = reached.path, reached.route
            else:
                path = self.url.decode("utf-8", "surrogateescape").partition("?")[0][:2048]
                if outcome == SERVICE_OUTCOME:
                    route = path  # one of the service's fixed paths
            proxy.log.access(
                request_id=self.rid,
                method=self.asked or self.method,
                path=path,
                route=route,
                status=status,
                outcome=outcome,
                reason=self.reason,
                app=self.app,
                client=self.client.peer,
                seconds=elapsed,
                upstream_seconds=self.upstream_seconds,
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
            )


def upstream_name(decided: Decision | Rejection | None) -> str:
    """The upstream a request went to, for logs and metrics."""
    if isinstance(decided, Decision) and decided.route is not None and decided.route.upstream:
        return decided.route.upstream
    return "default"


async def serve_token(exchange: Exchange, target: str) -> None:
    """The token service's paths: the form is read whole (at most 64 KB) first."""
    client = exchange.client
    service = client.proxy.service
    assert service is not None  # noqa: S101
    headers = exchange.headers
    assert headers is not None  # noqa: S101
    try:
        while not exchange.body_done and exchange.buffered <= _MAX_FORM:
            client.release(HOLD_BODY)
            client.waiter = asyncio.get_running_loop().create_future()
            await client.waiter
        too_large = exchange.buffered > _MAX_FORM
        if not exchange.body_done:
            exchange.keep_alive = False
            client.stop_reading()
        exchange.bytes_in = exchange.buffered
        body = exchange.take_body()
        status, answer_headers, answer, exchange.reason = await service(
            exchange.method, target.partition("?")[0], headers, body, too_large
        )
    except Exception:
        exchange.internal()
        return
    finally:
        exchange.task = None
    if exchange.done:
        return
    rid_name = client.proxy.state.config.forward.request_id_header
    exchange.own(status, [*answer_headers, (rid_name, exchange.rid)], answer)
