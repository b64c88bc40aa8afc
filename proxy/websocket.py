"""WebSocket relay (SPEC §6): the handshake forwarded, bytes both ways, closed at `exp`.

    if is_websocket(method, headers):
        await Tunnel(exchange, client, upstream, tls).run(handshake_head, expires_in)

The handshake was authenticated like any request before this runs. It goes upstream on a
connection of its own; only an upstream's 101 is relayed, any other answer ends the upgrade
with the contract's 502 (never a raw tunnel to something that did not agree to one). After the
101 the bytes go both ways as they come; the frames' boundaries are followed (headers read,
payloads skipped, never unmasked) so that, when the token's `exp` + `leeway` passes, a close
frame with 1008 (policy violation) goes to both sides between two frames.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import TYPE_CHECKING, Any, Final

import httptools

from .config import Upstream
from .errors import Reason

if TYPE_CHECKING:
    from .exchange import Exchange
    from .listener import Connection
    from .model import Headers

POLICY_VIOLATION: Final = 1008
_CLOSE_1008: Final = b"\x88\x02\x03\xf0"  # a server's close frame: unmasked
_LINGER: Final = 2.0  # seconds both sides get to answer the close frame


def is_websocket(method: str, headers: Headers | None) -> bool:
    """A WebSocket handshake (RFC 6455 §4.1); the parser saw `Connection: upgrade`."""
    return (
        method == "GET"
        and headers is not None
        and headers.get("Upgrade", "").lower() == "websocket"
    )


def _masked_close() -> bytes:
    """A client's close frame with 1008: masked, as RFC 6455 §5.3 demands of clients."""
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i] for i, b in enumerate(b"\x03\xf0"))
    return b"\x88\x82" + mask + payload


class _Frames:
    """Where frames end in one direction's bytes."""

    __slots__ = ("head", "left")

    def __init__(self) -> None:
        self.head = b""  # a frame header's first bytes, when a read ended inside it
        self.left = 0  # payload bytes of the current frame still to come

    @property
    def between(self) -> bool:
        return not self.head and not self.left

    def walk(self, data: bytes, stop: bool) -> int:
        """Follow `data`; with `stop`, the offset just after the first frame that ends in it
        (-1: none)."""
        i, n = 0, len(data)
        while i < n:
            if self.left:
                step = min(self.left, n - i)
                self.left -= step
                i += step
                if stop and not self.left:
                    return i
                continue
            known = len(self.head)
            buf = self.head + data[i : i + 14 - known]
            if len(buf) < 2:
                self.head = buf
                return -1
            code = buf[1] & 0x7F
            size = 2 + (2 if code == 126 else 8 if code == 127 else 0) + (4 if buf[1] & 0x80 else 0)
            if len(buf) < size:
                self.head = buf
                return -1
            if code == 126:
                length = int.from_bytes(buf[2:4], "big")
            elif code == 127:
                length = int.from_bytes(buf[2:10], "big")
            else:
                length = code
            self.head = b""
            i += size - known
            self.left = length
            if stop and not length:
                return i
        return -1


