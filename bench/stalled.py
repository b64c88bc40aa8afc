"""Slowloris: how many stalled client connections one `token-proxy serve` process holds while
it still answers real requests, and whether `limits.header_timeout` then frees them all.

    python bench/stalled.py 2000 5000 10000      # one run per count, bounded (~1 min each)

Each stalled connection sends half a request head and then nothing. With them open, ten
real requests are timed; then the script waits out `header_timeout` (5 s here) and counts the
stalled connections the proxy closed. File limits are raised to the hard limit for the proxy
and for this script (which holds the client ends).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import yaml
from aiohttp import web

HEADER_TIMEOUT = 5


def raise_file_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss(pid: int) -> int:
    """A process's resident set, in KB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


async def real_request(port: int) -> float | None:
    """Seconds to a 200 for one ordinary request, or None when it failed or took over 5 s."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return None
    return time.monotonic() - started if answer.startswith(b"HTTP/1.1 200") else None


async def one_run(count: int, directory: Path) -> dict[str, object]:
    async def ok(_: web.BaseRequest) -> web.Response:
        return web.Response(text="ok")

    upstream = web.ServerRunner(web.Server(ok), access_log=None)
    await upstream.setup()
    upstream_port = free_port()
    await web.TCPSite(upstream, "127.0.0.1", upstream_port).start()
    port = free_port()
    config = directory / f"stalled-{count}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "admin_listen": None,
                "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
                "routes": [{"path": "/*", "auth": "none"}],
                "limits": {"header_timeout": HEADER_TIMEOUT},
                "log": {"access": False, "level": "error"},
            }
        )
    )
    proxy = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config),
        stdout=asyncio.subprocess.DEVNULL, preexec_fn=raise_file_limit,
    )  # fmt: skip
    try:
        for _ in range(100):
            if await real_request(port) is not None:
                break
            await asyncio.sleep(0.1)
        stalled: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(count):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                break
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Half: ")
            stalled.append((reader, writer))
        opened = len(stalled)
        opened_at = time.monotonic()  # the last one's header_timeout runs from here
        await asyncio.sleep(0.5)
        times = [await real_request(port) for _ in range(10)]
        answered = [t for t in times if t is not None]
        rss_kb = rss(proxy.pid)
        await asyncio.sleep(max(0.0, opened_at + HEADER_TIMEOUT + 3 - time.monotonic()))
        closed = 0
        for reader, writer in stalled:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(0.01):
                    await reader.read()  # the 408, then EOF
            if reader.at_eof():
                closed += 1
            writer.close()
        return {
            "stalled": count,
            "opened": opened,
            "real_requests_ok": f"{len(answered)}/10",
            "slowest_real_request_ms": round(max(answered) * 1000, 1) if answered else None,
            "proxy_rss_mb": round(rss_kb / 1024, 1),
            "closed_by_header_timeout": closed,
        }
    finally:
        proxy.terminate()
        await proxy.wait()
        await upstream.cleanup()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("counts", type=int, nargs="+")
    counts = parser.parse_args().counts
    raise_file_limit()
    with tempfile.TemporaryDirectory() as directory:
        for count in counts:
            print(await one_run(count, Path(directory)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    asyncio.run(main())
