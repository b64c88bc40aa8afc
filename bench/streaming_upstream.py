"""The upstream of the streaming measurement (bench/run.py): aiohttp's low-level server.

    python bench/streaming_upstream.py PORT

POST /upload reads a body and answers its length (nginx cannot count a chunked body back),
GET /big sends 1 GB; anything else answers "ok".
"""

from __future__ import annotations

import argparse
import asyncio

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
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    if uvloop is not None:
        uvloop.run(main(args.port))
    else:
        asyncio.run(main(args.port))