class _UpstreamSide(asyncio.Protocol):
    """The tunnel's upstream connection: the handshake answer's head, then bytes."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.parser: Any = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.status = 0
        self.head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.open = False  # the 101 came: bytes from now on

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.open:
            self.tunnel.from_upstream(data)
            return
        if self.head.done():
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.open = True
            self.head.set_result(data[upgrade.args[0] :])
        except httptools.HttpParserError as error:
            self.head.set_exception(ConnectionError(f"invalid answer ({type(error).__name__})"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionResetError("upstream closed the connection"))
        self.tunnel.upstream_lost()

    def pause_writing(self) -> None:
        self.tunnel.client.hold(8)

    def resume_writing(self) -> None:
        self.tunnel.client.release(8)

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status != 101 and not self.head.done():
            self.head.set_result(b"")


class Tunnel:
    """One WebSocket after its handshake: bytes both ways until a side closes."""

    def __init__(
        self,
        exchange: Exchange,
        client: Connection,
        upstream: Upstream,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.exchange = exchange
        self.client = client
        self.upstream = upstream
        self.tls = tls
        self.side: _UpstreamSide | None = None
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.to_client = _Frames()
        self.to_upstream = _Frames()
        self.cut_client = False  # at the next frame end towards the client: close frame
        self.cut_upstream = False
        self.closed_client = False  # the close frame went: nothing more that way
        self.closed_upstream = False

    async def run(self, head: bytes, expires_in: float | None) -> None:
        """Connect, relay the handshake, then bytes both ways until a side ends the tunnel."""
        self.client.hold(8)  # frames wait for the upstream
        side = await self._connect()
        if side is None:
            return
        self.side = side
        assert side.transport is not None  # noqa: S101 - set by connection_made
        rest = await self._handshake(side, side.transport, head)
        if rest is None:
            return
        self._switch(side, rest)
        expiry = None
        if expires_in is not None:
            expiry = asyncio.get_running_loop().call_later(max(0.0, expires_in), self.expire)
        try:
            await self.ended
        finally:
            if expiry is not None:
                expiry.cancel()
            side.transport.close()
        self.exchange.answer_done()

    async def _connect(self) -> _UpstreamSide | None:
        """The tunnel's own upstream connection; None once a failure was answered (502/504)."""
        exchange, up = self.exchange, self.upstream
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(up.connect_timeout):
                if up.socket_path is not None:
                    _, side = await loop.create_unix_connection(
                        lambda: _UpstreamSide(self), up.socket_path
                    )
                else:
                    _, side = await loop.create_connection(
                        lambda: _UpstreamSide(self),
                        host=up.host,
                        port=up.port,
                        ssl=self.tls,
                        server_hostname=up.host if self.tls else None,
                    )
        except TimeoutError:
            exchange.upstream_failed(Reason.UPSTREAM_TIMEOUT, "WebSocket connect timed out")
            return None
        except (OSError, ssl.SSLError) as error:
            exchange.upstream_failed(
                Reason.UPSTREAM_UNAVAILABLE, f"WebSocket connect failed ({type(error).__name__})"
            )
            return None
        return side

    async def _handshake(
        self, side: _UpstreamSide, transport: asyncio.Transport, head: bytes
    ) -> bytes | None:
        """The handshake upstream and its answer: the bytes after a 101's head, or None once
        any other answer (or none in time) was answered with the contract's 502/504."""
        exchange = self.exchange
        try:
            transport.write(head)
            async with asyncio.timeout(self.upstream.timeout):
                rest = await side.head
        except TimeoutError:
            transport.close()
            exchange.upstream_failed(Reason.UPSTREAM_TIMEOUT, "WebSocket handshake timed out")
            return None
        except ConnectionError as error:
            transport.close()
            exchange.upstream_failed(
                Reason.UPSTREAM_UNAVAILABLE, f"WebSocket handshake failed ({type(error).__name__})"
            )
            return None
        if side.status != 101:
            transport.close()
            exchange.upstream_failed(
                Reason.UPSTREAM_UNAVAILABLE, f"the upstream answered the handshake {side.status}"
            )
            return None
        return rest

    def _switch(self, side: _UpstreamSide, rest: bytes) -> None:
        """The 101 to the client, then what either side sent early; the client reads again."""
        exchange, client = self.exchange, self.client
        rid_name = client.proxy.state.config.forward.request_id_header
        lines = [b"HTTP/1.1 101 " + (side.reason or b"Switching Protocols")]
        lines += [name + b": " + value for name, value in side.headers]
        lines.append(f"{rid_name}: {exchange.rid}\r\n".encode())
        exchange.status = 101
        exchange.keep_alive = False
        client.write(b"\r\n".join(lines) + b"\r\n")
        client.tunnel = self
        exchange.upstream_seconds = 0.0
        if rest:
            self.from_upstream(rest)
        pending = client.pending_frames
        client.pending_frames = b""
        if pending:
            self.from_client(pending)
        client.release(8)

    def from_client(self, data: bytes) -> None:
        side = self.side
        if self.closed_upstream or side is None or side.transport is None:
            return
        if self.cut_upstream:
            end = self.to_upstream.walk(data, stop=True)
            if end < 0:
                side.transport.write(data)
                return
            side.transport.write(data[:end] + _masked_close())
            self.closed_upstream = True
            return
        self.to_upstream.walk(data, stop=False)
        side.transport.write(data)

    def from_upstream(self, data: bytes) -> None:
        if self.closed_client:
            return
        if self.cut_client:
            end = self.to_client.walk(data, stop=True)
            if end < 0:
                self.client.write(data)
                return
            self.client.write(data[:end] + _CLOSE_1008)
            self.closed_client = True
            return
        self.to_client.walk(data, stop=False)
        self.client.write(data)

    def expire(self) -> None:
        """exp + leeway passed: 1008 to both sides between frames, then close."""
        side = self.side
        if self.to_client.between:
            self.client.write(_CLOSE_1008)
            self.closed_client = True
        else:
            self.cut_client = True
        if self.to_upstream.between and side is not None and side.transport is not None:
            side.transport.write(_masked_close())
            self.closed_upstream = True
        else:
            self.cut_upstream = True
        asyncio.get_running_loop().call_later(_LINGER, self.end)

    def client_writable(self, writable: bool) -> None:
        side = self.side
        if side is not None and side.transport is not None:
            if writable:
                side.transport.resume_reading()
            else:
                side.transport.pause_reading()

    def client_lost(self) -> None:
        self.end()

    def upstream_lost(self) -> None:
        if self.client.tunnel is self:
            self.client.close()
        self.end()

    def end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)
        self.client.close()
