"""Authorization mode (SPEC §10): token-proxy answers a gateway's auth subrequests.

Real gateways, not mocks: NGINX (`auth_request`) and Caddy (`forward_auth`) run the recipes in
config/gateways/ (the files the README shows, ports substituted) in front of a real upstream,
with token-proxy in authorize mode; then the subrequest contract itself, as Envoy and Traefik
send it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from tests.conftest import (
    BASE_APPS,
    OTHER_SECRET,
    SECRET_B64,
    ProxyFactory,
    RunningProxy,
    Upstream,
    free_port,
    mint,
    raw_exchange,
)
from tests.nginx import main_conf, run_nginx

ROOT = Path(__file__).resolve().parent.parent
GATEWAYS = ROOT / "config" / "gateways"
CADDY = shutil.which("caddy") or ("/usr/bin/caddy" if os.path.exists("/usr/bin/caddy") else None)

APPS = [*BASE_APPS, {"id": "app-2", "algorithms": ["HS256"], "secrets": [SECRET_B64]}]
ROUTES = [
    {"path": "/public/*", "auth": "none"},
    {"path": "/v1/users/{userId}/*", "bind": {"userId": "path.userId"}},
    {"path": "/partner/*", "apps": ["app-2"]},
    {"path": "/scoped/*", "scopes": ["threads:write"]},
    {"path": "/admin/*", "claims": {"roles": ["admin", "ops"]}},
    {"path": "/reports", "methods": ["GET"]},
    {"path": "/*"},
]
AUTHORIZE = {"mode": "authorize", "upstream": None, "apps": APPS, "routes": ROUTES}

REQUIRED = 'Bearer realm="api"'
INVALID = 'Bearer realm="api", error="invalid_token", error_description="The token is invalid."'
EXPIRED = 'Bearer realm="api", error="invalid_token", error_description="The token has expired."'
FORBIDDEN = (
    'Bearer realm="api", error="insufficient_scope", '
    'error_description="The token does not allow this request."'
)


# --- The gateways, started from the recipe files ----------------------------------------------


def recipe(name: str, gateway: int, proxy: str, upstream: str) -> str:
    """A recipe file with its example addresses replaced by the test's."""
    text = (GATEWAYS / name).read_text()
    listen = "listen 80;" if name == "nginx.conf" else ":80 {"
    for example, actual in (
        ("127.0.0.1:8080", proxy),
        ("127.0.0.1:9000", upstream),
        (listen, f"listen 127.0.0.1:{gateway};" if name == "nginx.conf" else f":{gateway} {{"),
    ):
        assert example in text, example
        text = text.replace(example, actual)
    return text


