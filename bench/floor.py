"""The aiohttp floor: aiohttp's low-level server answering 200 itself, on the product's loop.

    python bench/floor.py PORT

No proxying and no token check: the most any proxy served by aiohttp can do on this core.
It also serves the streaming measurement: POST /upload reads a body, GET /big sends 1 GB.
"""

from __future__ import annotations

import asyncio
import sys

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


async def main(port: int) -> None:
    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    port = int(sys.argv[1])
    if uvloop is not None:
        uvloop.run(main(port))
    else:
        asyncio.run(main(port))
