"""WebSocket relay (SPEC §6): frames both ways, close codes passed on, closed at `exp`.

    if is_websocket(request):
        return await relay(request, clients, upstream, target, headers, expires_in, traffic)

The handshake was authenticated like any request before this runs. The upstream side is an
aiohttp client WebSocket on a session per upstream; when the token's `exp` + `leeway` passes,
both sides are closed with 1008 (policy violation).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Final

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from .config import Upstream
from .errors import Reason
from .forward import Traffic, UpstreamError
from .request import RequestHead

POLICY_VIOLATION: Final = 1008
# Handshake headers each side makes for itself, and the framing of a body the handshake
# upstream never has (a client's Content-Length would make the upstream read frames as body).
_NOT_FORWARDED: Final = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        "content-length",
        "transfer-encoding",
    }
)
# What aiohttp's client adds by itself; SPEC §6: the proxy adds nothing (a client's own ones
# are forwarded all the same).
_NOT_ADDED: Final = ("User-Agent", "Accept", "Accept-Encoding")


def is_websocket(head: RequestHead) -> bool:
    # `upgrade` is the parser's: `Connection: upgrade` with an `Upgrade` header, as a handshake
    # needs (RFC 6455 4.1). Read first, it spares other requests a header lookup (1k instructions).
    return (
        head.upgrade
        and head.method == "GET"
        and head.headers.get("Upgrade", "").lower() == "websocket"
    )


class WebSocketClients:
    """One aiohttp ClientSession per upstream, made on first use."""

    def __init__(self) -> None:
        self._sessions: dict[Upstream, aiohttp.ClientSession] = {}

    def session(self, upstream: Upstream) -> aiohttp.ClientSession:
        session = self._sessions.get(upstream)
        if session is None or session.closed:
            connector: aiohttp.BaseConnector
            if upstream.socket_path is not None:
                connector = aiohttp.UnixConnector(path=upstream.socket_path)
            else:
                context = ssl.create_default_context() if upstream.scheme == "https" else None
                if context is not None and upstream.ca_file:
                    context.load_verify_locations(upstream.ca_file)
                connector = aiohttp.TCPConnector(ssl=context if context is not None else False)
            session = aiohttp.ClientSession(
                connector=connector, skip_auto_headers=_NOT_ADDED, auto_decompress=False
            )
            self._sessions[upstream] = session
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


def upstream_url(upstream: Upstream, target: str) -> URL:
    """The handshake's URL, with `target` as it is (encoded: yarl would decode %41 to A)."""
    scheme = "wss" if upstream.scheme == "https" else "ws"
    return URL(f"{scheme}://{upstream.host_header}{upstream.base_path}{target}", encoded=True)


async def relay(
    request: web.BaseRequest,
    clients: WebSocketClients,
    upstream: Upstream,
    target: str,
    headers: list[tuple[bytes, bytes]],
    expires_in: float | None,
    traffic: Traffic,
) -> web.WebSocketResponse:
    """Open the upstream WebSocket, accept the client's, relay until one side closes.

    `headers` are the plan's (SPEC §6), Host included: aiohttp sends a given Host instead of
    the URL's, which is how `preserve_host` holds."""
    forwarded: CIMultiDict[str] = CIMultiDict()
    for name, value in headers:
        text = name.decode("latin-1")
        if text.lower() not in _NOT_FORWARDED:
            forwarded.add(text, value.decode("utf-8", "replace"))
    protocols = [
        p.strip()
        for line in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in line.split(",")
        if p.strip()
    ]
    timeout = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10)
    try:
        async with asyncio.timeout(upstream.connect_timeout + upstream.timeout):
            remote = await clients.session(upstream).ws_connect(
                upstream_url(upstream, target),
                headers=forwarded,
                protocols=protocols,
                timeout=timeout,
                autoping=True,
                max_msg_size=0,
            )
    except TimeoutError:
        raise UpstreamError(Reason.UPSTREAM_TIMEOUT, "WebSocket handshake timed out") from None
    except (aiohttp.ClientError, OSError) as error:
        raise UpstreamError(
            Reason.UPSTREAM_UNAVAILABLE, f"WebSocket handshake failed ({type(error).__name__})"
        ) from None
    local = web.WebSocketResponse(
        protocols=(remote.protocol,) if remote.protocol else (), max_msg_size=0
    )
    await local.prepare(request)
    traffic.status = local.status  # 101: logged even when the client's hang-up cancels us
    pair = _Pair(local, remote)
    expiry = None
    if expires_in is not None:
        expiry = asyncio.get_running_loop().call_later(max(0.0, expires_in), pair.expire)
    try:
        await asyncio.gather(pair.pump(local, remote), pair.pump(remote, local))
    finally:
        if expiry is not None:
            expiry.cancel()
        await pair.close_both(WSCloseCode.GOING_AWAY)
    return local


Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


class _Pair:
    """The two sides of one relay; a close code forced on both wins over what a side says."""

    def __init__(self, local: Socket, remote: Socket) -> None:
        self.local = local
        self.remote = remote
        self.forced: int | None = None
        self.closing: asyncio.Future[None] | None = None

    def expire(self) -> None:
        self.forced = POLICY_VIOLATION
        self.closing = asyncio.ensure_future(self.close_both(POLICY_VIOLATION))

    async def pump(self, source: Socket, sink: Socket) -> None:
        """Relay frames from one side to the other; pass the close code on."""
        async for message in source:
            if sink.closed:
                break
            with contextlib.suppress(ConnectionError):
                if message.type is WSMsgType.TEXT:
                    await sink.send_str(message.data)
                elif message.type is WSMsgType.BINARY:
                    await sink.send_bytes(message.data)
        if not sink.closed:
            code = self.forced or source.close_code or WSCloseCode.OK
            # shielded: the client hanging up right after its close frame cancels the handler
            with contextlib.suppress(ConnectionError):
                await asyncio.shield(sink.close(code=code))

    async def close_both(self, code: int) -> None:
        sides = [side for side in (self.remote, self.local) if not side.closed]
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await asyncio.gather(*(side.close(code=code) for side in sides))
