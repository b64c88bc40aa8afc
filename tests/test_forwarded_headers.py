"""Headers the proxy removes or sets on every forwarded request (SPEC §6).

seen = await forwarded(proxy, {"X-Original-URL": "/admin"})   # what the upstream got
assert "x-original-url" not in names(seen)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ProxyFactory, RunningProxy, parse_head, raw_exchange
from tests.test_config import BASE, problems


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


@pytest.mark.parametrize(
    "incoming",
    [
        pytest.param([], id="none"),
        pytest.param([("X-Real-IP", "10.9.9.9")], id="spoofed"),
        pytest.param([("x-real-ip", "10.9.9.9"), ("X-Real-Ip", "10.8.8.8")], id="twice"),
        pytest.param([("X_Real_IP", "10.9.9.9")], id="underscore"),
        pytest.param([("Connection", "X-Real-IP")], id="listed-in-connection"),
    ],
)
async def test_x_real_ip_is_the_peer_address(
    proxy_for: ProxyFactory, incoming: list[tuple[str, str]]
) -> None:
    """Defect: a client's own X-Real-IP passed through, so an upstream that logs or rate-limits
    by it believed whatever the client said."""
    proxy = await proxy_for({"routes": [{"path": "/*", "auth": "none"}]})
    seen = await forwarded(proxy, incoming)
    real = [value for name, value in seen if name.lower().replace("_", "-") == "x-real-ip"]
    assert real == ["127.0.0.1"]


@pytest.mark.parametrize("name", ["X-Real-IP", "x_real_ip"])
def test_x_real_ip_cannot_be_an_identity_header(tmp_path: Path, name: str) -> None:
    """The proxy sets it from the peer: an identity header of that name would send two."""
    config = {**BASE, "forward": {"identity_headers": {name: "sub"}}}
    assert any(
        f"forward.identity_headers.{name}" in line and "manages" in line
        for line in problems(tmp_path, config)
    )
