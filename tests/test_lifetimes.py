"""Connections, exchanges, upstream connections and old states die by refcount, not by the
collector: with `gc.set_threshold(20_000, 50, 100)` (runtime.py) a full collection is rare, so
what only a full collection frees piles up (the soak's RSS drift, bench/README.md "Soak").

    with gc disabled: forwarded and rejected requests over real connections, a cut-off head,
    closes, reloads; then nothing of theirs is left in gc.get_objects()
"""

from __future__ import annotations

import asyncio
import collections
import gc
from collections.abc import Iterator
from pathlib import Path

import httptools
import pytest

from proxy.app import Resources, State
from proxy.config import load
from proxy.exchange import Exchange
from proxy.forward import UpstreamConnection, UpstreamPool
from proxy.listener import Connection
from tests.conftest import BASE_APPS, ProxyFactory, RunningProxy, write_config

PARSERS = (
    type(httptools.HttpRequestParser(object())),
    type(httptools.HttpResponseParser(object())),
)
WATCHED = (Connection, Exchange, UpstreamConnection, UpstreamPool, State, *PARSERS)


def alive() -> dict[str, int]:
    """How many objects of each watched type exist (freed or not by refcount alone)."""
    counts: collections.Counter[str] = collections.Counter()
    for thing in gc.get_objects():
        if isinstance(thing, WATCHED):
            counts[type(thing).__name__] += 1
    return dict(counts)


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def request(port: int, token: str, count: int, status: int = 200) -> None:
    """`count` keep-alive requests on one connection, each answer read whole; then a close.
    No token (""): no Authorization header."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    for _ in range(count):
        writer.write(f"GET /x HTTP/1.1\r\nHost: a\r\n{auth}\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
    writer.close()
    await writer.wait_closed()


async def half_head(port: int) -> None:
    """A head cut off mid-way: the listener was parsing an exchange when the client left."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    await writer.wait_closed()


async def settled(expected: dict[str, int]) -> dict[str, int]:
    """The census once the closes have run (bounded wait)."""
    counts = alive()
    for _ in range(100):
        if counts == expected:
            break
        await asyncio.sleep(0.02)
        counts = alive()
    return counts


async def reload(proxy: RunningProxy, directory: Path, upstream_timeout: float) -> None:
    """Swap in a config whose upstream differs in its timeout: a new pool, the old retired
    (its idle connections closed), as the soak's reloads do."""
    upstream = {"url": proxy.config.upstream.url, "timeout": upstream_timeout}  # type: ignore[union-attr]
    data = {"upstream": upstream, "apps": BASE_APPS, "admin_listen": None}
    config = load(str(write_config(directory, data, f"reloaded-{upstream_timeout}.yaml")))
    resources: Resources = proxy.proxy.resources
    proxy.proxy.swap(await resources.prepare(config))


async def test_closed_connections_and_old_states_die_by_refcount(
    proxy_for: ProxyFactory, tmp_path: Path, no_collector: None
) -> None:
    proxy = await proxy_for({})
    port = int(proxy.url.rsplit(":", 1)[1])
    token = proxy.token()
    in_use = {"State": 1, "UpstreamPool": 1}  # nothing else: no connection, exchange, parser
    await asyncio.gather(
        *(request(port, token, 3) for _ in range(4)),
        request(port, token + "x", 3, 401),  # a Rejection raised and kept for the access line
        request(port, "", 3, 401),
        half_head(port),
    )
    await reload(proxy, tmp_path, 7)
    assert await settled(in_use) == in_use
    await request(port, token, 2)  # the new state serves; its connections go the same way
    await reload(proxy, tmp_path, 8)
    assert await settled(in_use) == in_use
