"""The WebSocket handshake goes upstream under SPEC §6's header rules.

    recorder = await handshake_recorder()        # a raw upstream: records each head, answers 101
    status = await client_handshake(proxy, [("Origin", "https://app.example")])
    head = recorder.heads[0]                      # (target, [(name, value), ...]) as received

The upstream is raw asyncio so the test sees the handshake bytes exactly as they arrive, with
nothing a framework adds or folds; the client is raw too, so nothing reaches the proxy that the
test did not write.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import ProxyFactory, RunningProxy, Upstream, parse_head, raw_exchange

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
CLOSE_1000 = b"\x88\x02\x03\xe8"  # a server's close frame, code 1000
pytestmark = pytest.mark.slow  # each handshake takes ~2 s


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())  # noqa: S324 (RFC 6455)


@dataclass
class Recorder:
    url: str = ""
    heads: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")[:-2]
            headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
            self.heads.append((lines[0].split(" ")[1], headers))
            key = next(v for n, v in headers if n.lower() == "sec-websocket-key").encode()
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_for(key) + b"\r\n\r\n"
            )
            writer.write(CLOSE_1000)  # the session ends at once: the handshake is the test
            await writer.drain()
            while await reader.read(4096):  # until the proxy hangs up
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    upstream = Recorder()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield upstream
    server.close()


async def client_handshake(
    proxy: RunningProxy, headers: list[tuple[str, str]], body: bytes = b"", target: str = "/ws"
) -> int:
    """A raw client handshake through the proxy; the status it got."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    raw = await raw_exchange(
        proxy.url,
        f"GET {target} HTTP/1.1\r\nHost: front.example\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{lines}\r\n".encode()
        + body,
        read_timeout=2,
    )
    return parse_head(raw)[0]


async def proxy_to(proxy_for: ProxyFactory, recorder: Recorder, **upstream: object) -> RunningProxy:
    return await proxy_for(
        {"upstream": {"url": recorder.url, **upstream}, "routes": [{"path": "/*", "auth": "none"}]}
    )


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [name.lower() for name, _ in headers]


async def test_handshake_upstream_adds_nothing(proxy_for: ProxyFactory, recorder: Recorder) -> None:
    """Defect: aiohttp's ws_connect added Accept and Accept-Encoding to the handshake."""
    proxy = await proxy_to(proxy_for, recorder)
    status = await client_handshake(proxy, [("Origin", "https://app.example"), ("X-Mine", "1")])
    assert status == 101
    [(target, headers)] = recorder.heads
    assert target == "/ws"
    sent = names(headers)
    for added in ("accept", "accept-encoding", "user-agent", "content-length"):
        assert added not in sent
    assert ("Origin", "https://app.example") in headers
    assert ("X-Mine", "1") in headers
    assert dict(headers)["Host"] == recorder.url.split("//")[1]
    assert dict(headers)["X-Forwarded-Host"] == "front.example"


async def test_handshake_keeps_the_clients_own_accept_headers(
    proxy_for: ProxyFactory, recorder: Recorder
) -> None:
    proxy = await proxy_to(proxy_for, recorder)
    mine = [("Accept", "text/x-mine"), ("Accept-Encoding", "identity"), ("User-Agent", "me/1")]
    assert await client_handshake(proxy, mine) == 101
    [(_, headers)] = recorder.heads
    for name, value in mine:
        assert [v for n, v in headers if n.lower() == name.lower()] == [value]


async def test_handshake_honours_preserve_host(proxy_for: ProxyFactory, recorder: Recorder) -> None:
    """Defect: the handshake always named the upstream's host, whatever `preserve_host`."""
    proxy = await proxy_to(proxy_for, recorder, preserve_host=True)
    assert await client_handshake(proxy, []) == 101
    [(_, headers)] = recorder.heads
    assert [v for n, v in headers if n.lower() == "host"] == ["front.example"]


async def test_handshake_sends_no_content_length_it_has_no_body_for(
    proxy_for: ProxyFactory, recorder: Recorder
) -> None:
    """Defect: a client's Content-Length went upstream on a handshake sent without a body, so
    the upstream would read the first frames as that body."""
    proxy = await proxy_to(proxy_for, recorder)
    assert await client_handshake(proxy, [("Content-Length", "5")], body=b"hello") == 101
    [(_, headers)] = recorder.heads
    assert "content-length" not in names(headers)
    assert "transfer-encoding" not in names(headers)


async def test_handshake_target_goes_upstream_as_plain_requests_do(
    proxy_for: ProxyFactory, recorder: Recorder, upstream: Upstream
) -> None:
    """The path is not normalised again on the way (yarl would decode %41 to A)."""
    proxy = await proxy_to(proxy_for, recorder)
    target = "/ws/a%41b%20c~d?q=%41&r=x+y"
    assert await client_handshake(proxy, [], target=target) == 101
    plain = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    raw = await raw_exchange(
        plain.url, f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    assert recorder.heads[0][0] == json.loads(parse_head(raw)[2])["target"]
