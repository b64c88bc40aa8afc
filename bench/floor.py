"""The aiohttp floor: aiohttp's low-level server answering 200 itself, on the product's loop.

    python bench/floor.py PORT
    python bench/floor.py PORT --forward URL --client pool|session

No proxying and no token check: the most any proxy served by aiohttp can do on this core.
It also serves the streaming measurement: POST /upload reads a body, GET /big sends 1 GB.
With `--forward`, every request becomes a fixed GET to URL, through the product's upstream
pool or through aiohttp's `ClientSession`, and the upstream's body is answered: the cost of
each upstream client on its own (bench/callgrind.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

try:
    import uvloop
except ImportError:  # pragma: no cover - the product falls back the same way
    uvloop = None  # type: ignore[assignment]


CHUNK = b"d" * (1 << 20)


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    if request.path == "/upload":  # the streaming measurement's upstream: read it all
        received = 0
        async for chunk in request.content.iter_any():
            received += len(chunk)
        return web.Response(text=str(received))
    if request.path == "/big":  # ... and 1 GB back
        response = web.StreamResponse()
        response.content_length = 1 << 30
        await response.prepare(request)
        for _ in range(1 << 10):
            await response.write(CHUNK)
        await response.write_eof()
        return response
    return web.Response(text="ok")


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def forwarder(url: str, client: str) -> Handler:
    """A handler that sends one fixed GET to `url` per request and answers its body."""
    from yarl import URL

    target = URL(url)
    if client == "session":
        import aiohttp

        session: aiohttp.ClientSession | None = None

        async def via_session(request: web.BaseRequest) -> web.StreamResponse:
            nonlocal session
            session = session or aiohttp.ClientSession(  # needs the running loop
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=512),
            )
            async with session.get(target / "x") as response:
                return web.Response(body=await response.read())

        return via_session

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from proxy.config import Upstream
    from proxy.forward import UpstreamPool

    assert target.host is not None
    assert target.port is not None
    upstream = Upstream(
        name="", url=url, scheme="http", host=target.host, port=target.port,
        socket_path=None, base_path="", host_header=f"{target.host}:{target.port}",
        connect_timeout=5.0, timeout=60.0, max_connections=512, preserve_host=False,
        ca_file=None,
    )  # fmt: skip
    pool: UpstreamPool | None = None
    head = f"GET /x HTTP/1.1\r\nHost: {upstream.host_header}\r\n\r\n".encode()

    async def via_pool(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal pool
        pool = pool or UpstreamPool(upstream)  # needs the running loop
        response = await pool.send(head)
        try:
            if response.complete:
                body = response.buffered_body()
            else:
                chunks = []
                while (chunk := await response.next_chunk()) is not None:
                    chunks.append(chunk)
                body = b"".join(chunks)
        finally:
            response.release()
        return web.Response(body=body)

    return via_pool


async def main(port: int, handler: Handler) -> None:
    server = web.Server(handler, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--forward", metavar="URL")
    parser.add_argument("--client", choices=("pool", "session"), default="pool")
    args = parser.parse_args()
    handler = forwarder(args.forward, args.client) if args.forward else handle
    if uvloop is not None:
        uvloop.run(main(args.port, handler))
    else:
        asyncio.run(main(args.port, handler))
