"""Identity-provider discovery and per-app CA bundles (SPEC §11, §7, §3 `discovery_url`, `ca_file`).

A loopback IdP serves a discovery document and JWKS documents; the tests move the proxy's clock
by hand and start the IdP down, rotate its `jwks_uri`, change its issuer, and serve it over
https with a trustme CA.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from aiohttp import web

from proxy.keys import FetchError, HttpFetcher
from tests.conftest import Clock, KeyFiles, ProxyFactory, free_port

ISS = "https://idp.example"
WELL_KNOWN = "/.well-known/openid-configuration"


class Idp:
    """A discovery server: `/.well-known/openid-configuration` and JWKS paths the test sets."""

    def __init__(self) -> None:
        self.base = ""
        self.issuer: Any = ISS
        self.jwks_path = "/jwks"
        self.jwks_uri: str | None = None  # instead of base + jwks_path ("": none at all)
        self.discovery_status = 200
        self.jwks: dict[str, Any] = {}  # path -> JWKS document
        self.hits: dict[str, int] = {}

    @property
    def url(self) -> str:
        return self.base + WELL_KNOWN

    def fetches(self, path: str) -> int:
        return self.hits.get(path, 0)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] = self.hits.get(path, 0) + 1
        if path.startswith("/hop/"):  # /hop/N redirects N more times, then to the JWKS
            left = int(path.rsplit("/", 1)[1])
            raise web.HTTPFound(location=f"/hop/{left - 1}" if left > 1 else self.jwks_path)
        if path == "/to-http":
            raise web.HTTPFound(location=request.query["target"])
        if path == WELL_KNOWN:
            if self.discovery_status != 200:
                return web.Response(status=self.discovery_status)
            uri = self.base + self.jwks_path if self.jwks_uri is None else self.jwks_uri
            document: dict[str, Any] = {"jwks_uri": uri} if uri else {}
            if self.issuer is not None:
                document["issuer"] = self.issuer
            return web.json_response(document)
        if path in self.jwks:
            return web.json_response(self.jwks[path])
        return web.Response(status=404)


async def start_idp(host: str = "127.0.0.1", context: ssl.SSLContext | None = None) -> Any:
    idp = Idp()
    app = web.Application()
    app.router.add_get("/{tail:.*}", idp.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, host, port, ssl_context=context).start()
    idp.base = f"{'https' if context else 'http'}://{host}:{port}"
    return idp, runner


@pytest.fixture
async def idp() -> AsyncIterator[Idp]:
    server, runner = await start_idp()
    yield server
    await runner.cleanup()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def https_idp(ca: trustme.CA) -> AsyncIterator[Idp]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    server, runner = await start_idp("localhost", context)
    yield server
    await runner.cleanup()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "idp-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def oidc_app(url: str, **fields: Any) -> dict[str, Any]:
    """A catch-all RS256 app (no `match`), so a token's iss is judged by the issuer check."""
    app: dict[str, Any] = {"id": "idp", "algorithms": ["RS256"], "discovery_url": url}
    app.update(fields)
    return {"apps": [app], "token": {"jwks_min_refresh": 30, "jwks_timeout": 1}}


def sign(keys: KeyFiles, name: str, kid: str, clock: Clock, **claims: Any) -> str:
    now = clock.now
    payload = {"iss": ISS, "sub": "u1", "iat": int(now), "exp": int(now + 300), **claims}
    payload = {name: value for name, value in payload.items() if value is not None}
    return jwt.encode(payload, keys.private[name], algorithm="RS256", headers={"kid": kid})


async def reason(response: Any) -> str:
    return str((await response.json())["error"]["reason"])


