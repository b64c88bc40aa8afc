"""Forwarding (SPEC §6): what the upstream receives and what the client gets back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.app import Resources
from proxy.config import Forward, load
from proxy.headers import Forwarding, HeaderPlan, response_head
from tests.conftest import (
    ProxyFactory,
    Upstream,
    free_port,
    parse_head,
    raw_exchange,
    upstream_app,
    write_config,
)


async def test_headers_go_upstream_as_they_came(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    raw = await raw_exchange(
        proxy.url,
        b"GET /x HTTP/1.1\r\nHost: front.example\r\nX-B: 1\r\nx-a: two words\r\nX-B: 2\r\n"
        b"X-Latin: caf\xe9\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: close\r\n\r\n",
    )
    status, _, body = parse_head(raw)
    assert status == 200
    seen = json.loads(body)
    names = [name for name, _ in seen["raw_headers"]]
    assert names[:4] == ["X-B", "x-a", "X-B", "X-Latin"]
    assert seen["raw_headers"][1] == ["x-a", "two words"]
    assert seen["raw_headers"][3] == ["X-Latin", "caf\xe9"]  # the byte 0xE9, untouched
    headers = dict(seen["raw_headers"])
    assert headers["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert headers["X-Forwarded-Host"] == "front.example"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["Host"].startswith("127.0.0.1:")
    for added in ("User-Agent", "Accept", "Accept-Encoding"):
        assert added not in headers


async def test_preserve_host(proxy_for: ProxyFactory, upstream: Upstream) -> None:
    proxy = await proxy_for(
        {
            "upstream": {"url": upstream.url, "preserve_host": True},
            "routes": [{"path": "/*", "auth": "none"}],
        }
    )
    seen = await (await proxy.get("/x", headers={"Host": "front.example:8443"})).json()
    assert seen["headers"]["Host"] == "front.example:8443"


async def test_hop_by_hop_headers_removed_both_ways(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    raw = await raw_exchange(
        proxy.url,
        b"GET /cookies HTTP/1.1\r\nHost: a\r\nConnection: close, X-Drop-Me\r\nX-Drop-Me: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authorization: Basic eDp5\r\nTE: trailers\r\n"
        b"Upgrade: h2c\r\nX-Keep: yes\r\n\r\n",
    )
    status, headers, _ = parse_head(raw)
    assert status == 200
    assert headers["set-cookie"] == ["a=1; Path=/", "b=2; Path=/"]
    assert headers["x-multi"] == ["one", "two"]
    for hop in ("x-private", "keep-alive", "proxy-authenticate"):
        assert hop not in headers
    echo = await raw_exchange(
        proxy.url,
        b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close, X-Drop-Me\r\nX-Drop-Me: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authorization: Basic eDp5\r\nTE: trailers\r\n"
        b"Upgrade: h2c\r\nX-Keep: yes\r\n\r\n",
    )
    sent = {name.lower() for name, _ in json.loads(parse_head(echo)[2])["raw_headers"]}
    assert "x-keep" in sent
    for hop in ("x-drop-me", "keep-alive", "proxy-authorization", "te", "upgrade"):
        assert hop not in sent
    assert "connection" not in sent


async def test_upgrade_header_without_connection_upgrade_is_a_plain_request(
    proxy_for: ProxyFactory,
) -> None:
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    raw = await raw_exchange(
        proxy.url,
        b"GET /echo HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: close\r\n\r\n",
    )
    status, _, body = parse_head(raw)
    assert status == 200  # forwarded as HTTP, not relayed as a WebSocket handshake
    assert "upgrade" not in {name.lower() for name, _ in json.loads(body)["raw_headers"]}


async def test_connection_cannot_remove_headers_the_proxy_sets(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({})
    seen = await (
        await proxy.get(
            "/x",
            token=proxy.token(),
            headers={"Connection": "X-Auth-App-Id, X-Forwarded-For, X-Request-Id"},
        )
    ).json()
    names = {name.lower() for name, _ in seen["raw_headers"]}
    assert {"x-auth-app-id", "x-forwarded-for", "x-request-id"} <= names


async def test_repeated_request_headers_and_cookies_upstream(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    raw = await raw_exchange(
        proxy.url,
        b"GET /x HTTP/1.1\r\nHost: a\r\nCookie: a=1\r\nCookie: b=2\r\nConnection: close\r\n\r\n",
    )
    seen = json.loads(parse_head(raw)[2])
    assert [v for n, v in seen["raw_headers"] if n == "Cookie"] == ["a=1", "b=2"]


async def test_named_upstreams_and_base_path(proxy_for: ProxyFactory, upstream: Upstream) -> None:
    other = upstream_app()
    runner = web.AppRunner(other, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        proxy = await proxy_for(
            {
                "upstreams": {"legacy": {"url": f"http://127.0.0.1:{port}/base"}},
                "routes": [
                    {"path": "/legacy/*", "auth": "none", "upstream": "legacy"},
                    {"path": "/*", "auth": "none"},
                ],
            }
        )
        legacy = await (await proxy.get("/legacy/a?x=1")).json()
        assert legacy["target"] == "/base/legacy/a?x=1"
        default = await (await proxy.get("/a")).json()
        assert default["target"] == "/a"
        assert len(upstream.seen) == 1
    finally:
        await runner.cleanup()


async def test_upstream_refused_is_502(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(
        {
            "upstream": {"url": f"http://127.0.0.1:{free_port()}"},
            "routes": [{"path": "/*", "auth": "none"}],
        }
    )
    response = await proxy.get("/x")
    assert response.status == 502
    assert "WWW-Authenticate" not in response.headers
    assert await response.json() == {
        "error": {
            "code": 502,
            "name": "BadGateway",
            "message": "The upstream service is unavailable.",
            "reason": "upstream_unavailable",
        }
    }
    assert any(line["event"] == "upstream_error" for line in proxy.log_lines())


@pytest.mark.slow
async def test_upstream_slow_headers_is_504(proxy_for: ProxyFactory, upstream: Upstream) -> None:
    proxy = await proxy_for(
        {
            "upstream": {"url": upstream.url, "timeout": 0.3},
            "routes": [{"path": "/*", "auth": "none"}],
        }
    )
    response = await proxy.get("/slow?s=2")
    assert response.status == 504
    assert await response.json() == {
        "error": {
            "code": 504,
            "name": "GatewayTimeout",
            "message": "The upstream service timed out.",
            "reason": "upstream_timeout",
        }
    }


@pytest.mark.slow
async def test_each_request_gets_its_own_head_timeout(
    proxy_for: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    routes = [{"path": "/*", "auth": "none"}]
    proxy = await proxy_for({"upstream": {"url": upstream.url, "timeout": 0.5}, "routes": routes})
    loop = asyncio.get_running_loop()

    async def timed(path: str, delay: float) -> tuple[int, float]:
        await asyncio.sleep(delay)
        started = loop.time()
        response = await proxy.get(path)
        return response.status, loop.time() - started

    # Staggered slow requests time out one by one, each half a second after it was sent
    # (the upstream would take 3 s); a fast one among them is untouched.
    results = await asyncio.gather(
        timed("/slow?s=3", 0), timed("/slow?s=3", 0.2), timed("/x", 0.3), timed("/slow?s=3", 0.4)
    )
    assert [status for status, _ in results] == [504, 504, 200, 504]
    assert all(0.4 < took < 2.0 for status, took in results if status == 504)
    # A reload retires the pool while a head is awaited: that request keeps its timeout.
    slow = asyncio.ensure_future(timed("/slow?s=3", 0))
    await asyncio.sleep(0.1)
    moved = {"upstream": {"url": upstream.url, "timeout": 0.6}, "routes": routes}
    resources: Resources = proxy.proxy.resources
    proxy.proxy.swap(await resources.prepare(load(str(write_config(tmp_path, moved)))))
    status, took = await slow
    assert status == 504 and took < 2.0
    assert (await proxy.get("/slow?s=0")).status == 200


async def test_connect_timeout_is_504(proxy_for: ProxyFactory) -> None:
    # a listener whose backlog is full never completes the handshake in time
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(0)
    port = blocker.getsockname()[1]
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    try:
        proxy = await proxy_for(
            {
                "upstream": {
                    "url": f"http://127.0.0.1:{port}",
                    "connect_timeout": 0.3,
                    "timeout": 0.5,
                },
                "routes": [{"path": "/*", "auth": "none"}],
            }
        )
        response = await proxy.get("/x")
        assert response.status == 504
    finally:
        for s in fillers:
            s.close()
        blocker.close()


async def test_failure_mid_response_aborts_the_client(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    response = await proxy.get("/broken")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    await asyncio.sleep(0.05)
    assert any(line["event"] == "upstream_error" for line in proxy.log_lines())


@pytest.mark.slow
async def test_client_leaving_mid_response_is_still_logged_and_counted(
    proxy_for: ProxyFactory,
) -> None:
    """The handler is cancelled when the client closes; the request it answered still gets
    its access line and its count (a flaky CLI test lost lines this way)."""
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    host, port = proxy.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /trickle?s=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    while b"start " not in received:  # the head and the first piece of the body
        received += await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    for _ in range(100):  # the proxy notices the close (bounded: 1 s)
        lines = [line for line in proxy.log_lines() if line["event"] == "request"]
        if lines:
            break
        await asyncio.sleep(0.01)
    assert [(line["path"], line["status"], line["outcome"]) for line in lines] == [
        ("/trickle", 200, "forwarded")
    ]
    assert lines[0]["bytes_out"] == len(b"start ")
    assert 'token_proxy_requests_total{app="",outcome="forwarded",reason=""} 1.0' in (
        proxy.metrics_text()
    )


async def test_streamed_upload_and_download(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    size = 8 * 1024 * 1024

    async def chunks() -> Any:
        for _ in range(size // 65536):
            yield b"u" * 65536

    upload = await proxy.request("POST", "/upload", data=chunks())
    assert await upload.json() == {"received": size}
    fixed = await proxy.request("PUT", "/upload", data=b"z" * 100_000)
    assert await fixed.json() == {"received": 100_000}
    download = await proxy.get(f"/download?bytes={size}")
    total = 0
    async for chunk in download.content.iter_any():
        total += len(chunk)
    assert total == size
    lines = [line for line in proxy.log_lines() if line["event"] == "request"]
    assert lines[0]["bytes_in"] == size
    assert lines[-1]["bytes_out"] == size


async def test_head_request_and_keep_alive_reuse(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    head = await proxy.request("HEAD", "/download?bytes=1000")
    assert head.status == 200
    assert head.headers["Content-Length"] == "1000"
    assert await head.read() == b""
    for _ in range(3):  # whole and streamed answers in turn, one parser per connection
        assert (await proxy.get("/x")).status == 200
        streamed = await proxy.get("/download?bytes=300000")
        assert await streamed.read() == b"x" * 300000
    _, pool = proxy.proxy.state.upstreams[None]
    assert len(pool.idle) == 1  # one kept-alive connection served them all


async def test_expect_continue_rejected_body_is_never_read(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({})
    host, port = proxy.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 401")
    assert b"100 Continue" not in head
    writer.close()


async def test_expect_continue_accepted_gets_100_then_forwards(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({})
    host, port = proxy.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
        + f"Authorization: Bearer {proxy.token()}\r\n\r\n".encode()
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    await writer.drain()
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_malformed_request_line_gets_fixed_body_and_no_echo(
    proxy_for: ProxyFactory,
) -> None:
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    secret_ish = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    raw = await raw_exchange(proxy.url, f"GET /x?t={secret_ish} HTTP/9\x01\r\n\r\n".encode())
    status, headers, body = parse_head(raw)
    assert status == 400
    assert secret_ish.encode() not in raw
    assert len(body) < 200
    assert json.loads(body)["error"]["code"] == 400
    assert secret_ish not in proxy.log_text()
    # the request id is on this answer too, and in the log line about it
    (rid,) = headers["x-request-id"]
    assert re.fullmatch("[0-9a-f]{32}", rid)
    logged = [line for line in proxy.log_lines() if line["event"] == "bad_request"]
    assert logged[-1]["request_id"] == rid
    assert logged[-1]["status"] == 400


@pytest.mark.parametrize(
    "target",
    [
        "foo",
        "*",
        "example.com:443",
        "http://[::1",
    ],
)
async def test_target_that_is_not_a_path_gets_bad_path(
    proxy_for: ProxyFactory, upstream: Upstream, target: str
) -> None:
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    request = f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    raw = await raw_exchange(proxy.url, request.encode())  # read until the proxy closes
    status, headers, body = parse_head(raw)
    assert status == 400
    assert json.loads(body)["error"]["reason"] == "bad_path"
    assert headers["x-request-id"]
    assert not upstream.seen


async def test_over_long_header_gets_431_and_no_echo(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    huge = "A" * 20000
    raw = await raw_exchange(
        proxy.url, f"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {huge}\r\n\r\n".encode()
    )
    status, headers, body = parse_head(raw)
    assert status == 431
    assert headers["x-request-id"]
    assert huge.encode() not in raw and len(body) < 200
    assert huge not in proxy.log_text()


async def test_over_long_token_gets_too_long_not_a_parser_error(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"token": {"max_length": 8192}})
    response = await proxy.get("/x", headers={"Authorization": "Bearer " + "a" * 9000})
    assert response.status == 401
    assert (await response.json())["error"]["reason"] == "too_long"


# --- Unix sockets and TLS ------------------------------------------------------------------------


async def test_unix_socket_upstream(proxy_for: ProxyFactory, tmp_path: Path) -> None:
    app = upstream_app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    socket_path = tmp_path / "up.sock"
    await web.UnixSite(runner, str(socket_path)).start()
    try:
        proxy = await proxy_for(
            {"upstream": {"url": f"unix:{socket_path}"}, "routes": [{"path": "/*", "auth": "none"}]}
        )
        seen = await (await proxy.get("/over/unix")).json()
        assert seen["target"] == "/over/unix"
    finally:
        await runner.cleanup()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def test_https_upstream_with_ca_file(
    proxy_for: ProxyFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    app = upstream_app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "localhost", port, ssl_context=server_context).start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        trusted = await proxy_for(
            {
                "upstream": {"url": f"https://localhost:{port}", "ca_file": str(ca_file)},
                "routes": [{"path": "/*", "auth": "none"}],
            }
        )
        seen = await (await trusted.get("/secure")).json()
        assert seen["target"] == "/secure"
        assert seen["headers"]["Host"] == f"localhost:{port}"
        untrusted = await proxy_for(
            {
                "upstream": {"url": f"https://localhost:{port}"},
                "routes": [{"path": "/*", "auth": "none"}],
            }
        )
        assert (await untrusted.get("/secure")).status == 502
    finally:
        await runner.cleanup()


async def test_tls_listener(proxy_for: ProxyFactory, ca: trustme.CA, tmp_path: Path) -> None:
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    from proxy.config import load
    from tests.conftest import write_config

    config = load(
        str(
            write_config(
                tmp_path,
                {
                    "tls": {"cert_file": "cert.pem", "key_file": "key.pem"},
                    "upstream": {"url": "http://127.0.0.1:1"},
                    "apps": [],
                    "routes": [{"path": "/*", "auth": "none"}],
                },
            )
        )
    )
    assert config.tls is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    proxy = await proxy_for(
        {"routes": [{"path": "/*", "auth": "none"}]}, scheme="https", ssl_context=context
    )
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/x", ssl=client_context) as response:
            seen = await response.json()
    assert seen["headers"]["X-Forwarded-Proto"] == "https"


# --- WebSocket ----------------------------------------------------------------------------------


async def test_websocket_relay_both_ways_and_close_code(
    proxy_for: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await proxy_for({"token": {"sources": ["header:Authorization", "query:access_token"]}})
    token = proxy.token(userId="7")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{proxy.url}/ws?access_token={token}", protocols=("chat",)) as ws,
    ):
        assert ws.protocol == "chat"
        await ws.send_str("hi")
        assert (await ws.receive()).data == "echo:hi"
        await ws.send_bytes(b"abc")
        assert (await ws.receive()).data == b"cba"
        await ws.send_str("close-4001")
        closing = await ws.receive()
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4001 or closing.data == 4001
    handshake = next(s for s in upstream.seen if "ws_headers" in s)["ws_headers"]
    assert handshake["X-Auth-User-Id"] == "7"


async def test_websocket_client_close_code_reaches_upstream(
    proxy_for: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await proxy_for({})
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            f"{proxy.url}/ws", headers={"Authorization": f"Bearer {proxy.token()}"}
        )
        await ws.send_str("x")
        await ws.receive()
        await ws.close(code=4002)
    for _ in range(50):
        lines = [line for line in proxy.log_lines() if line["event"] == "request"]
        if upstream.closed and lines:
            break
        await asyncio.sleep(0.02)
    assert upstream.closed == [4002]
    # The client's hang-up cancels the relay's handler: the request is still logged.
    assert [(line["path"], line["status"]) for line in lines] == [("/ws", 101)]


async def test_websocket_without_token_is_rejected(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({})
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
            await session.ws_connect(f"{proxy.url}/ws")
    assert raised.value.status == 401


async def test_websocket_closed_with_1008_when_token_expires(
    proxy_for: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await proxy_for({"token": {"leeway": 0}})
    token = proxy.token(ttl=1)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            f"{proxy.url}/ws", headers={"Authorization": f"Bearer {token}"}
        )
        message = await asyncio.wait_for(ws.receive(), 3)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == 1008
        await ws.close()
    for _ in range(50):
        if upstream.closed:
            break
        await asyncio.sleep(0.02)
    assert upstream.closed == [1008]


@pytest.mark.slow
async def test_max_connections_queue_then_time_out(
    proxy_for: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await proxy_for(
        {
            "upstream": {"url": upstream.url, "max_connections": 1, "timeout": 1.5},
            "routes": [{"path": "/*", "auth": "none"}],
        }
    )
    first = asyncio.ensure_future(proxy.get("/slow?s=0.5"))
    await asyncio.sleep(0.1)
    queued = await proxy.get("/x")  # waits for the one connection, then gets it
    assert queued.status == 200
    assert (await first).status == 200
    hog = asyncio.ensure_future(proxy.get("/slow?s=1.2"))
    await asyncio.sleep(0.1)
    starved = await asyncio.gather(*(proxy.get("/x") for _ in range(3)))
    assert [r.status for r in starved] == [200, 200, 200]
    assert (await hog).status == 200
    blocker = await proxy.get("/trickle?s=2.5")  # headers at once; holds the connection
    assert blocker.status == 200
    timed_out = await proxy.get("/x")
    assert timed_out.status == 504
    assert await blocker.read() == b"start end"
    _, pool = proxy.proxy.state.upstreams[None]
    assert pool.active == 0
    assert not pool.waiters


async def test_response_headers_come_back_byte_for_byte(proxy_for: ProxyFactory) -> None:
    """A raw upstream: odd header case, repeats, a non-UTF-8 byte, no Date, chunked body."""
    answer = (
        b"HTTP/1.1 201 Made It\r\nx-lower: a\r\nX-Dup: 1\r\nX-Dup: 2\r\nX-Bin: caf\xe9\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )

    class Raw(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            if b"\r\n\r\n" in data:
                self.transport.write(answer)  # type: ignore[attr-defined]

    server = await asyncio.get_running_loop().create_server(Raw, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await proxy_for(
            {
                "upstream": {"url": f"http://127.0.0.1:{port}"},
                "routes": [{"path": "/*", "auth": "none"}],
            }
        )
        raw = await raw_exchange(
            proxy.url,
            b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
    finally:
        server.close()
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 201 Made It\r\n")
    assert b"\r\nx-lower: a\r\nX-Dup: 1\r\nX-Dup: 2\r\nX-Bin: caf\xe9\r\n" in first
    assert b"\r\nDate: " in first
    assert b"Content-Length: 5\r\n" in first
    assert b"Transfer-Encoding" not in first
    assert rest.startswith(b"abcde")
    second = rest[len(b"abcde") :]
    assert second.startswith(b"HTTP/1.1 201 Made It\r\n")  # the same connection, kept alive
    assert second.partition(b"\r\n\r\n")[0].endswith(b"\r\nConnection: close")


async def test_http_10_client(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    raw = await raw_exchange(proxy.url, b"GET /x HTTP/1.0\r\nHost: h\r\n\r\n")
    status, headers, body = parse_head(raw)
    assert status == 200
    assert headers["connection"] == ["close"]
    assert json.loads(body)["target"] == "/x"
    kept = await raw_exchange(
        proxy.url, b"GET /x HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n", read_timeout=0.5
    )
    assert parse_head(kept)[1]["connection"] == ["keep-alive"]


async def test_response_trailers_are_not_forwarded(proxy_for: ProxyFactory) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"2\r\nhi\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )

    class Raw(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(answer)  # type: ignore[attr-defined]

    server = await asyncio.get_running_loop().create_server(Raw, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await proxy_for(
            {
                "upstream": {"url": f"http://127.0.0.1:{port}"},
                "routes": [{"path": "/*", "auth": "none"}],
            }
        )
        raw = await raw_exchange(
            proxy.url, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
    finally:
        server.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"X-Checksum" not in head
    assert b"Trailer" not in head
    assert body == b"hi"


def test_whole_response_head_keeps_one_date_and_sets_its_own_length() -> None:
    upstream = [(b"Date", b"Mon, 30 Nov 2026 10:00:00 GMT"), (b"Content-Length", b"99")]
    head = response_head(200, "OK", upstream, "X-Request-Id", "r1", 2, True, False)
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 200 OK",
        b"Date: Mon, 30 Nov 2026 10:00:00 GMT",
        b"Content-Length: 2",
        b"X-Request-Id: r1",
        b"",
        b"",
    ]
    # A Date the upstream's Connection header lists is hop-by-hop: ours replaces it.
    listed = [*upstream, (b"Connection", b"date")]
    head = response_head(200, "OK", listed, "X-Request-Id", "r1", 2, False, False)
    dates = [line for line in head.split(b"\r\n") if line.lower().startswith(b"date:")]
    assert len(dates) == 1 and dates[0] != upstream[0][0] + b": " + upstream[0][1]
    assert b"Connection: close" in head


def test_whole_response_keeps_each_upstream_reason_phrase() -> None:
    """Status lines are remembered per status: one upstream's reason never replaces
    another's, and a Connection: keep-alive in any case lists nothing more."""
    upstream = [(b"Connection", b"Keep-Alive"), (b"X-A", b"1")]
    for reason in ("OK", "Fine", "OK"):
        head = response_head(200, reason, upstream, "X-Request-Id", "r1", 0, True, False)
        assert head.startswith(f"HTTP/1.1 200 {reason}\r\n".encode())
        assert b"\r\nX-A: 1\r\n" in head and b"Keep-Alive" not in head


