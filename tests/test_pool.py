"""The upstream pool (SPEC §6): a pooled connection only ever carries its own request's answer.

    upstream = await scripted_upstream({"/x": ANSWER + STRAY})   # raw bytes, no framework
    proxy = await proxy_for({"upstream": {"url": upstream.url}, ...})
    ... assert the next client gets its own answer and the pool dropped the connection ...

The upstream here is a raw asyncio server that answers each request head with the bytes the
test scripts, so it can misbehave the way real upstreams do: send more than its framing, two
answers at once, or bytes on an idle keep-alive connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from proxy.forward import UpstreamPool
from tests.conftest import ProxyFactory, RunningProxy


def answer(body: bytes, status: str = "200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status.encode(), len(body), body)


@dataclass
class ScriptedUpstream:
    """Answers `GET <path>` with `script[path]` (bytes, or a callable of the connection number
    returning them); any other path gets `answer(b"own answer to <path>")`. `later` bytes are
    written `delay` seconds after the answer, on the then idle connection."""

    url: str = ""
    script: dict[str, bytes] = field(default_factory=dict)
    later: dict[str, bytes] = field(default_factory=dict)
    delay: float = 0.1
    connections: int = 0
    requests: list[tuple[int, str]] = field(default_factory=list)  # (connection, path)
    open: set[int] = field(default_factory=set)
    sent_later: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.open.add(number)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.requests.append((number, path))
                writer.write(self.script.get(path, answer(f"own answer to {path}".encode())))
                await writer.drain()
                if path in self.later:
                    await asyncio.sleep(self.delay)
                    writer.write(self.later[path])
                    await writer.drain()
                    self.sent_later += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open.discard(number)
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    upstream = ScriptedUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield upstream
    server.close()


async def proxy_to(proxy_for: ProxyFactory, upstream: ScriptedUpstream) -> RunningProxy:
    return await proxy_for(
        {"upstream": {"url": upstream.url}, "routes": [{"path": "/*", "auth": "none"}]}
    )


def pool_of(proxy: RunningProxy) -> UpstreamPool:
    return proxy.proxy.state.upstreams[None][1]


async def until(condition: Callable[[], bool], seconds: float = 2.0) -> None:
    for _ in range(int(seconds / 0.01)):  # bounded
        if condition():
            return
        await asyncio.sleep(0.01)


STRAY = answer(b"stray answer", "404 Stray")


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(STRAY, id="a-second-whole-answer"),
        pytest.param(STRAY[:20], id="the-start-of-a-second-answer"),
        pytest.param(b"HTTP/1.1 2", id="a-few-bytes-of-a-status-line"),
        pytest.param(b"garbage", id="garbage"),
    ],
)
async def test_bytes_beyond_an_answers_framing_close_the_connection(
    proxy_for: ProxyFactory, scripted: ScriptedUpstream, extra: bytes
) -> None:
    """Defect: llhttp parsed what followed `Content-Length: 2` as the next answer (two answers
    in one read: the client got the second's status over the first's body) and the connection
    went back to the pool, carrying the rest to the next, unrelated request."""
    scripted.script["/first"] = answer(b"ok") + extra  # one write: one read on loopback
    proxy = await proxy_to(proxy_for, scripted)
    first = await proxy.get("/first")
    assert (first.status, first.reason, await first.read()) == (200, "OK", b"ok")
    following = await proxy.get("/next")
    assert (following.status, await following.read()) == (200, b"own answer to /next")
    # the first connection was closed, never reused: /next went on a new one, now pooled
    assert scripted.requests == [(1, "/first"), (2, "/next")]
    await until(lambda: scripted.open == {2})
    assert scripted.open == {2}
    assert len(pool_of(proxy).idle) == 1


@pytest.mark.parametrize(
    "stray",
    [
        pytest.param(STRAY, id="a-whole-answer"),
        pytest.param(STRAY[:25], id="half-an-answer"),
        pytest.param(b"\r\n", id="an-empty-line"),
    ],
)
async def test_bytes_on_an_idle_pooled_connection_close_it(
    proxy_for: ProxyFactory, scripted: ScriptedUpstream, stray: bytes
) -> None:
    """Defect: an answer an upstream sent while its connection sat idle in the pool was handed
    to the next request that took the connection (the pool is LIFO: always the next one)."""
    scripted.later["/first"] = stray
    proxy = await proxy_to(proxy_for, scripted)
    first = await proxy.get("/first")
    assert await first.read() == b"own answer to /first"
    assert len(pool_of(proxy).idle) == 1  # kept alive while it behaved
    await until(lambda: scripted.sent_later == 1)
    await until(lambda: not scripted.open, 0.2)  # the stray bytes arrive: the proxy hangs up
    following = await proxy.get("/next")
    assert (following.status, await following.read()) == (200, b"own answer to /next")
    # the idle connection was closed, never reused: /next went on a new one, now pooled
    assert scripted.requests == [(1, "/first"), (2, "/next")]
    assert scripted.open == {2}
    assert len(pool_of(proxy).idle) == 1


async def test_well_behaved_connections_are_still_reused(
    proxy_for: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    proxy = await proxy_to(proxy_for, scripted)
    for n in range(3):
        response = await proxy.get(f"/n{n}")
        assert await response.read() == f"own answer to /n{n}".encode()
    assert scripted.requests == [(1, "/n0"), (1, "/n1"), (1, "/n2")]
    assert len(pool_of(proxy).idle) == 1


async def test_a_body_cut_short_never_returns_its_connection_to_the_pool(
    proxy_for: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    """The upstream answers at once (whole, keep-alive) while the body still comes; the client
    then leaves with 90 of 100 declared bytes unsent. Pooled, that connection would make the
    upstream read the next request's head as this one's body."""
    scripted.script["/early"] = answer(b"early")
    proxy = await proxy_to(proxy_for, scripted)
    host, port = proxy.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    received = b""
    while b"early" not in received:
        received += await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    await until(lambda: not scripted.open)
    assert not scripted.open
    pool = pool_of(proxy)
    assert (len(pool.idle), pool.active) == (0, 0)
    following = await proxy.get("/next")
    assert (following.status, await following.read()) == (200, b"own answer to /next")
    assert scripted.requests[-1] == (2, "/next")  # a fresh connection


async def test_a_slow_reader_leaves_its_pooled_connection_reading(
    proxy_for: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    """A client that reads a large answer slowly pauses the upstream connection's reading
    (back-pressure); once the answer ends that connection is pooled reading again and carries
    the next request (a connection left paused would time it out as a 504)."""
    scripted.script["/big"] = answer(b"x" * (4 << 20))
    proxy = await proxy_to(proxy_for, scripted)
    host, port = proxy.url.split("//")[1].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    left = 4 << 20
    for _ in range(8192):  # bounded: 1 KB reads, a pause now and then
        if not left:
            break
        left -= len(await asyncio.wait_for(reader.read(min(left, 1024)), 5))
        await asyncio.sleep(0)
    assert left == 0
    writer.write(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    following = await asyncio.wait_for(reader.readuntil(b"own answer to /next"), 3)
    assert following.startswith(b"HTTP/1.1 200")
    assert scripted.requests == [(1, "/big"), (1, "/next")]  # the pooled connection, reused
    writer.close()


async def test_an_unasked_101_is_a_bad_gateway_and_closes_the_connection(
    proxy_for: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    """The pool never asks for an upgrade (WebSockets take their own path), so a 101 is no
    answer to a plain request (RFC 9110 §15.2.2), and what follows it is not HTTP."""
    scripted.script["/switch"] = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nraw"
    )
    proxy = await proxy_to(proxy_for, scripted)
    switched = await proxy.get("/switch")
    assert switched.status == 502
    assert (await switched.json())["error"]["reason"] == "upstream_unavailable"
    following = await proxy.get("/next")
    assert (following.status, await following.read()) == (200, b"own answer to /next")
    assert [number for number, _ in scripted.requests] == [1, 2]
    assert scripted.open == {2}


async def test_a_client_gone_mid_answer_closes_the_upstream_connection(
    proxy_for: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    """Checked, no defect: the rest of the answer would still come on that connection, so it
    is closed (never pooled) and its slot freed. Kept for the listener that will replace
    aiohttp's."""
    scripted.script["/partial"] = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
    proxy = await proxy_to(proxy_for, scripted)
    host, port = proxy.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /partial HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    while b"0123456789" not in received:
        received += await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    await until(lambda: not scripted.open)
    assert not scripted.open
    pool = pool_of(proxy)
    assert (len(pool.idle), pool.active) == (0, 0)