async def test_the_document_gives_the_jwks_and_the_issuer(
    proxy_for: ProxyFactory, keys: KeyFiles, idp: Idp
) -> None:
    idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    clock = Clock()
    proxy = await proxy_for(oidc_app(idp.url), clock=clock)
    assert proxy.proxy.state.ready(clock()) == []
    response = await proxy.get("/x", token=sign(keys, "rsa", "k1", clock))
    assert response.status == 200
    assert (await response.json())["headers"]["X-Auth-Subject"] == "u1"
    # No `issuer` configured: the document's is adopted, so another iss is refused.
    other = await proxy.get("/x", token=sign(keys, "rsa", "k1", clock, iss="https://evil.example"))
    assert other.status == 401
    assert await reason(other) == "issuer"
    no_iss = await proxy.get("/x", token=sign(keys, "rsa", "k1", clock, iss=None))
    assert await reason(no_iss) == "issuer"
    assert (idp.fetches(WELL_KNOWN), idp.fetches("/jwks")) == (1, 1)
    assert 'token_proxy_jwks_fetches_total{app="idp",result="ok"} 1.0' in proxy.metrics_text()


@pytest.mark.slow
async def test_idp_down_at_start_503_then_accepted(
    proxy_for: ProxyFactory, keys: KeyFiles, idp: Idp
) -> None:
    idp.discovery_status = 503
    idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    proxy = await proxy_for(oidc_app(idp.url))  # starts although the IdP is down
    token = sign(keys, "rsa", "k1", proxy.clock)
    response = await proxy.get("/x", token=token)
    assert response.status == 503
    assert await reason(response) == "keys_unavailable"
    assert int(response.headers["Retry-After"]) >= 1
    assert "WWW-Authenticate" not in response.headers
    assert proxy.proxy.state.ready(proxy.clock()) == [f"discovery {idp.url}"]
    failed = [line for line in proxy.log_lines() if line["event"] == "jwks_fetch"]
    assert failed[0]["result"] == "error"
    assert failed[0]["url"] == idp.url
    assert failed[0]["error"] == "status 503"
    idp.discovery_status = 200
    for _ in range(40):  # the background retry comes after 1 s of backoff
        await asyncio.sleep(0.1)
        if proxy.proxy.state.ready(proxy.clock()) == []:
            break
    assert (await proxy.get("/x", token=token)).status == 200
    assert 'token_proxy_jwks_fetches_total{app="idp",result="error"}' in proxy.metrics_text()


async def test_an_issuer_mismatch_is_a_failed_fetch(
    proxy_for: ProxyFactory, keys: KeyFiles, idp: Idp
) -> None:
    idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    clock = Clock()
    data = oidc_app(idp.url, issuer=["https://other.example", "https://third.example"])
    proxy = await proxy_for(data, clock=clock)
    assert proxy.proxy.state.ready(clock()) == [f"discovery {idp.url}"]
    assert idp.fetches("/jwks") == 0  # the document was refused before its jwks_uri was used
    response = await proxy.get("/x", token=sign(keys, "rsa", "k1", clock))
    assert response.status == 503
    assert await reason(response) == "keys_unavailable"
    error = next(line for line in proxy.log_lines() if line["event"] == "jwks_fetch")
    assert "not one of the app's issuers" in error["error"]
    assert 'token_proxy_jwks_fetches_total{app="idp",result="error"} 1.0' in proxy.metrics_text()


async def test_a_configured_issuer_the_document_names_is_kept(
    proxy_for: ProxyFactory, keys: KeyFiles, idp: Idp
) -> None:
    idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    clock = Clock()
    data = oidc_app(idp.url, issuer=[ISS, "https://legacy.example"])
    proxy = await proxy_for(data, clock=clock)
    for iss in (ISS, "https://legacy.example"):
        assert (await proxy.get("/x", token=sign(keys, "rsa", "k1", clock, iss=iss))).status == 200
    response = await proxy.get("/x", token=sign(keys, "rsa", "k1", clock, iss="https://x"))
    assert await reason(response) == "issuer"


@pytest.mark.parametrize(
    ("issuer", "jwks_uri", "error"),
    [
        pytest.param(None, None, "no issuer", id="no-issuer"),
        pytest.param(42, None, "no issuer", id="issuer-not-a-string"),
        pytest.param(ISS, "http://idp.example/jwks", "jwks_uri must be https", id="http-jwks-uri"),
        pytest.param(ISS, "", "no jwks_uri", id="no-jwks-uri"),
    ],
)
async def test_a_bad_document_gives_no_keys(
    proxy_for: ProxyFactory,
    keys: KeyFiles,
    idp: Idp,
    issuer: Any,
    jwks_uri: str | None,
    error: str,
) -> None:
    idp.issuer = issuer
    idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    if jwks_uri is not None:
        idp.jwks_uri = jwks_uri
    proxy = await proxy_for(oidc_app(idp.url))
    assert proxy.proxy.state.ready(proxy.clock()) == [f"discovery {idp.url}"]
    line = next(line for line in proxy.log_lines() if line["event"] == "jwks_fetch")
    assert error in line["error"]
    assert idp.fetches("/jwks") == 0