def test_header_rules_hold_after_the_name_memo_is_full() -> None:
    """The proxy remembers what to do per header name, for at most 1024 names: a client
    sending thousands of distinct names fills it, and every rule still holds after that."""
    plan = HeaderPlan(Forward(True, (("X-Auth-User-Id", "sub"),), None, "X-Request-Id"))
    facts = Forwarding(b"up", None, "10.0.0.1", "http", "r1", (), None, None, False)
    junk = tuple((b"X-Junk-%d" % i, b"1") for i in range(1500))
    checked = (
        (b"X_Auth_User_Id", b"evil"),  # the CGI spelling of an identity header
        (b"Proxy-Authorization", b"secret"),
        (b"Keep-Alive", b"5"),
        (b"X-Forwarded-For", b"1.2.3.4"),
        (b"Accept", b"*/*"),
    )
    for _ in range(2):  # the first pass fills the memo, the second reads it
        sent = dict(plan.request_headers(junk + checked, facts))
        assert len([name for name in sent if name.startswith(b"X-Junk-")]) == 1500
        assert b"X_Auth_User_Id" not in sent
        assert b"Proxy-Authorization" not in sent and b"Keep-Alive" not in sent
        assert sent[b"X-Forwarded-For"] == b"1.2.3.4, 10.0.0.1"
        assert sent[b"Accept"] == b"*/*"
    assert len(plan.kinds) == 1024
