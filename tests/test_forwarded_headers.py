"""Headers the proxy removes or sets on every forwarded request (SPEC §6).

seen = await forwarded(proxy, {"X-Original-URL": "/admin"})   # what the upstream got
assert "x-original-url" not in names(seen)
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import ProxyFactory, RunningProxy, parse_head, raw_exchange


async def forwarded(proxy: RunningProxy, headers: list[tuple[str, str]]) -> list[list[str]]:
    """The raw headers the echo upstream received for a GET carrying `headers` (raw bytes on
    the wire, so spellings and repeats a client library would fold reach the proxy)."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    raw = await raw_exchange(
        proxy.url, f"GET /x HTTP/1.1\r\nHost: a\r\n{lines}Connection: close\r\n\r\n".encode()
    )
    status, _, body = parse_head(raw)
    assert status == 200
    seen: Any = json.loads(body)
    return list(seen["raw_headers"])


def names(seen: list[list[str]]) -> list[str]:
    return [name.lower() for name, _ in seen]


@pytest.mark.parametrize(
    "name",
    ["X-Original-URL", "x-original-url", "X-Rewrite-URL", "X-REWRITE-URL", "X_Original_URL",
     "x_rewrite_url"],
)  # fmt: skip
async def test_rewrite_url_headers_never_reach_the_upstream(
    proxy_for: ProxyFactory, name: str
) -> None:
    """Defect: IIS and Symfony route by X-Original-URL / X-Rewrite-URL, so a client could name
    a path (/admin) the decision never saw; CGI-style servers read the `_` spelling alike."""
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    seen = await forwarded(proxy, [(name, "/admin/users"), ("X-Other", "kept")])
    assert ["X-Other", "kept"] in seen
    assert not any("original" in n or "rewrite" in n for n in names(seen))
