"""The main listener's limits (SPEC §5, §6): framing it refuses, slow and greedy clients, the
headers of its own answers. Black-box: raw bytes on loopback sockets, whatever the listener is.

    tap = await tap_upstream()                    # records every byte that reaches the upstream
    raw = await raw_exchange(proxy.url, b"GET / HTTP/2.0\\r\\n...")
    assert parse_head(raw)[0] == 505 and tap.received == b""
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import KeyFiles, ProxyFactory, parse_head, raw_exchange
from tests.test_token_service import service_config

NO_AUTH = {"routes": [{"path": "/*", "auth": "none"}]}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
FIXED_400 = {"code": 400, "name": "BadRequest", "message": "The request could not be parsed."}


@dataclass
class Tap:
    """An upstream that records every byte it receives and answers each head with `answer`."""

    url: str
    answer: list[bytes]  # written one after another (with a pause between) per request head
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0


@pytest.fixture
async def tap() -> AsyncIterator[Tap]:
    holder: list[Tap] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = holder[0]
        upstream.connections += 1
        pending = b""
        try:
            while data := await reader.read(65536):
                upstream.received += data
                pending += data
                while b"\r\n\r\n" in pending:
                    _, _, pending = pending.partition(b"\r\n\r\n")
                    for part in upstream.answer:
                        writer.write(part)
                        await writer.drain()
                        await asyncio.sleep(0.2)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    holder.append(Tap(f"http://127.0.0.1:{port}", [OK]))
    yield holder[0]
    server.close()


def tapped(tap: Tap, **extra: object) -> dict[str, object]:
    return {"upstream": {"url": tap.url, "timeout": 3}, **NO_AUTH, **extra}


async def exchange_until_closed(url: str, data: bytes, limit: float = 5.0) -> tuple[bytes, float]:
    """Send `data`, read until the proxy closes; the bytes and how long the proxy took."""
    started = time.monotonic()
    raw = await raw_exchange(url, data, read_timeout=limit)
    return raw, time.monotonic() - started


def fixed_400(raw: bytes) -> None:
    status, headers, body = parse_head(raw)
    assert status == 400, raw[:200]
    assert headers["content-type"] == ["application/json"]
    assert json.loads(body) == {"error": FIXED_400}


# --- Defect 2: a Content-Length that is not a plain decimal below 2^63 -----------------------


@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param(["18446744073709551615"], id="2^64-1"),
        pytest.param(["9223372036854775808"], id="2^63"),
        pytest.param(["+5"], id="plus"),
        pytest.param(["-5"], id="minus"),
        pytest.param(["0x10"], id="hex"),
        pytest.param(["5 5"], id="space-inside"),
        pytest.param(["5, 5"], id="list"),
        pytest.param(["5", "6"], id="two-differing"),
        pytest.param([""], id="empty"),
    ],
)
async def test_bad_content_length_is_400_closed_and_nothing_forwarded(
    proxy_for: ProxyFactory, tap: Tap, lengths: list[str]
) -> None:
    """Defect: `Content-Length: 18446744073709551615` was read as no body and forwarded with
    that length: the upstream then took the next user's request as this one's body."""
    proxy = await proxy_for(tapped(tap))
    head = b"POST /x HTTP/1.1\r\nHost: a\r\n" + b"".join(
        b"Content-Length: %s\r\n" % value.encode() for value in lengths
    )
    next_request = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    raw, took = await exchange_until_closed(proxy.url, head + b"\r\nhello" + next_request)
    fixed_400(raw)
    assert took < 4, "the proxy must close the connection after its 400"
    assert raw.count(b"HTTP/1.") == 1, "one answer, and nothing after it"
    await asyncio.sleep(0.1)
    assert bytes(tap.received) == b""


@pytest.mark.parametrize(
    "length", ["5", "05", "0" * 5000 + "5"], ids=["plain", "leading-zero", "5000-leading-zeros"]
)
async def test_plain_content_length_still_forwards(
    proxy_for: ProxyFactory, tap: Tap, length: str
) -> None:
    proxy = await proxy_for(tapped(tap))
    raw = await raw_exchange(
        proxy.url,
        b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        + f"Content-Length: {length}\r\n\r\nhello".encode(),
    )
    assert raw.startswith(b"HTTP/1.1 200")
    assert bytes(tap.received).endswith(b"\r\n\r\nhello")


# --- Defect 4: an over-long request line --------------------------------------------------------


async def test_over_long_target_gets_the_fixed_400_and_no_echo(proxy_for: ProxyFactory) -> None:
    """Defect: an over-long target got a 431 saying a header was too large (SPEC §5: the fixed
    400); never aiohttp's text/plain 400, which quotes the request line and so a query token."""
    proxy = await proxy_for(
        {"token": {"sources": ["query:access_token"], "max_length": 12000}, **NO_AUTH}
    )
    secret = "eyJhbGciOiJIUzI1NiJ9." + "A" * 14000
    raw, took = await exchange_until_closed(
        proxy.url, f"GET /x?access_token={secret} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    )
    fixed_400(raw)
    assert b"eyJhbGciOiJIUzI1NiJ9" not in raw
    assert "eyJhbGciOiJIUzI1NiJ9" not in proxy.log_text()
    assert took < 4


async def test_request_line_limit_follows_max_length(proxy_for: ProxyFactory) -> None:
    """A query token over 8190 bytes but within max_length + 1024 reaches the decision."""
    proxy = await proxy_for({"token": {"sources": ["query:access_token"], "max_length": 12000}})
    for length, reason in ((9000, "malformed"), (12500, "too_long")):
        raw = await raw_exchange(
            proxy.url,
            f"GET /x?access_token={'a' * length} HTTP/1.1\r\nHost: a\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        status, _, body = parse_head(raw)
        assert status == 401, raw[:300]
        assert json.loads(body)["error"]["reason"] == reason


@pytest.mark.slow
async def test_default_request_line_limit(proxy_for: ProxyFactory, tap: Tap) -> None:
    proxy = await proxy_for(tapped(tap))
    # max(8190, 8192 + 1024): a 9000-byte target passes, a 9300-byte one does not
    ok = await raw_exchange(
        proxy.url, f"GET /x?q={'a' * 9000} HTTP/1.1\r\nHost: a\r\n\r\n".encode(), 1
    )
    assert ok.startswith(b"HTTP/1.1 200")
    fixed_400(await raw_exchange(proxy.url, f"GET /x?q={'a' * 9300} HTTP/1.1\r\n\r\n".encode()))
    assert tap.received.count(b"GET /x") == 1


# --- Defect 8: a rejected request's body is not drained ---------------------------------------


async def push_body(url: str, head: bytes, wait_for_answer: bool) -> tuple[bytes, int, float]:
    """Send `head`, then body bytes as fast as the proxy takes them (at most 256 MB, 5 s);
    what came back, how many body bytes were written and when writing stopped."""
    host, port = url.split("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    received = bytearray()
    if wait_for_answer:
        received += await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)

    async def read() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.extend(chunk)

    reading = asyncio.ensure_future(read())
    chunk = b"x" * (1 << 20)
    written = 0
    started = time.monotonic()
    with contextlib.suppress(ConnectionError, TimeoutError):
        async with asyncio.timeout(5):
            while written < 256 << 20 and not reading.done():
                writer.write(chunk)
                await writer.drain()
                written += len(chunk)
    took = time.monotonic() - started
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reading, 2)
    writer.close()
    return bytes(received), written, took


@pytest.mark.parametrize(
    "expect", [pytest.param(True, id="expect-100-continue"), pytest.param(False, id="no-expect")]
)
async def test_rejected_body_is_not_drained(
    proxy_for: ProxyFactory, tap: Tap, expect: bool
) -> None:
    """Defect: after the 401 aiohttp's lingering close read and discarded the declared body
    (10 GB in 6 s with Expect: 100-continue; 100 MB without)."""
    proxy = await proxy_for({"upstream": {"url": tap.url}})
    head = b"PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000000\r\n"
    head += b"Expect: 100-continue\r\n\r\n" if expect else b"\r\n"
    received, written, took = await push_body(proxy.url, head, wait_for_answer=expect)
    status, _, body = parse_head(received)
    assert status == 401
    assert json.loads(body)["error"]["reason"] == "missing"
    assert b"100 Continue" not in received
    # closed at once: what the kernel buffers hold at most, never the declared 10 GB
    assert written < 64 << 20, f"{written} bytes taken after the 401"
    assert took < 3
    assert bytes(tap.received) == b""


# --- Defect 9: slow clients ------------------------------------------------------------------


async def closed_after(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float]:
    """Read until the proxy closes the connection; what came and after how long."""
    started = time.monotonic()
    received = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                received += chunk
    return received, time.monotonic() - started


async def open_to(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.split("//", 1)[1].split(":")
    return await asyncio.open_connection(host, int(port))


SLOW = {"limits": {"header_timeout": 0.5, "idle_timeout": 5}, **NO_AUTH}


async def test_a_connection_that_sends_nothing_is_closed(proxy_for: ProxyFactory) -> None:
    """Defect: connections sending nothing stayed open for an hour (aiohttp's keep-alive)."""
    proxy = await proxy_for(SLOW)
    reader, writer = await open_to(proxy.url)
    received, took = await closed_after(reader, 4)
    assert received == b""  # nothing asked, nothing answered
    assert 0.4 < took < 2.5
    writer.close()


async def test_a_head_that_trickles_in_is_cut_off(proxy_for: ProxyFactory, tap: Tap) -> None:
    """Defect: a head sent a byte at a time kept its connection (slowloris)."""
    proxy = await proxy_for({**SLOW, "upstream": {"url": tap.url}})
    reader, writer = await open_to(proxy.url)
    writer.write(b"GET /x?access_token=eyJsecret HTTP/1.1\r\nHost: a\r\n")

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(40):  # activity never resets the head's deadline
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)

    trickling = asyncio.ensure_future(trickle())
    received, took = await closed_after(reader, 4)
    trickling.cancel()
    assert took < 2.5
    status, headers, body = parse_head(received)
    assert status == 408
    assert json.loads(body)["error"]["code"] == 408
    assert headers["connection"] == ["close"] and headers["x-request-id"]
    assert b"eyJsecret" not in received and "eyJsecret" not in proxy.log_text()
    assert bytes(tap.received) == b""
    writer.close()


@pytest.mark.slow
async def test_idle_keep_alive_connections_close_after_idle_timeout(
    proxy_for: ProxyFactory, tap: Tap
) -> None:
    proxy = await proxy_for({"limits": {"header_timeout": 0.5, "idle_timeout": 1.5}, **tapped(tap)})
    reader, writer = await open_to(proxy.url)
    for _ in range(2):
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        # idle longer than header_timeout: that one times heads, not the pause between them
        await asyncio.sleep(0.8)
    received, took = await closed_after(reader, 5)
    assert received == b""
    assert 0.4 < took < 2.5  # 1.5 s idle in all, 0.8 of it slept above
    writer.close()


async def test_an_idle_timeout_shorter_than_the_head_timeout_closes_on_time(
    proxy_for: ProxyFactory, tap: Tap
) -> None:
    """The connection's one timer, armed for the first head's 5 s, wakes for the earlier idle
    deadline that follows the answer."""
    proxy = await proxy_for({"limits": {"header_timeout": 5, "idle_timeout": 0.5}, **tapped(tap)})
    reader, writer = await open_to(proxy.url)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")
    received, took = await closed_after(reader, 8)
    assert received == b""
    assert 0.3 < took < 2.5
    writer.close()


async def test_a_head_begun_after_a_keep_alive_pause_is_timed(
    proxy_for: ProxyFactory, tap: Tap
) -> None:
    proxy = await proxy_for({**SLOW, **tapped(tap)})
    reader, writer = await open_to(proxy.url)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")
    await asyncio.sleep(0.3)
    writer.write(b"GET /y HTTP/1.1\r\nHost: a\r\n")  # and no more: header_timeout, not idle
    received, took = await closed_after(reader, 4)
    assert parse_head(received)[0] == 408
    assert 0.4 < took < 2.5
    assert tap.received.count(b"GET ") == 1
    writer.close()


@pytest.mark.slow
async def test_a_slow_body_is_not_cut_by_the_head_timeout(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(SLOW)
    reader, writer = await open_to(proxy.url)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    for _ in range(10):
        await asyncio.sleep(0.15)
        writer.write(b"x")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


# --- Defect 10: the headers of the proxy's own answers; HTTP versions ---------------------------


def no_implementation(headers: dict[str, list[str]]) -> None:
    text = json.dumps(headers).lower()
    assert "aiohttp" not in text and "python" not in text, headers


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        pytest.param({}, ["token-proxy"], id="default"),
        pytest.param({"server_header": "edge-7"}, ["edge-7"], id="configured"),
        pytest.param({"server_header": None}, None, id="null"),
    ],
)
async def test_own_answers_carry_server_header(
    proxy_for: ProxyFactory, setting: dict[str, object], expected: list[str] | None
) -> None:
    """Defect: the proxy's own answers said `Server: Python/3.11 aiohttp/3.14.5`."""
    proxy = await proxy_for({**setting, "limits": {"header_timeout": 0.5}})
    answers = [
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",  # 401 missing
        b"GET /x%00 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",  # 400 bad_path
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",  # 431
        b"GET /x HTTP/9\x01\r\n\r\n",  # 400 from the parser
        b"GET /x HTTP/2.0\r\nHost: a\r\n\r\n",  # 505
        b"GET /x HTTP/1.1\r\nHost: a\r\n",  # 408 after header_timeout
    ]
    statuses = []
    for data in answers:
        status, headers, _ = parse_head(await raw_exchange(proxy.url, data, 3))
        statuses.append(status)
        assert headers.get("server") == expected, (status, headers)
        no_implementation(headers)
    assert statuses == [401, 400, 431, 400, 505, 408]


