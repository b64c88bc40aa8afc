"""Fault injection (issue 17, "the harness"): real loopback servers that misbehave on purpose.

    upstream resets mid-request-body       -> 502 (nothing of the answer had started)
    upstream resets mid-response-body      -> the client sees a cut, never a complete body
    upstream accepts and never answers     -> 504 after `upstream.timeout`
    stray upstream bytes                   -> never reach the next client
    JWKS hanging / garbage / flapping      -> 503 until keys come, then last good keys serve
    SIGHUP every 100 ms under load         -> every request gets its contract answer
    clients leaving mid-stream             -> nothing leaks

After each: the pool holds no leaked connection, one access line per request sent, and
`token_proxy_requests_total` counts exactly what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml

from proxy.config import load
from proxy.forward import UpstreamPool
from tests.conftest import (
    BASE_APPS,
    OTHER_SECRET,
    SECRET,
    SECRET_B64,
    KeyFiles,
    ProxyFactory,
    RunningProxy,
    Upstream,
    mint,
    parse_head,
    write_config,
)
from tests.test_lifecycle import OTHER_B64, Served, served  # noqa: F401 - a fixture

# --- A TCP server whose every connection runs the test's behaviour ----------------------------

Behaviour = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback server that speaks whatever (broken) HTTP the test's behaviour writes."""

    def __init__(self, behave: Behaviour) -> None:
        self.behave = behave
        self.accepted = 0
        self.heads: list[bytes] = []  # every request head read
        self.closed_by_peer = 0  # connections the proxy closed while we waited
        self.mode = ""  # for behaviours that change over a test
        self.tasks: set[asyncio.Task[Any]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.behave(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # (a cancelled handler would be logged as an error by asyncio's streams)
        finally:
            self.tasks.discard(task)
            await hang_up(writer)

    async def read_head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head

    async def wait_eof(self, reader: asyncio.StreamReader) -> None:
        """Read until the peer closes: counted in `closed_by_peer`."""
        while await reader.read(65536):
            pass
        self.closed_by_peer += 1

    async def close(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self.server.wait_closed()


async def hang_up(writer: asyncio.StreamWriter) -> None:
    """Close a connection and wait until its socket is closed (no ResourceWarning later)."""
    writer.close()
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        await writer.wait_closed()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), the way a crashing upstream goes."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.fixture
async def raw_servers() -> AsyncIterator[list[RawServer]]:
    started: list[RawServer] = []
    yield started
    for server in started:
        await server.close()


# --- A client that sees exactly what comes back ------------------------------------------------


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].split(":")
    return host, int(port)


_OPEN: list[asyncio.StreamWriter] = []  # client connections, closed after each test


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*host_port(url))
    _OPEN.append(writer)
    return reader, writer


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    """A failed assertion must not leave a socket to warn in some later test."""
    yield
    while _OPEN:
        await hang_up(_OPEN.pop())


def request_head(method: str, path: str, token: str | None = None, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: proxy.test"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Answer:
    def __init__(self, status: int, headers: dict[str, list[str]], body: bytes, eof: bool):
        self.status = status
        self.headers = headers
        self.body = body
        self.eof = eof  # the proxy closed the connection

    def json(self) -> Any:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader, seconds: float = 5.0) -> Answer:
    """One response: its head, then its Content-Length body, or everything until EOF."""
    async with asyncio.timeout(seconds):
        head = await reader.readuntil(b"\r\n\r\n")
    status, headers, _ = parse_head(head)
    body = b""
    eof = False
    try:
        async with asyncio.timeout(seconds):
            if "content-length" in headers:
                want = int(headers["content-length"][0])
                while len(body) < want:
                    chunk = await reader.read(want - len(body))
                    if not chunk:
                        eof = True
                        break
                    body += chunk
            else:
                while chunk := await reader.read(65536):
                    body += chunk
                eof = True
    except TimeoutError:
        pass
    return Answer(status, headers, body, eof)


