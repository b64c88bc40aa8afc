"""Prototype (bench only, not the product): the product's decision on an httptools listener.

    python bench/httptools_listener.py CONFIG.yaml

aiohttp's server is about half of the product's CPU per request (bench/README numbers). This
listener replaces only that part: an asyncio protocol on httptools (llhttp) parses requests;
everything else is the product's own code — `decide()`, the verified-token cache, the header
plan, the upstream pool, `response_head`, the error bodies, the metrics. It serves what the
benchmark needs and no more: requests without bodies, whole upstream responses, keep-alive,
no pipelining, no WebSocket, no TLS, no admin listener, no access log.
"""

from __future__ import annotations

import asyncio
import gc
import io
import sys
import time

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.app import Resources, State
from proxy.config import load
from proxy.decision import decide
from proxy.errors import CONTRACT, Rejection
from proxy.forward import Traffic, UpstreamError
from proxy.headers import Forwarding, request_id, response_head
from proxy.metrics import Metrics
from proxy.model import RequestView
from proxy.telemetry import Log


class Connection(asyncio.Protocol):
    def __init__(self, state: State, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.busy: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")[0]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.reply(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        url, headers = self.url, self.headers
        self.url, self.headers = b"", []
        self.busy = asyncio.ensure_future(self.handle(method, url, headers))

    def reply(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def handle(self, method: str, url: bytes, raw: list[tuple[bytes, bytes]]) -> None:
        state = self.state
        config = state.config
        started = time.perf_counter()
        rid_name = config.forward.request_id_header
        headers = CIMultiDictProxy(CIMultiDict((n.decode("latin-1"), v.decode("latin-1"))
                                               for n, v in raw))  # fmt: skip
        rid = request_id(headers.get(rid_name))
        keep_alive = self.parser.should_keep_alive()
        view = RequestView(method, url.decode("utf-8", "surrogateescape"), headers, self.peer)
        try:
            decision = await decide(view, config, state.verifier, time.time())
            route, verified, found = decision.route, decision.verified, decision.found
            upstream, pool = state.upstreams[route.upstream if route is not None else None]
            host = headers.get("Host")
            facts = Forwarding(
                upstream.host_header.encode(), host.encode() if host else None, self.peer,
                "http", rid, verified.identity if verified else (),
                verified.claims_header if verified else None,
                found.source if found is not None and not config.forward.token else None, False,
            )  # fmt: skip
            head = state.plan.request_head(
                method, upstream.base_path + decision.target.path, decision.target.query,
                tuple(raw), facts,
            )  # fmt: skip
            response = await pool.send(head, None, False, method == "HEAD", Traffic())
            chunks = []
            while (chunk := await response.next_chunk()) is not None:
                chunks.append(chunk)
            body = b"".join(chunks)
            response.release()
            self.reply(
                response_head(response.status, response.reason, response.headers, rid_name, rid,
                              len(body), keep_alive, False) + body
            )  # fmt: skip
            outcome, reason, app = "forwarded", "", decision.app
        except (Rejection, UpstreamError) as error:
            status, body, challenge = state.errors.rendered(error.reason)
            outcome = CONTRACT[error.reason].name
            reason, app = error.reason.value, getattr(error, "app", "")
            lines = [f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n{rid_name}: {rid}\r\n"]  # fmt: skip
            if challenge:
                lines.append(f"WWW-Authenticate: {challenge}\r\n")
            self.reply("".join(lines).encode() + b"\r\n" + body)
        self.metrics.request(outcome, reason, app, time.perf_counter() - started)
        if not keep_alive and self.transport is not None:
            self.transport.close()


async def main(path: str) -> None:
    config = load(path)
    metrics = Metrics()
    resources = Resources(metrics, Log(io.StringIO(), "warning"))
    state = await resources.prepare(config)
    resources.activate(state)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(state, metrics), config.listen.host, config.listen.port, backlog=4096
    )
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(sys.argv[1]))