async def test_token_service_answers_carry_server_header(
    proxy_for: ProxyFactory, keys: KeyFiles
) -> None:
    proxy = await proxy_for({**service_config(keys), "server_header": "edge-7"})
    response = await proxy.get("/.well-known/jwks.json")
    assert response.status == 200
    assert response.headers.getall("Server") == ["edge-7"]


UPSTREAM_SERVER = b"HTTP/1.1 200 OK\r\nServer: upstream/1\r\nContent-Length: 2\r\n\r\nok"
STREAMED_BARE = [  # chunked, the end coming later: the answer is streamed, not buffered
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n",
    b"3\r\ntwo\r\n0\r\n\r\n",
]
STREAMED_SERVER = [
    b"HTTP/1.1 200 OK\r\nServer: upstream/1\r\nContent-Type: text/x-one\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\none\r\n",
    b"3\r\ntwo\r\n0\r\n\r\n",
]


@pytest.mark.parametrize(
    ("answer", "server", "content_type"),
    [
        pytest.param([OK], None, None, id="whole-bare"),
        pytest.param([UPSTREAM_SERVER], ["upstream/1"], None, id="whole-with-server"),
        pytest.param(STREAMED_BARE, None, None, id="streamed-bare"),
        pytest.param(STREAMED_SERVER, ["upstream/1"], ["text/x-one"], id="streamed-with-server"),
    ],
)
async def test_upstream_answers_keep_their_own_server_and_type(
    proxy_for: ProxyFactory,
    tap: Tap,
    answer: list[bytes],
    server: list[str] | None,
    content_type: list[str] | None,
) -> None:
    """Defect: streamed answers gained `Server: Python/… aiohttp/…` and `Content-Type:
    application/octet-stream` when the upstream sent neither."""
    tap.answer = answer
    proxy = await proxy_for(tapped(tap))
    raw = await raw_exchange(proxy.url, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    status, headers, body = parse_head(raw)
    assert status == 200
    assert headers.get("server") == server
    assert headers.get("content-type") == content_type
    assert body in (b"ok", b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n")


@pytest.mark.parametrize(
    ("line", "status"),
    [
        pytest.param(b"GET /x\r\n\r\n", 505, id="HTTP/0.9"),
        pytest.param(b"GET /x\r\nHost: a\r\n\r\n", 505, id="HTTP/0.9-with-headers"),
        pytest.param(b"GET /x HTTP/0.9\r\nHost: a\r\n\r\n", 505, id="HTTP/0.9-named"),
        pytest.param(b"GET /x HTTP/2.0\r\nHost: a\r\n\r\n", 505, id="HTTP/2.0"),
        pytest.param(b"GET /x HTTP/3.0\r\nHost: a\r\n\r\n", None, id="HTTP/3.0"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, id="h2-prior-knowledge"),
    ],
)
async def test_other_http_versions_are_never_forwarded(
    proxy_for: ProxyFactory, tap: Tap, line: bytes, status: int | None
) -> None:
    """Defect: HTTP/0.9 and HTTP/2.0 request lines were forwarded as HTTP/1.1."""
    proxy = await proxy_for(tapped(tap))
    raw, took = await exchange_until_closed(proxy.url, line)
    got, headers, body = parse_head(raw)
    assert got in ((505, 400) if status is None else (status,))
    if got == 505:
        assert json.loads(body) == {
            "error": {
                "code": 505,
                "name": "HTTPVersionNotSupported",
                "message": "The HTTP version is not supported.",
            }
        }
    else:
        fixed_400(raw)
    assert headers["x-request-id"]
    assert took < 4
    await asyncio.sleep(0.1)
    assert bytes(tap.received) == b""


# --- Defect 14: access lines count the bytes of the proxy's own answers -----------------------


async def test_access_lines_count_the_error_body(proxy_for: ProxyFactory, keys: KeyFiles) -> None:
    """Defect: access lines of rejections said bytes_out 0, whatever the body."""
    proxy = await proxy_for(service_config(keys))
    for path, token in (("/x", None), ("/x", "not.a.token"), ("/a/%2e%2e/%2e%2e/b", None)):
        response = await proxy.get(path, token=token)
        body = await response.read()
        assert response.status in (400, 401)
        rid = response.headers["X-Request-Id"]
        (line,) = [ln for ln in proxy.log_lines() if ln.get("request_id") == rid]
        assert line["bytes_out"] == len(body) > 0, line
    response = await proxy.get("/.well-known/jwks.json")
    body = await response.read()
    (line,) = [
        ln for ln in proxy.log_lines() if ln.get("request_id") == response.headers["X-Request-Id"]
    ]
    assert line["bytes_out"] == len(body) > 0