async def closes(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the peer closes the connection within `seconds` (bytes before are dropped)."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
        return True
    except (TimeoutError, ConnectionError):
        return False


# --- What must hold after every fault --------------------------------------------------------


def pool_of(proxy: RunningProxy) -> UpstreamPool:
    return proxy.proxy.state.upstreams[None][1]


async def settled(pool: UpstreamPool, seconds: float = 5.0) -> None:
    """No busy slot, no head awaited, and every idle connection still open."""
    deadline = time.monotonic() + seconds
    while (pool.active or pool.awaiting) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    assert pool.active == 0, f"{pool.active} connection slots still busy"
    assert not pool.awaiting
    assert not pool.waiters or all(w.done() for w in pool.waiters)
    for connection in pool.idle:
        assert not connection.closed
        assert connection.transport is not None and not connection.transport.is_closing()


def access_lines(proxy: RunningProxy) -> list[dict[str, Any]]:
    return [line for line in proxy.log_lines() if line.get("event") == "request"]


_REQUESTS = re.compile(r"^token_proxy_requests_total\{(.*)\} (\S+)$", re.MULTILINE)


def requests_total(text: str) -> Counter[str]:
    """token_proxy_requests_total summed by outcome."""
    counts: Counter[str] = Counter()
    for labels, value in _REQUESTS.findall(text):
        outcome = re.search(r'outcome="([^"]*)"', labels)
        assert outcome is not None
        counts[outcome.group(1)] += int(float(value))
    return counts


async def books_balance(proxy: RunningProxy, sent: Counter[str]) -> None:
    """One access line per request sent, and the request counter equal to what was sent."""
    await asyncio.sleep(0.06)  # access lines are written within 50 ms
    lines = access_lines(proxy)
    assert Counter(line["outcome"] for line in lines) == sent, lines
    assert requests_total(proxy.metrics_text()) == sent


# --- Upstream faults ---------------------------------------------------------------------------


async def test_upstream_reset_mid_request_body_is_a_502(
    proxy_for: ProxyFactory, raw_servers: list[RawServer]
) -> None:
    async def behave(server: RawServer, reader: asyncio.StreamReader, writer: Any) -> None:
        await server.read_head(reader)
        await reader.readexactly(1000)  # some of the body, then the upstream crashes
        reset(writer)

    up = await RawServer(behave).start()
    raw_servers.append(up)
    proxy = await proxy_for({"upstream": {"url": up.url}})
    reader, writer = await connect(proxy.url)
    writer.write(request_head("POST", "/upload", proxy.token(), Content_Length="1000000"))
    writer.write(b"a" * 65536)  # the rest of the megabyte never comes
    answer = await read_answer(reader)
    assert answer.status == 502
    assert answer.json()["error"]["reason"] == "upstream_unavailable"
    assert "x-request-id" in answer.headers
    # the client's unsent body is not waited for: the connection is closed
    assert await closes(reader, 3), "the connection stayed open for the rest of the body"
    await hang_up(writer)
    assert len(up.heads) == 1
    await settled(pool_of(proxy))
    assert not pool_of(proxy).idle
    await books_balance(proxy, Counter({"BadGateway": 1}))
    errors = [line for line in proxy.log_lines() if line.get("event") == "upstream_error"]
    assert len(errors) == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked", "until-close"])
async def test_upstream_reset_mid_response_body_cuts_the_client(
    proxy_for: ProxyFactory, raw_servers: list[RawServer], framing: str
) -> None:
    head = {
        "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000,
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000,
        "until-close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 1000,
    }[framing]

    async def behave(server: RawServer, reader: asyncio.StreamReader, writer: Any) -> None:
        await server.read_head(reader)
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(0.2)
        reset(writer)

    up = await RawServer(behave).start()
    raw_servers.append(up)
    proxy = await proxy_for({"upstream": {"url": up.url}})
    reader, writer = await connect(proxy.url)
    writer.write(request_head("GET", "/download", proxy.token(), X_Request_Id="cut-1"))
    answer = await read_answer(reader)
    await hang_up(writer)
    assert answer.status == 200
    assert answer.eof, "the proxy kept the connection open after the upstream broke"
    if framing == "content-length":
        assert len(answer.body) < 100000  # a cut, not a complete body
    else:  # re-chunked for the client: no last chunk, so the client knows it was cut
        assert answer.headers["transfer-encoding"] == ["chunked"]
        assert not answer.body.endswith(b"0\r\n\r\n")
    await settled(pool_of(proxy))
    assert not pool_of(proxy).idle
    await books_balance(proxy, Counter({"forwarded": 1}))
    errors = [line for line in proxy.log_lines() if line.get("event") == "upstream_error"]
    assert [line["request_id"] for line in errors] == ["cut-1"]


@pytest.mark.slow
async def test_upstream_that_never_answers_is_a_504(
    proxy_for: ProxyFactory, raw_servers: list[RawServer]
) -> None:
    async def behave(server: RawServer, reader: asyncio.StreamReader, writer: Any) -> None:
        await server.read_head(reader)
        await server.wait_eof(reader)  # reads everything, answers nothing

    up = await RawServer(behave).start()
    raw_servers.append(up)
    proxy = await proxy_for({"upstream": {"url": up.url, "timeout": 0.5}})
    for method, body in (("GET", b""), ("POST", b"0123456789")):
        reader, writer = await connect(proxy.url)
        started = time.monotonic()
        extra = {"Content_Length": str(len(body))} if body else {}
        writer.write(request_head(method, "/x", proxy.token(), **extra) + body)
        answer = await read_answer(reader)
        elapsed = time.monotonic() - started
        assert answer.status == 504
        assert answer.json()["error"]["reason"] == "upstream_timeout"
        assert 0.45 <= elapsed < 3, elapsed
        await hang_up(writer)
    # the proxy gave up on both upstream connections and closed them
    for _ in range(100):
        if up.closed_by_peer == 2:
            break
        await asyncio.sleep(0.02)
    assert up.closed_by_peer == 2
    await settled(pool_of(proxy))
    assert not pool_of(proxy).idle
    await books_balance(proxy, Counter({"GatewayTimeout": 2}))


@pytest.mark.parametrize("when", ["while-idle", "in-one-read"])
async def test_stray_upstream_bytes_never_reach_the_next_client(
    proxy_for: ProxyFactory, raw_servers: list[RawServer], when: str
) -> None:
    """Waits for issue 17 defect 3 (stray upstream bytes)."""
    answer_ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Stray: 1\r\n\r\nstray"

    async def behave(server: RawServer, reader: asyncio.StreamReader, writer: Any) -> None:
        while True:
            await server.read_head(reader)
            if when == "in-one-read":
                writer.write(answer_ok + stray)
            else:
                writer.write(answer_ok)
                await writer.drain()
                await asyncio.sleep(0.1)
                writer.write(stray)  # on a connection the pool holds idle
            await writer.drain()

    up = await RawServer(behave).start()
    raw_servers.append(up)
    proxy = await proxy_for({"upstream": {"url": up.url}})
    bodies = []
    for _ in range(3):
        response = await proxy.get("/x", token=proxy.token())
        bodies.append(await response.read())
        assert "X-Stray" not in response.headers
        await asyncio.sleep(0.3)
    assert bodies == [b"ok", b"ok", b"ok"]
    assert up.accepted == 3  # each connection that carried a stray answer was closed
    await settled(pool_of(proxy))
    await books_balance(proxy, Counter({"forwarded": 3}))


# --- JWKS faults -----------------------------------------------------------------------------

ISS = "https://idp.example"


def jwks_behaviour(document: dict[str, Any]) -> Behaviour:
    """A JWKS URL whose answer follows `server.mode`."""

    async def behave(server: RawServer, reader: asyncio.StreamReader, writer: Any) -> None:
        await server.read_head(reader)
        mode = server.mode
        if mode == "hang":
            await server.wait_eof(reader)
            return
        body = {
            "good": json.dumps(document).encode(),
            "not-json": b"<html>maintenance</html>",
            "empty-keys": b'{"keys": []}',
            "status-500": b"{}",
            "truncated": json.dumps(document).encode(),
        }.get(mode, b"")
        if mode == "not-http":
            writer.write(b"\x00\xffSSH-2.0-nope\r\n\r\n")
        else:
            status = b"500 Oops" if mode == "status-500" else b"200 OK"
            length = len(body) + (500 if mode == "truncated" else 0)
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, length, body)
            )
        await writer.drain()

    return behave


