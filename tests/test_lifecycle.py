"""Operating it (SPEC §7): reload, drain, workers and readiness, on real subprocesses."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from tests.conftest import (
    OTHER_SECRET,
    SECRET,
    SECRET_B64,
    KeyFiles,
    free_port,
    mint,
    upstream_app,
    write_config,
)

OTHER_B64 = base64.b64encode(OTHER_SECRET).decode()


class Served:
    """`token-proxy serve` in a subprocess, its log lines collected as they come."""

    def __init__(self, directory: Path, data: dict[str, Any], workers: int = 1) -> None:
        self.port, self.admin = free_port(), free_port()
        self.data = {
            **data,
            "listen": f"127.0.0.1:{self.port}",
            "admin_listen": f"127.0.0.1:{self.admin}",
        }
        self.config = write_config(directory, self.data)
        self.workers = workers
        self.lines: list[dict[str, Any]] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rewrite(self, data: dict[str, Any] | str) -> None:
        if isinstance(data, str):
            self.config.write_text(data)
        else:
            listeners = {key: self.data[key] for key in ("listen", "admin_listen")}
            write_config(self.config.parent, {**data, **listeners})

    async def start(self, wait: bool = True) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(self.config),
            "--workers", str(self.workers),
            stdout=asyncio.subprocess.PIPE, env=os.environ.copy(),
        )  # fmt: skip
        self._reader = asyncio.ensure_future(self._read())
        if wait:
            await self.wait_ready()

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(json.loads(line))

    async def readyz(self) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.admin}/readyz") as response:
                return response.status

    async def wait_ready(self, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if await self.readyz() == 200:
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError("never ready")

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.admin}/metrics") as response:
                return await response.text()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_for_line(self, event: str, seconds: float = 10, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                    return line
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {event} line with {fields}")

    async def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 30)
        if self._reader is not None:
            await self._reader
        return code


@pytest.fixture
async def upstream_url() -> AsyncIterator[str]:
    runner = web.AppRunner(upstream_app(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def hs_config(upstream: str, secret_b64: str = SECRET_B64, **extra: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream},
        "apps": [{"id": "app-1", "match": {}, "algorithms": ["HS256"], "secrets": [secret_b64]}],
        "routes": [
            {"path": "/public/*", "auth": "none"},
            {"path": "/slow", "auth": "none"},
            {"path": "/*"},
        ],
        **extra,
    }


async def get(session: aiohttp.ClientSession, url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers) as response:
        await response.read()
        return response.status


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[list[Served]]:
    started: list[Served] = []
    yield started
    for process in started:
        if process.process is not None and process.process.returncode is None:
            process.process.kill()
            await process.process.wait()
        if process._reader is not None:
            await process._reader


async def test_reload_valid_then_invalid(
    tmp_path: Path, upstream_url: str, served: list[Served]
) -> None:
    proxy = Served(tmp_path, hs_config(upstream_url))
    served.append(proxy)
    await proxy.start()
    old, new = mint(SECRET, appId="app-1"), mint(OTHER_SECRET, appId="app-1")
    async with aiohttp.ClientSession() as session:
        assert await get(session, proxy.url + "/x", old) == 200
        proxy.rewrite(hs_config(upstream_url, OTHER_B64))
        proxy.signal(signal.SIGHUP)
        await proxy.wait_for_line("reload", result="ok")
        assert await get(session, proxy.url + "/x", new) == 200
        assert await get(session, proxy.url + "/x", old) == 401  # and the cache was emptied
        proxy.rewrite("apps: [\n  broken")
        proxy.signal(signal.SIGHUP)
        await proxy.wait_for_line("reload", result="error")
        proxy.rewrite({**hs_config(upstream_url), "listn": 1})
        proxy.signal(signal.SIGHUP)
        for _ in range(100):
            errors = [line for line in proxy.lines if line.get("result") == "error"]
            if len(errors) == 2:
                break
            await asyncio.sleep(0.05)
        assert any("listn: unknown key" in problem for problem in errors[1]["problems"])
        assert await get(session, proxy.url + "/x", new) == 200
        metrics = await proxy.metrics()
        assert 'token_proxy_reloads_total{result="ok"} 1.0' in metrics
        assert 'token_proxy_reloads_total{result="error"} 2.0' in metrics
    assert await proxy.stop() == 0
    assert not any(old in json.dumps(line) or new in json.dumps(line) for line in proxy.lines)


@pytest.mark.slow
async def test_reload_under_load_loses_no_request(
    tmp_path: Path, upstream_url: str, served: list[Served]
) -> None:
    proxy = Served(tmp_path, hs_config(upstream_url))
    served.append(proxy)
    await proxy.start()
    token = mint(SECRET, appId="app-1", ttl=600)
    statuses: list[int] = []

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in range(250):
            statuses.append(await get(session, proxy.url + "/x", token))

    async def reloader() -> None:
        for index in range(5):
            await asyncio.sleep(0.2)
            proxy.rewrite(hs_config(upstream_url, shutdown_timeout=10 + index))
            proxy.signal(signal.SIGHUP)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(8)), reloader())
    assert len(statuses) == 2000
    assert set(statuses) == {200}
    reloads = [line for line in proxy.lines if line.get("event") == "reload"]
    assert reloads
    assert all(line["result"] == "ok" for line in reloads)
    assert await proxy.stop() == 0


@pytest.mark.slow
async def test_drain_finishes_in_flight_and_refuses_new(
    tmp_path: Path, upstream_url: str, served: list[Served]
) -> None:
    proxy = Served(tmp_path, hs_config(upstream_url, shutdown_timeout=10))
    served.append(proxy)
    await proxy.start()
    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(get(session, proxy.url + "/slow?s=3"))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert await proxy.readyz() == 503
        with pytest.raises(aiohttp.ClientConnectorError):
            async with aiohttp.ClientSession() as fresh:
                await get(fresh, proxy.url + "/public/x")
        assert await slow == 200
    assert await proxy.stop() == 0
    assert time.monotonic() - started < 10
    assert [line["phase"] for line in proxy.lines if line["event"] == "shutdown"] == [
        "draining",
        "done",
    ]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


@pytest.mark.slow
async def test_workers_share_a_port_and_survive_a_crash(
    tmp_path: Path, upstream_url: str, served: list[Served]
) -> None:
    proxy = Served(tmp_path, hs_config(upstream_url), workers=2)
    served.append(proxy)
    await proxy.start()
    assert proxy.process is not None
    workers = children(proxy.process.pid)
    assert len(workers) == 2
    token = mint(SECRET, appId="app-1", ttl=600)
    count = 60
    for _ in range(count):  # a connection per request, so both workers get some
        async with aiohttp.ClientSession() as session:
            assert await get(session, proxy.url + "/x", token) == 200
    os.kill(workers[0], signal.SIGKILL)
    await asyncio.sleep(0.2)
    assert await proxy.readyz() == 503
    await proxy.wait_ready()
    replaced = children(proxy.process.pid)
    assert len(replaced) == 2
    assert workers[0] not in replaced
    metrics = await proxy.metrics()
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("token_proxy_requests_total{")
    )
    assert total == count
    assert metrics.count("token_proxy_build_info{") == 1
    assert "token_proxy_in_flight_requests 0.0" in metrics
    assert await proxy.stop() == 0
    for pid in replaced:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
async def test_readyz_waits_for_jwks(
    tmp_path: Path, upstream_url: str, served: list[Served], keys: KeyFiles
) -> None:
    document: dict[str, Any] = {"status": 503}

    async def jwks(_: web.Request) -> web.Response:
        if document["status"] != 200:
            return web.Response(status=document["status"])
        return web.json_response({"keys": [keys.jwk("rsa", kid="k")]})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        data = {
            "upstream": {"url": upstream_url},
            "apps": [{"id": "idp", "match": {}, "algorithms": ["RS256"],
                      "jwks_url": f"http://127.0.0.1:{port}/jwks"}],
        }  # fmt: skip
        proxy = Served(tmp_path, data)
        served.append(proxy)
        await proxy.start(wait=False)
        with pytest.raises(AssertionError, match="never ready"):
            await proxy.wait_ready(seconds=2)
        assert await proxy.readyz() == 503
        document["status"] = 200
        await proxy.wait_ready()
        assert await proxy.stop() == 0
    finally:
        await runner.cleanup()


async def test_invalid_config_exits_2_with_problems(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"upstream": {"url": "nope"}, "apps": []})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await process.communicate()
    assert process.returncode == 2
    assert f"{config}: upstream.url:" in err.decode()


@pytest.mark.parametrize("workers", [1, 2])
async def test_admin_answers_carry_server_header(
    tmp_path: Path, upstream_url: str, served: list[Served], workers: int
) -> None:
    """Defect: the admin listener said `Server: Python/3.11 aiohttp/3.14.5`."""
    proxy = Served(tmp_path, hs_config(upstream_url, server_header="edge-7"), workers=workers)
    served.append(proxy)
    await proxy.start()
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz", "/metrics", "/nothing-here"):
            async with session.get(f"http://127.0.0.1:{proxy.admin}{path}") as response:
                assert response.headers.getall("Server") == ["edge-7"], path
        async with session.get(f"{proxy.url}/public/x") as response:
            assert response.status == 200  # the upstream's own Server header, as it came
            assert response.headers.getall("Server") == [SERVER_SOFTWARE]
    assert await proxy.stop() == 0


@pytest.mark.parametrize("which", ["listen", "admin_listen"])
@pytest.mark.parametrize("workers", [1, 2])
async def test_a_busy_port_is_one_clear_line_and_exit_2(
    tmp_path: Path, upstream_url: str, which: str, workers: int
) -> None:
    """Defect: a busy admin port ended `serve` with a traceback and exit 1."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        listeners = {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
        }
        listeners[which] = f"127.0.0.1:{port}"
        config = write_config(tmp_path, {**hs_config(upstream_url), **listeners})
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(config),
            "--workers", str(workers),
            stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2, err.decode()
    lines = err.decode().splitlines()
    assert len(set(lines)) == 1, lines  # the same line from each worker, at most
    assert f"{which}: cannot listen on 127.0.0.1:{port}" in lines[0]
    assert "Traceback" not in err.decode()