def _wait_for(port: int, process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                tail = log.read_text()[-800:] if log.exists() else ""
                raise RuntimeError(f"{what} did not start: {tail}") from None
            time.sleep(0.05)


@dataclass
class Gateway:
    name: str
    url: str
    proxy: RunningProxy
    upstream: Upstream
    session: aiohttp.ClientSession

    async def request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        url = URL(self.url + path, encoded=True)
        return await self.session.request(method, url, headers=sent, allow_redirects=False)


def start_caddy(directory: Path, caddyfile: str, port: int) -> subprocess.Popen[bytes]:
    if CADDY is None:
        raise FileNotFoundError("caddy is not installed (.ci/run installs Debian's package)")
    (directory / "site.caddy").write_text(caddyfile)
    # the test's own global options, then the recipe as it is
    (directory / "Caddyfile").write_text("{\n\tadmin off\n}\nimport site.caddy\n")
    log = directory / "caddy.log"
    env = {**os.environ, "HOME": str(directory), "XDG_DATA_HOME": str(directory),
           "XDG_CONFIG_HOME": str(directory)}  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            [CADDY, "run", "--config", str(directory / "Caddyfile"), "--adapter", "caddyfile"],
            cwd=directory, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    _wait_for(port, process, log, "caddy")
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(params=["nginx", "caddy"])
async def gateway(
    request: pytest.FixtureRequest,
    proxy_for: ProxyFactory,
    upstream: Upstream,
    tmp_path: Path,
) -> AsyncIterator[Gateway]:
    proxy = await proxy_for(AUTHORIZE)
    port = free_port()
    proxy_address = proxy.url.split("//", 1)[1]
    upstream_address = upstream.url.split("//", 1)[1]
    process: subprocess.Popen[bytes]
    if request.param == "nginx":
        conf = recipe("nginx.conf", port, proxy_address, upstream_address)
        nginx = run_nginx(tmp_path, port, main_conf(tmp_path, conf))
        process = nginx.process
    else:
        conf = recipe("Caddyfile", port, proxy_address, upstream_address)
        process = start_caddy(tmp_path, conf, port)
    session = aiohttp.ClientSession(auto_decompress=False)
    try:
        yield Gateway(request.param, f"http://127.0.0.1:{port}", proxy, upstream, session)
    finally:
        await session.close()
        stop(process)


async def assert_rejected(
    response: aiohttp.ClientResponse,
    status: int,
    code: int,
    reason: str,
    challenge: str | None,
) -> None:
    """The §5 answer, as token-proxy made it, came through the gateway."""
    assert response.status == status, await response.text()
    body = json.loads(await response.read())
    assert body["error"]["code"] == code
    assert body["error"]["reason"] == reason
    assert response.headers.get("Content-Type", "").startswith("application/json")
    assert response.headers.getall("WWW-Authenticate", []) == ([challenge] if challenge else [])
    assert len(response.headers.getall("X-Request-Id")) == 1


# --- Through the real gateways ----------------------------------------------------------------


async def test_allowed_request_reaches_upstream_with_identity(gateway: Gateway) -> None:
    token = gateway.proxy.token(userId="42", sub="user-42")
    response = await gateway.request("POST", "/v1/users/42/threads?limit=5", token)
    assert response.status == 200, await response.text()
    seen = gateway.upstream.seen[-1]
    assert seen["method"] == "POST"
    assert seen["target"] == "/v1/users/42/threads?limit=5"
    headers = CIMultiDict(seen["raw_headers"])
    assert headers.getall("X-Auth-User-Id") == ["42"]
    assert headers.getall("X-Auth-App-Id") == ["app-1"]
    assert headers.getall("X-Auth-Subject") == ["user-42"]
    assert "X-Auth-Actor" not in headers, seen["raw_headers"]  # absent claim: no header
    # the decision was about the client's request, and counted as proxy mode counts
    line = next(x for x in gateway.proxy.log_lines() if x["event"] == "request")
    assert (line["method"], line["path"], line["outcome"]) == (
        "POST",
        "/v1/users/42/threads",
        "forwarded",
    )
    assert 'outcome="forwarded"' in gateway.proxy.metrics_text()
    assert headers.getall("X-Request-Id") == [line["request_id"]]  # one id in both logs


async def test_a_route_without_auth_passes_without_a_token(gateway: Gateway) -> None:
    response = await gateway.request("GET", "/public/page")
    assert response.status == 200
    assert gateway.upstream.seen[-1]["target"] == "/public/page"


@pytest.mark.parametrize(
    ("path", "claims", "status", "code", "reason", "challenge"),
    [
        pytest.param("/v1/users/42/x", None, 401, 39, "missing", REQUIRED, id="missing"),
        pytest.param("/v1/users/42/x", {"userId": "42", "ttl": -120}, 401, 40, "expired", EXPIRED,
                     id="expired"),
        pytest.param("/v1/users/42/x", {"userId": "42", "secret": OTHER_SECRET}, 401, 38,
                     "bad_signature", INVALID, id="bad-signature"),
        pytest.param("/v1/users/42/x", {"userId": "7"}, 403, 38, "binding_mismatch", FORBIDDEN,
                     id="binding"),
        pytest.param("/partner/x", {}, 403, 38, "app_not_allowed", FORBIDDEN, id="app"),
        pytest.param("/scoped/x", {"scope": "threads:read"}, 403, 38, "insufficient_scope",
                     FORBIDDEN, id="scope"),
        pytest.param("/admin/x", {"roles": ["user"]}, 403, 38, "route_claim_mismatch", FORBIDDEN,
                     id="claim"),
    ],
)  # fmt: skip
async def test_each_rejection_comes_through_with_body_and_challenge(
    gateway: Gateway,
    path: str,
    claims: dict[str, Any] | None,
    status: int,
    code: int,
    reason: str,
    challenge: str,
) -> None:
    token = None if claims is None else gateway.proxy.token(**claims)
    response = await gateway.request("GET", path, token)
    await assert_rejected(response, status, code, reason, challenge)
    assert gateway.upstream.seen == []


async def test_method_not_allowed_comes_through_with_allow(gateway: Gateway) -> None:
    response = await gateway.request("DELETE", "/reports", gateway.proxy.token())
    await assert_rejected(response, 405, 405, "method_not_allowed", None)
    assert response.headers["Allow"] == "GET"
    assert gateway.upstream.seen == []


async def test_client_cannot_choose_the_request_asked_about(gateway: Gateway) -> None:
    # a request for a protected path, dressed as one for a public path
    lies = {
        "X-Forwarded-Uri": "/public/page",
        "X-Original-URI": "/public/page",
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Host": "elsewhere.example",
    }
    response = await gateway.request("POST", "/admin/delete-all", headers=lies)
    await assert_rejected(response, 401, 39, "missing", 'Bearer realm="api"')
    token = gateway.proxy.token(roles=["user"])
    response = await gateway.request("POST", "/admin/delete-all", token, headers=lies)
    await assert_rejected(response, 403, 38, "route_claim_mismatch", FORBIDDEN)
    assert gateway.upstream.seen == []


async def test_client_cannot_pass_its_own_identity_headers(gateway: Gateway) -> None:
    forged = {"X-Auth-User-Id": "admin", "X-Auth-Actor": "root", "X-Auth-App-Id": "app-2"}
    token = gateway.proxy.token(userId="42")
    response = await gateway.request("GET", "/v1/users/42/x", token, headers=forged)
    assert response.status == 200
    headers = CIMultiDict(gateway.upstream.seen[-1]["raw_headers"])
    assert headers.getall("X-Auth-User-Id") == ["42"]
    assert headers.getall("X-Auth-App-Id") == ["app-1"]
    assert "X-Auth-Actor" not in headers
    # without a token (a route without auth), none of them arrive at all
    response = await gateway.request("GET", "/public/page", headers=forged)
    assert response.status == 200
    names = {name.lower() for name, _ in gateway.upstream.seen[-1]["raw_headers"]}
    assert not {n for n in names if n.replace("_", "-").startswith("x-auth-")}


async def test_cgi_spelling_of_identity_headers_does_not_pass(gateway: Gateway) -> None:
    raw = (
        f"GET /public/page HTTP/1.1\r\nHost: {gateway.url.split('//')[1]}\r\n"
        "X_Auth_User_Id: admin\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = await raw_exchange(gateway.url, raw)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    names = {name.lower() for name, _ in gateway.upstream.seen[-1]["raw_headers"]}
    assert "x_auth_user_id" not in names


# --- The subrequest contract, as a gateway sends it -------------------------------------------


def asked(method: str, uri: str, host: str = "api.example") -> dict[str, str]:
    return {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, "X-Forwarded-Host": host}


async def test_allow_answer_is_empty_200_with_identity_headers(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(
        {**AUTHORIZE, "forward": {"claims_header": "X-Auth-Claims", "token": False}}
    )
    token = proxy.token(userId="42")
    response = await proxy.get("/", token, headers=asked("GET", "/v1/users/42/x"))
    assert response.status == 200
    assert await response.read() == b""
    assert response.headers["X-Auth-User-Id"] == "42"
    assert response.headers["X-Auth-App-Id"] == "app-1"
    assert response.headers["X-Auth-Claims"]
    assert response.headers["X-Request-Id"]
    assert response.headers["Server"] == "token-proxy"
    assert "X-Auth-Subject" not in response.headers  # absent claim: no header


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"X-Forwarded-Method": "GET", "X-Forwarded-Host": "h"}, id="no-uri"),
        pytest.param({"X-Forwarded-Uri": "/x", "X-Forwarded-Host": "h"}, id="no-method"),
        pytest.param({"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/x"}, id="no-host"),
        pytest.param({**asked("GET", "/x"), "X-Forwarded-Method": "GE T"}, id="bad-method"),
        pytest.param(asked("GET", "/a/%2e%2e/%2e%2e/x"), id="above-root"),
    ],
)
async def test_absent_or_bad_gateway_headers_are_bad_path(
    proxy_for: ProxyFactory, headers: dict[str, str]
) -> None:
    proxy = await proxy_for(AUTHORIZE)
    response = await proxy.get("/", proxy.token(), headers=headers)
    assert response.status == 400
    assert (await response.json())["error"]["reason"] == "bad_path"
    assert "WWW-Authenticate" not in response.headers
    line = next(x for x in proxy.log_lines() if x["event"] == "request")
    assert line["reason"] == "bad_path"