def jwks_fetches(proxy: RunningProxy) -> Counter[str]:
    found = re.findall(
        r'^token_proxy_jwks_fetches_total\{app="idp",result="(\w+)"\} (\S+)$',
        proxy.metrics_text(),
        re.MULTILINE,
    )
    return Counter({result: int(float(value)) for result, value in found})


@pytest.mark.slow
async def test_jwks_hanging_then_garbage_then_flapping(
    proxy_for: ProxyFactory, raw_servers: list[RawServer], keys: KeyFiles
) -> None:
    jwks = RawServer(jwks_behaviour({"keys": [keys.jwk("rsa", kid="k1", use="sig")]}))
    jwks.mode = "hang"
    raw_servers.append(await jwks.start())
    app = {"id": "idp", "match": {"claim": "iss", "value": ISS}, "algorithms": ["RS256"]}
    app["jwks_url"] = jwks.url + "/jwks"
    token_settings = {"jwks_timeout": 0.5, "jwks_min_refresh": 0, "cache_size": 0}
    started = time.monotonic()
    proxy = await proxy_for({"apps": [app], "token": token_settings})
    assert time.monotonic() - started < 3  # a hanging JWKS delays the start by jwks_timeout

    def rs256(kid: str) -> str:
        now = time.time()
        claims = {"iss": ISS, "sub": "u1", "iat": int(now), "exp": int(now + 300)}
        return jwt.encode(claims, keys.private["rsa"], algorithm="RS256", headers={"kid": kid})

    good, unknown = rs256("k1"), rs256("k-unknown")
    sent: Counter[str] = Counter()

    async def expect(token: str, status: int, reason: str | None = None) -> None:
        response = await proxy.get("/x", token=token)
        body = await response.json()
        assert response.status == status, body
        if reason is not None:
            assert body["error"]["reason"] == reason
        if status == 503:
            assert int(response.headers["Retry-After"]) >= 1
        outcome = body["error"]["name"] if status != 200 else "forwarded"
        sent[outcome] += 1

    # hanging: no keys yet, so 503 with Retry-After, and not ready
    assert proxy.proxy.state.ready(proxy.clock()) == [f"jwks {app['jwks_url']}"]
    await expect(good, 503, "keys_unavailable")
    # garbage: still no keys (the background retries within about a second)
    jwks.mode = "not-json"
    await asyncio.sleep(1.6)
    await expect(good, 503, "keys_unavailable")
    assert jwks_fetches(proxy)["error"] >= 2
    # good: keys arrive with the next background retry
    jwks.mode = "good"
    for _ in range(60):
        if jwks_fetches(proxy)["ok"]:
            break
        await asyncio.sleep(0.05)
    assert jwks_fetches(proxy)["ok"] == 1
    assert proxy.proxy.state.ready(proxy.clock()) == []
    await expect(good, 200)
    # flapping, each fetch driven by an unknown kid: the last good keys keep serving
    before = jwks_fetches(proxy)
    rounds = ["not-json", "good", "not-http", "hang", "good", "status-500", "empty-keys",
              "truncated", "good", "not-json"]  # fmt: skip
    for mode in rounds:
        jwks.mode = mode
        await expect(unknown, 401, "unknown_kid")
        await expect(good, 200)
    after = jwks_fetches(proxy)
    assert after["ok"] - before["ok"] == rounds.count("good")
    assert after["error"] - before["error"] == len(rounds) - rounds.count("good")
    # concurrent misses while a fetch hangs share that one fetch
    jwks.mode = "hang"
    heads = len(jwks.heads)
    await asyncio.gather(*(expect(unknown, 401, "unknown_kid") for _ in range(5)))
    assert len(jwks.heads) == heads + 1
    await expect(good, 200)
    # a client that leaves while its decision waits for a hanging fetch is logged and counted
    _, writer = await connect(proxy.url)
    writer.write(request_head("GET", "/x", rs256("k-other")))
    await asyncio.sleep(0.2)
    writer.transport.abort()
    await asyncio.sleep(0.5)  # the fetch times out meanwhile
    sent["client_closed"] += 1
    await books_balance(proxy, sent)
    assert access_lines(proxy)[-1]["status"] == 499


