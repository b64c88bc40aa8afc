"""Bodies stream with bounded memory: 200 MB up and down grow the proxy's RSS by under 20 MB."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import free_port, upstream_app, write_config

SIZE = 200 * 1024 * 1024
LIMIT = 20 * 1024 * 1024
pytestmark = pytest.mark.slow  # 400 MB through a subprocess


def rss(pid: int, field: str) -> int:
    """A memory figure of a process, in bytes (VmRSS now, VmHWM peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


async def body() -> AsyncIterator[bytes]:
    chunk = b"m" * (256 * 1024)
    for _ in range(SIZE // len(chunk)):
        yield chunk


async def test_streaming_keeps_rss_flat(tmp_path: Path) -> None:
    runner = web.AppRunner(upstream_app(), access_log=None)
    await runner.setup()
    upstream_port, port, admin = free_port(), free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    config = write_config(
        tmp_path,
        {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin}",
            "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
            "routes": [{"path": "/*", "auth": "none"}],
            "log": {"access": False},
        },
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(config),
        stdout=subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{admin}/readyz") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            async with session.post(f"http://127.0.0.1:{port}/upload", data=b"warm") as warm:
                await warm.read()
            baseline = rss(process.pid, "VmRSS")
            async with session.post(f"http://127.0.0.1:{port}/upload", data=body()) as up:
                assert await up.json() == {"received": SIZE}
            url = f"http://127.0.0.1:{port}/download?bytes={SIZE}"
            async with session.get(url) as down:
                received = 0
                async for chunk in down.content.iter_chunked(1 << 20):
                    received += len(chunk)
            assert received == SIZE
            peak = rss(process.pid, "VmHWM")
        assert peak - baseline < LIMIT, f"RSS grew by {(peak - baseline) / 1e6:.1f} MB"
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
        await runner.cleanup()
