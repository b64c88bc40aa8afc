"""The aiohttp floor: aiohttp's low-level server answering 200 itself, on the product's loop.

    python bench/floor.py PORT

No proxying and no token check: the most any proxy served by aiohttp can do on this core.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

try:
    import uvloop
except ImportError:  # pragma: no cover - the product falls back the same way
    uvloop = None  # type: ignore[assignment]


async def handle(request: web.BaseRequest) -> web.Response:
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