# --- SIGHUP every 100 ms under load, against `token-proxy serve` ------------------------------


def write_atomically(path: Path, text: str) -> None:
    """A reload must never read a half-written file (that would be a test artefact)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


@pytest.mark.slow
async def test_sighup_every_100ms_under_load(
    tmp_path: Path,
    upstream: Upstream,
    served: list[Served],  # noqa: F811
) -> None:
    def config(first: str, second: str, timeout: int) -> dict[str, Any]:
        return {
            "upstream": {"url": upstream.url, "timeout": timeout},
            "apps": [
                {"id": "app-1", "match": {}, "algorithms": ["HS256"], "secrets": [first, second]}
            ],
            "routes": [{"path": "/public/*", "auth": "none"}, {"path": "/*"}],
        }

    proxy = Served(tmp_path, config(SECRET_B64, OTHER_B64, 30))
    served.append(proxy)
    await proxy.start()
    assert proxy.process is not None
    fds_at_start = len(os.listdir(f"/proc/{proxy.process.pid}/fd"))
    listeners = {key: proxy.data[key] for key in ("listen", "admin_listen")}
    # secrets rotated both ways and a new upstream pool each time (timeout differs), or a
    # broken file the old config must survive
    versions = [
        yaml.safe_dump({**config(OTHER_B64, SECRET_B64, 31), **listeners}),
        yaml.safe_dump({**config(SECRET_B64, OTHER_B64, 30), **listeners}),
        "apps: [\n  broken",
    ]
    tokens: dict[str, tuple[str | None, int, str]] = {
        "valid": (mint(SECRET, appId="app-1"), 200, "forwarded"),
        "rotated": (mint(OTHER_SECRET, appId="app-1"), 200, "forwarded"),
        "expired": (mint(SECRET, ttl=-3600, appId="app-1"), 401, "TokenExpired"),
        "bad": (mint(b"b" * 40, appId="app-1"), 401, "TokenInvalid"),
        "missing": (None, 401, "TokenRequired"),
    }
    sent: Counter[str] = Counter()
    wrong: list[tuple[str, int]] = []
    stop = asyncio.Event()

    async def client(number: int) -> None:
        kinds = list(tokens)
        async with aiohttp.ClientSession() as session:
            index = number
            while not stop.is_set():
                kind = kinds[index % len(kinds)]
                index += 1
                token, status, outcome = tokens[kind]
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                if index % 7 == 0:
                    headers["Connection"] = "close"  # new client connections too
                async with session.get(proxy.url + "/x", headers=headers) as response:
                    await response.read()
                    if response.status != status:
                        wrong.append((kind, response.status))
                sent[outcome] += 1

    async def reloader() -> int:
        signals = 0
        while not stop.is_set():
            write_atomically(proxy.config, versions[signals % len(versions)])
            proxy.signal(signal.SIGHUP)
            signals += 1
            await asyncio.sleep(0.1)
        return signals

    load = [asyncio.ensure_future(client(n)) for n in range(6)]
    reloads = asyncio.ensure_future(reloader())
    await asyncio.sleep(3)
    stop.set()
    await asyncio.gather(*load)
    signals = await reloads
    assert not wrong, wrong[:10]
    assert sum(sent.values()) > 100
    await asyncio.sleep(0.5)  # the last reload, and access lines written within 50 ms
    metrics = await proxy.metrics()
    assert requests_total(metrics) == sent
    reloaded = dict(re.findall(r'^token_proxy_reloads_total\{result="(\w+)"\} (\S+)$', metrics,
                               re.MULTILINE))  # fmt: skip
    ok, failed = float(reloaded.get("ok", 0)), float(reloaded.get("error", 0))
    assert ok >= 10 and failed >= 5
    assert ok + failed >= signals * 0.8  # (two signals close together may merge into one)
    # what stays open: at most the current pool's idle connections (one per client), not
    # those of the pools each reload retired
    assert len(os.listdir(f"/proc/{proxy.process.pid}/fd")) <= fds_at_start + 6 + 2
    assert await proxy.stop() == 0
    lines = [line for line in proxy.lines if line.get("event") == "request"]
    assert Counter(line["outcome"] for line in lines) == sent


async def test_a_reload_retires_the_old_pool_without_keeping_its_connections(
    proxy_for: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    """Connections busy across a reload must close when done, not idle in a dead pool."""
    proxy = await proxy_for({"upstream": {"url": upstream.url, "timeout": 30}})
    old = pool_of(proxy)
    token = proxy.token()

    async def slow() -> int:
        response = await proxy.get("/slow?s=0.5", token=token)
        await response.read()
        return response.status

    in_flight = [asyncio.ensure_future(slow()) for _ in range(4)]
    for _ in range(100):
        if old.active == 4:
            break
        await asyncio.sleep(0.02)
    assert old.active == 4
    data = {"upstream": {"url": upstream.url, "timeout": 31}, "apps": BASE_APPS}
    config = load(str(write_config(tmp_path, {**data, "admin_listen": None}, "new.yaml")), env={})
    proxy.proxy.swap(await proxy.proxy.resources.prepare(config))
    new = pool_of(proxy)
    assert new is not old
    assert await asyncio.gather(*in_flight) == [200] * 4  # in flight: not disturbed
    await settled(old)
    assert not old.idle, "connections kept in a pool no request will ever use"
    response = await proxy.get("/x", token=token)
    assert response.status == 200
    await response.read()
    await settled(new)
    assert len(new.idle) == 1
    await books_balance(proxy, Counter({"forwarded": 5}))


# --- Clients that leave ------------------------------------------------------------------------


@pytest.mark.slow
async def test_clients_leaving_mid_stream_leak_nothing(
    proxy_for: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await proxy_for({"upstream": {"url": upstream.url, "timeout": 5}})
    token = proxy.token()

    async def download() -> None:
        reader, writer = await connect(proxy.url)
        writer.write(request_head("GET", "/download?bytes=50000000", token))
        got = 0
        while got < 200_000:
            got += len(await reader.read(65536))
        writer.transport.abort()

    async def upload() -> None:
        _, writer = await connect(proxy.url)
        writer.write(request_head("POST", "/upload", token, Content_Length="10000000"))
        for _ in range(4):
            writer.write(b"u" * 65536)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.transport.abort()

    async def before_the_answer() -> None:
        _, writer = await connect(proxy.url)
        writer.write(request_head("GET", "/slow?s=1", token))
        await asyncio.sleep(0.3)
        writer.transport.abort()

    async def mid_trickle() -> None:
        reader, writer = await connect(proxy.url)
        writer.write(request_head("GET", "/trickle?s=1", token))
        async with asyncio.timeout(5):
            await reader.readuntil(b"start ")
        writer.transport.abort()

    leavers = [download, download, upload, upload, before_the_answer, mid_trickle, mid_trickle]
    await asyncio.gather(*(leave() for leave in leavers))
    await asyncio.sleep(1.2)  # the slow upstream answers meanwhile
    pool = pool_of(proxy)
    await settled(pool)
    # the pool still serves, on kept connections or fresh ones
    for _ in range(3):
        response = await proxy.get("/x", token=token)
        assert response.status == 200
        await response.read()
    await settled(pool)
    assert len(pool.idle) <= 3
    await books_balance(proxy, Counter({"forwarded": len(leavers) + 3}))
    # who left before any answer is logged as nginx logs it: 499
    statuses = Counter(line["status"] for line in access_lines(proxy))
    assert statuses == Counter({200: 3 + 4, 499: 3})