async def test_a_repeated_gateway_header_is_bad_path(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(AUTHORIZE)
    headers = CIMultiDict(asked("GET", "/public/x"))
    headers.add("X-Forwarded-Uri", "/admin/x")
    url = URL(proxy.url + "/", encoded=True)
    response = await proxy.session.get(url, headers=headers)
    assert response.status == 400
    assert (await response.json())["error"]["reason"] == "bad_path"


async def test_envoy_style_own_method_and_path_less_prefix(proxy_for: ProxyFactory) -> None:
    settings = {"method_header": None, "uri_header": None, "host_header": None,
                "strip_prefix": "/check"}  # fmt: skip
    proxy = await proxy_for({**AUTHORIZE, "authorize": settings})
    token = proxy.token(userId="42")
    response = await proxy.request("PUT", "/check/v1/users/42/x?y=1", token)
    assert response.status == 200
    assert response.headers["X-Auth-User-Id"] == "42"
    response = await proxy.request("PUT", "/check/v1/users/7/x", token)
    assert response.status == 403
    response = await proxy.request("DELETE", "/check/reports", token)
    assert response.status == 405
    for outside in ("/v1/users/42/x", "/checkv1/users/42/x"):
        response = await proxy.request("PUT", outside, token)
        assert response.status == 400, outside
        assert (await response.json())["error"]["reason"] == "bad_path"


async def test_query_token_and_binding_read_the_query_asked_about(
    proxy_for: ProxyFactory,
) -> None:
    routes = [{"path": "/ws", "sources": ["query:access_token"],
               "bind": {"userId": "query.user"}}]  # fmt: skip
    proxy = await proxy_for({**AUTHORIZE, "routes": routes})
    token = proxy.token(userId="42")
    response = await proxy.get("/", headers=asked("GET", f"/ws?user=42&access_token={token}"))
    assert response.status == 200
    assert response.headers["X-Auth-User-Id"] == "42"
    response = await proxy.get("/", headers=asked("GET", f"/ws?user=7&access_token={token}"))
    assert response.status == 403
    # the subrequest's own query is not the request asked about
    response = await proxy.get(f"/?access_token={token}", headers=asked("GET", "/ws?user=42"))
    assert response.status == 401


async def test_cors_preflight_passes_unless_the_asked_request_has_a_body(
    proxy_for: ProxyFactory,
) -> None:
    proxy = await proxy_for(AUTHORIZE)
    cors = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    response = await proxy.get("/", headers={**asked("OPTIONS", "/admin/x"), **cors})
    assert response.status == 200
    # a gateway passing the body (or its Content-Length) on: an OPTIONS with a body is no
    # preflight, so it needs a token like any request
    with_body = {**asked("OPTIONS", "/admin/x"), **cors}
    response = await proxy.request("GET", "/", headers=with_body, data=b"x")
    assert response.status == 401


async def test_absolute_form_asked_target_must_name_the_asked_host(
    proxy_for: ProxyFactory,
) -> None:
    proxy = await proxy_for(AUTHORIZE)
    same = asked("GET", "http://api.example/public/x", host="api.example")
    assert (await proxy.get("/", headers=same)).status == 200
    other = asked("GET", "http://evil.example/public/x", host="api.example")
    assert (await proxy.get("/", headers=other)).status == 400


async def test_token_service_still_answers_its_paths(proxy_for: ProxyFactory, keys: Any) -> None:
    service = {"issuer": "http://127.0.0.1", "signing_keys": [keys.path("ec.key")]}
    proxy = await proxy_for({**AUTHORIZE, "token_service": service})
    response = await proxy.get("/.well-known/jwks.json")
    assert response.status == 200
    assert (await response.json())["keys"]


async def test_serve_in_authorize_mode_ignores_a_given_upstream(tmp_path: Path) -> None:
    from tests.test_lifecycle import Served

    # an upstream nobody listens on: nothing is ever forwarded to it
    data = {**AUTHORIZE, "upstream": {"url": f"http://127.0.0.1:{free_port()}"}}
    served = Served(tmp_path, data)
    await served.start()
    try:
        start = await served.wait_for_line("start")
        assert start["mode"] == "authorize"
        assert "ignored" in start["note"]
        token = mint(appId="app-1", userId="42")
        async with aiohttp.ClientSession() as session:
            headers = {**asked("GET", "/v1/users/42/x"), "Authorization": f"Bearer {token}"}
            async with session.get(served.url + "/", headers=headers) as response:
                assert response.status == 200
                assert response.headers["X-Auth-User-Id"] == "42"
    finally:
        assert await served.stop() == 0


@pytest.mark.parametrize("name", ["nginx.conf", "Caddyfile"])
def test_readme_shows_the_recipes_the_tests_run(name: str) -> None:
    text = (GATEWAYS / name).read_text()
    assert text.rstrip("\n") + "\n```" in (ROOT / "README.md").read_text()