async def test_refresh_refetches_the_document_and_follows_a_rotated_jwks_uri(
    proxy_for: ProxyFactory, keys: KeyFiles, idp: Idp
) -> None:
    idp.jwks["/jwks-a"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    idp.jwks["/jwks-b"] = {"keys": [keys.jwk("rsa2", kid="k2")]}
    idp.jwks_path = "/jwks-a"
    clock = Clock()
    proxy = await proxy_for(oidc_app(idp.url), clock=clock)
    source = proxy.proxy.state.sources[0]
    old_token = sign(keys, "rsa", "k1", clock)
    assert (await proxy.get("/x", token=old_token)).status == 200
    # An unknown kid refetches only the JWKS, from the jwks_uri already known.
    clock.now += 31
    new_token = sign(keys, "rsa2", "k2", clock)
    assert await reason(await proxy.get("/x", token=new_token)) == "unknown_kid"
    assert (idp.fetches(WELL_KNOWN), idp.fetches("/jwks-a")) == (1, 2)
    # The IdP moves its keys; the scheduled refresh reads the document again and follows.
    idp.jwks_path = "/jwks-b"
    clock.now = source.next_at
    assert await source.fetch() is True
    assert (idp.fetches(WELL_KNOWN), idp.fetches("/jwks-b")) == (2, 1)
    assert source.jwks_uri == idp.base + "/jwks-b"
    assert (await proxy.get("/x", token=sign(keys, "rsa2", "k2", clock))).status == 200
    changed = [line for line in proxy.log_lines() if line["event"] == "jwks_fetch"][-1]
    assert changed["url"] == idp.base + "/jwks-b"
    assert changed["discovery_url"] == idp.url
    assert changed["added"] == ["k2"]


async def test_a_new_issuer_in_the_document_is_adopted_on_refresh(
    proxy_for: ProxyFactory, keys: KeyFiles, idp: Idp
) -> None:
    idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    clock = Clock()
    proxy = await proxy_for(oidc_app(idp.url), clock=clock)
    token = sign(keys, "rsa", "k1", clock)
    assert (await proxy.get("/x", token=token)).status == 200  # now in the token cache
    idp.issuer = "https://renamed.example"
    source = proxy.proxy.state.sources[0]
    clock.now = source.next_at
    assert await source.fetch() is True
    # The cache was emptied: the same token is judged against the new issuer.
    assert await reason(await proxy.get("/x", token=token)) == "issuer"
    renamed = sign(keys, "rsa", "k1", clock, iss="https://renamed.example")
    assert (await proxy.get("/x", token=renamed)).status == 200


async def test_a_failed_refresh_keeps_the_last_good_document_and_keys(
    proxy_for: ProxyFactory, keys: KeyFiles, idp: Idp
) -> None:
    idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    clock = Clock()
    data = oidc_app(idp.url)
    data["token"]["jwks_max_stale"] = 600
    proxy = await proxy_for(data, clock=clock)
    source = proxy.proxy.state.sources[0]
    idp.discovery_status = 500
    clock.now += 400
    assert await source.fetch() is True  # failed, but the last good document and keys serve
    assert source.issuer == ISS
    assert (await proxy.get("/x", token=sign(keys, "rsa", "k1", clock))).status == 200
    other = await proxy.get("/x", token=sign(keys, "rsa", "k1", clock, iss="https://x"))
    assert await reason(other) == "issuer"
    clock.now += 201  # past jwks_max_stale since the last success
    response = await proxy.get("/x", token=sign(keys, "rsa", "k1", clock))
    assert response.status == 503
    assert proxy.proxy.state.ready(clock()) == [f"discovery {idp.url}"]


# --- https: ca_file and redirects ---------------------------------------------------------------


async def test_ca_file_trusts_an_internal_idp(
    proxy_for: ProxyFactory, keys: KeyFiles, https_idp: Idp, ca_file: str
) -> None:
    https_idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    clock = Clock()
    untrusted = await proxy_for(oidc_app(https_idp.url), clock=clock)
    assert untrusted.proxy.state.ready(clock()) == [f"discovery {https_idp.url}"]
    line = next(line for line in untrusted.log_lines() if line["event"] == "jwks_fetch")
    assert line["error"].startswith("TLS error")
    trusted = await proxy_for(oidc_app(https_idp.url, ca_file=ca_file), clock=clock)
    assert trusted.proxy.state.ready(clock()) == []
    assert (await trusted.get("/x", token=sign(keys, "rsa", "k1", clock))).status == 200


async def test_ca_file_serves_a_jwks_url_too(
    proxy_for: ProxyFactory, keys: KeyFiles, https_idp: Idp, ca_file: str
) -> None:
    https_idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    clock = Clock()
    app = {"id": "idp", "algorithms": ["RS256"], "issuer": ISS}
    url = https_idp.base + "/jwks"
    proxy = await proxy_for({"apps": [{**app, "jwks_url": url, "ca_file": ca_file}]}, clock=clock)
    assert (await proxy.get("/x", token=sign(keys, "rsa", "k1", clock))).status == 200
    without = await proxy_for({"apps": [{**app, "jwks_url": url}]}, clock=clock)
    assert without.proxy.state.ready(clock()) == [f"jwks {url}"]


async def test_https_redirects_at_most_three_and_never_to_http(
    keys: KeyFiles, https_idp: Idp, idp: Idp, ca_file: str
) -> None:
    https_idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    fetcher = HttpFetcher()
    base = https_idp.base
    try:
        assert json.loads((await fetcher(base + "/hop/3", 2, ca_file)).body)["keys"]
        with pytest.raises(FetchError, match="more than 3 redirects"):
            await fetcher(base + "/hop/4", 2, ca_file)
        # A downgrade to http is refused, even to a loopback server that would answer.
        with pytest.raises(FetchError, match="not https"):
            await fetcher(f"{base}/to-http?target={idp.base}/jwks", 2, ca_file)
        assert idp.fetches("/jwks") == 0
        with pytest.raises(FetchError, match="TLS error"):
            await fetcher(base + "/jwks", 2)  # verification is on without the ca_file
    finally:
        await fetcher.close()


async def test_a_ca_file_replaced_in_place_counts_from_its_next_use(
    keys: KeyFiles, https_idp: Idp, ca: trustme.CA, tmp_path: Path
) -> None:
    https_idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    bundle = tmp_path / "rotating-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(bundle))  # another CA: the IdP is not trusted
    fetcher = HttpFetcher()
    try:
        with pytest.raises(FetchError, match="TLS error"):
            await fetcher(https_idp.base + "/jwks", 2, str(bundle))
        bundle.write_bytes(ca.cert_pem.bytes() + b"\n")  # the operator fixes the bundle
        assert (await fetcher(https_idp.base + "/jwks", 2, str(bundle))).body
        bundle.unlink()
        with pytest.raises(FetchError, match="ca_file cannot be read"):
            await fetcher(https_idp.base + "/jwks", 2, str(bundle))
    finally:
        await fetcher.close()


async def test_discovery_serves_inspect_online(keys: KeyFiles, idp: Idp, tmp_path: Path) -> None:
    import sys

    from tests.conftest import write_config

    idp.jwks["/jwks"] = {"keys": [keys.jwk("rsa", kid="k1")]}
    data = {"upstream": {"url": "http://127.0.0.1:9"}, **oidc_app(idp.url)}
    config = write_config(tmp_path, data)
    clock = Clock()
    clock.now = time.time()
    token = sign(keys, "rsa", "k1", clock)

    async def inspect(*flags: str) -> dict[str, Any]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "inspect", "--config", str(config), "--json",
            *flags, token, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await process.communicate()
        return dict(json.loads(out))

    assert (await inspect())["forwarded"] is True
    offline = await inspect("--offline")
    assert offline["reason"] == "keys_unavailable"
    assert any("discovery_url not fetched" in step["detail"] for step in offline["steps"])
