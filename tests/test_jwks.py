"""Public-key tokens and JWKS (SPEC §4 step 6, §7): every family, every key source, rotation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from jwcrypto import jwk as jc_jwk
from jwcrypto import jwt as jc_jwt
from jwt.warnings import InsecureKeyLengthWarning

from proxy.app import Resources
from proxy.config import load
from proxy.keys import FetchError, HttpFetcher, JwksSource
from tests.conftest import Clock, KeyFiles, ProxyFactory, free_port, write_config

ISS = "https://idp.example"

# --- A JWKS server whose answers the test controls ------------------------------------------


class JwksServer:
    def __init__(self) -> None:
        self.document: Any = {"keys": []}
        self.status = 200
        self.delay = 0.0
        self.headers: dict[str, str] = {}
        self.fetches = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if request.path == "/redirect":
            raise web.HTTPFound(location="/jwks")
        if request.path == "/redirect-loop":
            raise web.HTTPFound(location="/redirect-loop")
        body = self.document if isinstance(self.document, bytes) else json.dumps(self.document)
        return web.Response(
            status=self.status, body=body, headers=self.headers, content_type="application/json"
        )


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    server.url = f"http://127.0.0.1:{port}/jwks"
    yield server
    await runner.cleanup()


def idp_app(**fields: Any) -> dict[str, Any]:
    app = {"id": "idp", "match": {"claim": "iss", "value": ISS}, "algorithms": ["RS256"]}
    app.update(fields)
    return {"apps": [app], "token": {"jwks_min_refresh": 30, "jwks_timeout": 1}}


def sign(keys: KeyFiles, name: str, alg: str, kid: str | None = None, **claims: Any) -> str:
    now = time.time()
    payload = {"iss": ISS, "sub": "u1", "iat": int(now), "exp": int(now + 300), **claims}
    return jwt.encode(
        payload, keys.private[name], algorithm=alg, headers={"kid": kid} if kid else None
    )


FAMILIES = [
    ("RS256", "rsa"), ("RS384", "rsa"), ("RS512", "rsa"),
    ("PS256", "rsa"), ("PS384", "rsa"), ("PS512", "rsa"),
    ("ES256", "ec"), ("ES384", "ec384"), ("ES512", "ec521"),
    ("EdDSA", "ed"),
]  # fmt: skip


# One certificate is enough: after loading, a certificate's key takes the PEM key's path.
SOURCES = [
    (alg, key, source)
    for alg, key in FAMILIES
    for source in ("pem", "jwks_file", "jwks_url", *(("certificate",) if key == "rsa" else ()))
]


@pytest.mark.parametrize(("alg", "key", "source"), SOURCES)
async def test_each_family_from_each_source(
    proxy_for: ProxyFactory,
    keys: KeyFiles,
    jwks: JwksServer,
    tmp_path: Path,
    alg: str,
    key: str,
    source: str,
) -> None:
    kid = None
    fields: dict[str, Any] = {"algorithms": [alg]}
    if source == "pem":
        fields["public_keys"] = [keys.path(f"{key}.pub")]
    elif source == "certificate":
        fields["public_keys"] = [keys.path(f"{key}.crt")]
    else:
        kid = f"{key}-1"
        document = {"keys": [keys.jwk(key, kid=kid, use="sig")]}
        if source == "jwks_file":
            (tmp_path / "jwks.json").write_text(json.dumps(document))
            fields["jwks_file"] = str(tmp_path / "jwks.json")
        else:
            jwks.document = document
            fields["jwks_url"] = jwks.url
    proxy = await proxy_for(idp_app(**fields))
    good = await proxy.get("/x", token=sign(keys, key, alg, kid))
    assert good.status == 200
    assert (await good.json())["headers"]["X-Auth-App-Id"] == "idp"
    other = "rsa2" if key == "rsa" else "rsa"
    if key.startswith("rsa"):
        forged = sign(keys, other, alg, kid)
        response = await proxy.get("/x", token=forged)
        assert (await response.json())["error"]["reason"] == "bad_signature"


async def test_algorithm_confusion_is_impossible(proxy_for: ProxyFactory, keys: KeyFiles) -> None:
    proxy = await proxy_for(idp_app(public_keys=[keys.path("rsa.pub")]))

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = (
        b64(b'{"alg":"HS256","typ":"JWT"}')
        + "."
        + b64(json.dumps({"iss": ISS, "sub": "u", "exp": int(time.time()) + 60}).encode())
    )
    mac = hmac.new(keys.public_pem("rsa"), signing.encode(), hashlib.sha256).digest()
    response = await proxy.get("/x", token=f"{signing}.{b64(mac)}")
    assert response.status == 401
    assert (await response.json())["error"]["reason"] == "alg_not_allowed"


async def test_jwk_alg_must_match_the_token(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer
) -> None:
    jwks.document = {"keys": [keys.jwk("rsa", kid="k", alg="RS256")]}
    proxy = await proxy_for(idp_app(algorithms=["RS256", "PS256"], jwks_url=jwks.url))
    assert (await proxy.get("/x", token=sign(keys, "rsa", "RS256", "k"))).status == 200
    response = await proxy.get("/x", token=sign(keys, "rsa", "PS256", "k"))
    assert (await response.json())["error"]["reason"] == "unknown_kid"


async def test_fetched_keys_that_are_unusable_are_skipped(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer
) -> None:
    jwks.document = {
        "keys": [
            keys.jwk("rsa", kid="enc", use="enc"),
            keys.jwk("rsa1024", kid="small"),
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            keys.jwk("rsa2", kid="ok"),
        ]
    }
    proxy = await proxy_for(idp_app(jwks_url=jwks.url))
    assert (await proxy.get("/x", token=sign(keys, "rsa2", "RS256", "ok"))).status == 200
    response = await proxy.get("/x", token=sign(keys, "rsa", "RS256", "enc"))
    assert (await response.json())["error"]["reason"] == "unknown_kid"
    with pytest.warns(InsecureKeyLengthWarning):
        small = sign(keys, "rsa1024", "RS256", "small")
    response = await proxy.get("/x", token=small)
    assert (await response.json())["error"]["reason"] == "unknown_kid"


async def test_keys_named_by_the_token_are_never_used(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer
) -> None:
    jwks.document = {"keys": [keys.jwk("rsa", kid="k")]}
    proxy = await proxy_for(idp_app(jwks_url=jwks.url))
    attacker = keys.jwk("rsa2", kid="k")
    before = jwks.fetches
    for header in ({"jwk": attacker}, {"jku": jwks.url + "?evil"}, {"x5u": jwks.url}):
        token = jwt.encode(
            {"iss": ISS, "sub": "u", "exp": int(time.time()) + 60},
            keys.private["rsa2"],
            algorithm="RS256",
            headers={"kid": "k", **header},
        )
        response = await proxy.get("/x", token=token)
        assert (await response.json())["error"]["reason"] == "bad_signature"
    assert jwks.fetches == before


async def test_without_kid_at_most_four_fitting_keys_are_tried(
    proxy_for: ProxyFactory, keys: KeyFiles, tmp_path: Path
) -> None:
    few = {"keys": [keys.jwk("rsa2"), keys.jwk("rsa")]}
    (tmp_path / "few.json").write_text(json.dumps(few))
    proxy = await proxy_for(idp_app(jwks_file=str(tmp_path / "few.json")))
    assert (await proxy.get("/x", token=sign(keys, "rsa", "RS256"))).status == 200
    many = {"keys": [keys.jwk("rsa2", kid=str(i)) for i in range(4)] + [keys.jwk("rsa")]}
    (tmp_path / "many.json").write_text(json.dumps(many))
    crowded = await proxy_for(idp_app(jwks_file=str(tmp_path / "many.json")))
    response = await crowded.get("/x", token=sign(keys, "rsa", "RS256"))
    assert (await response.json())["error"]["reason"] == "unknown_kid"


# --- Rotation and refetch limits ----------------------------------------------------------------


async def test_rotation_new_kid_accepted_after_one_refetch(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer
) -> None:
    jwks.document = {"keys": [keys.jwk("rsa", kid="old")]}
    proxy = await proxy_for(idp_app(jwks_url=jwks.url))
    old = sign(keys, "rsa", "RS256", "old")
    assert (await proxy.get("/x", token=old)).status == 200
    assert jwks.fetches == 1
    jwks.document = {"keys": [keys.jwk("rsa", kid="old"), keys.jwk("rsa2", kid="new")]}
    assert (await proxy.get("/x", token=sign(keys, "rsa2", "RS256", "new"))).status == 200
    assert jwks.fetches == 2
    fetch_lines = [line for line in proxy.log_lines() if line["event"] == "jwks_fetch"]
    assert fetch_lines[-1]["added"] == ["new"]
    assert "BEGIN" not in proxy.log_text()
    metrics = proxy.metrics_text()
    assert 'token_proxy_jwks_fetches_total{app="idp",result="ok"} 2.0' in metrics
    assert 'token_proxy_jwks_keys{app="idp"} 2.0' in metrics


async def test_a_rejection_after_a_refetch_is_logged_with_its_path_and_route(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer
) -> None:
    """A decision that waited for a refetch logs what steps 1 and 2 found, as any other."""
    jwks.document = {"keys": [keys.jwk("rsa", kid="k")]}
    proxy = await proxy_for({**idp_app(jwks_url=jwks.url), "routes": [{"path": "/api/{id}"}]})
    response = await proxy.get("/api/%34%32?q=1", token=sign(keys, "rsa2", "RS256", "gone"))
    assert (await response.json())["error"]["reason"] == "unknown_kid"
    assert jwks.fetches == 2  # rejected once the refetch came back without the kid
    line = proxy.log_lines()[-1]
    assert (line["path"], line["route"], line["status"]) == ("/api/42", "/api/{id}", 401)


async def test_kid_flood_causes_one_fetch_per_window(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer
) -> None:
    clock = Clock()
    jwks.document = {"keys": [keys.jwk("rsa", kid="k")]}
    proxy = await proxy_for(idp_app(jwks_url=jwks.url), clock=clock)
    assert jwks.fetches == 1

    async def one() -> int:
        response = await proxy.get("/x", token=sign(keys, "rsa", "RS256", uuid.uuid4().hex))
        return response.status

    for _ in range(10):
        statuses = await asyncio.gather(*(one() for _ in range(100)))
        assert set(statuses) == {401}
    assert jwks.fetches == 2  # the first miss refetched; the other 999 were refused at once
    clock.now += 31
    await one()
    assert jwks.fetches == 3


async def test_concurrent_misses_share_one_fetch(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer
) -> None:
    jwks.document = {"keys": [keys.jwk("rsa", kid="old")]}
    proxy = await proxy_for(idp_app(jwks_url=jwks.url))
    jwks.document = {"keys": [keys.jwk("rsa2", kid="new")]}
    jwks.delay = 0.2
    token = sign(keys, "rsa2", "RS256", "new")
    responses = await asyncio.gather(*(proxy.get("/x", token=token) for _ in range(50)))
    assert {r.status for r in responses} == {200}
    assert jwks.fetches == 2


@pytest.mark.slow
async def test_hanging_jwks_answers_within_timeout(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer
) -> None:
    jwks.document = {"keys": [keys.jwk("rsa", kid="old")]}
    proxy = await proxy_for(idp_app(jwks_url=jwks.url))
    jwks.delay = 30
    started = time.monotonic()
    response = await proxy.get("/x", token=sign(keys, "rsa", "RS256", "unknown"))
    elapsed = time.monotonic() - started
    assert (await response.json())["error"]["reason"] == "unknown_kid"
    assert elapsed < 1 + 1  # jwks_timeout is 1 s
    assert (await proxy.get("/x", token=sign(keys, "rsa", "RS256", "old"))).status == 200


# --- Failures: down at start, stale, bad documents ----------------------------------------------


@pytest.mark.slow
async def test_down_at_start_503_then_recovers_without_restart(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer
) -> None:
    jwks.status = 500
    proxy = await proxy_for(idp_app(jwks_url=jwks.url))
    token = sign(keys, "rsa", "RS256", "k")
    response = await proxy.get("/x", token=token)
    assert response.status == 503
    assert "WWW-Authenticate" not in response.headers
    assert int(response.headers["Retry-After"]) >= 1
    assert await response.json() == {
        "error": {
            "code": 503,
            "name": "KeysUnavailable",
            "message": "The signing keys are not available yet.",
            "reason": "keys_unavailable",
        }
    }
    assert proxy.proxy.state.ready(proxy.clock()) == [f"jwks {jwks.url}"]
    jwks.status = 200
    jwks.document = {"keys": [keys.jwk("rsa", kid="k")]}
    for _ in range(40):  # the background retry comes after 1 s of backoff
        await asyncio.sleep(0.1)
        if proxy.proxy.state.ready(proxy.clock()) == []:
            break
    assert (await proxy.get("/x", token=token)).status == 200
    assert 'token_proxy_jwks_fetches_total{app="idp",result="error"}' in proxy.metrics_text()


async def test_stale_keys_serve_until_max_stale(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer
) -> None:
    clock = Clock()
    jwks.document = {"keys": [keys.jwk("rsa", kid="k")]}
    data = idp_app(jwks_url=jwks.url)
    data["token"]["jwks_max_stale"] = 600
    proxy = await proxy_for(data, clock=clock)
    source = proxy.proxy.state.sources[0]
    jwks.status = 503
    clock.now += 400
    assert await source.fetch() is True  # failed, but the last good keys are still young
    token = sign(keys, "rsa", "RS256", "k", iat=int(clock.now), exp=int(clock.now) + 60)
    assert (await proxy.get("/x", token=token)).status == 200
    clock.now += 201
    token = sign(keys, "rsa", "RS256", "k", iat=int(clock.now), exp=int(clock.now) + 60)
    response = await proxy.get("/x", token=token)
    assert response.status == 503
    assert response.headers["Retry-After"].isdigit()


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(b"{" + b" " * (1 << 20) + b"}", id="over-1MB"),
        pytest.param(b"<html>not json</html>", id="garbage"),
        pytest.param(json.dumps({"keys": "none"}).encode(), id="not-a-jwks"),
        pytest.param(json.dumps({"keys": [{"kty": "RSA"}] * 101}).encode(), id="over-100-keys"),
        pytest.param(
            json.dumps({"keys": [{"kty": "oct", "k": "AA"}]}).encode(), id="no-usable-key"
        ),
    ],
)
async def test_bad_documents_keep_old_keys(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer, document: bytes
) -> None:
    clock = Clock()
    jwks.document = {"keys": [keys.jwk("rsa", kid="k")]}
    proxy = await proxy_for(idp_app(jwks_url=jwks.url), clock=clock)
    jwks.document = document
    clock.now += 31
    response = await proxy.get("/x", token=sign(keys, "rsa", "RS256", "other"))
    assert (await response.json())["error"]["reason"] == "unknown_kid"
    assert jwks.fetches == 2
    assert (await proxy.get("/x", token=sign(keys, "rsa", "RS256", "k"))).status == 200
    lines = proxy.log_lines()
    assert any(line["event"] == "jwks_fetch" and line["result"] == "error" for line in lines)


# --- The JwksSource on its own: max-age, backoff, redirects -------------------------------------


def settings(**overrides: Any) -> Any:
    from proxy.config import TokenSettings

    values: dict[str, Any] = {
        "sources": (), "leeway": 30.0, "max_length": 8192, "cache_size": 0, "cache_ttl": 0.0,
        "jwks_cache_ttl": 300.0, "jwks_min_refresh": 30.0, "jwks_max_stale": 86400.0,
        "jwks_timeout": 2.0,
    }  # fmt: skip
    values.update(overrides)
    return TokenSettings(**values)


@pytest.mark.parametrize(
    ("cache_control", "ttl"),
    [("max-age=120", 120), ("public, max-age=5", 60), ("max-age=999999", 86400), (None, 300)],
)
async def test_max_age_is_honoured_and_clamped(
    jwks: JwksServer, keys: KeyFiles, cache_control: str | None, ttl: int
) -> None:
    jwks.document = {"keys": [keys.jwk("rsa")]}
    if cache_control:
        jwks.headers = {"Cache-Control": cache_control}
    clock = Clock()
    fetcher = HttpFetcher()
    source = JwksSource(jwks.url, ("idp",), settings(), fetcher=fetcher, clock=clock)
    try:
        assert await source.fetch() is True
        assert source.next_at - clock.now == ttl
    finally:
        await fetcher.close()


async def test_failures_back_off_up_to_min_refresh(jwks: JwksServer) -> None:
    jwks.status = 500
    clock = Clock()
    fetcher = HttpFetcher()
    source = JwksSource(
        jwks.url, ("idp",), settings(jwks_min_refresh=10), fetcher=fetcher, clock=clock
    )
    try:
        delays = []
        for _ in range(6):
            await source.fetch()
            delays.append(source.next_at - clock.now)
        assert delays == [1, 2, 4, 8, 10, 10]
        assert source.retry_after(clock.now) == 10
    finally:
        await fetcher.close()


async def test_a_redirect_to_http_is_a_failed_fetch_even_from_loopback_http(
    jwks: JwksServer, keys: KeyFiles
) -> None:
    # SPEC §7: redirects are https only. The loopback exception is for the URL an operator
    # wrote, not for a Location a server chose.
    jwks.document = {"keys": [keys.jwk("rsa")]}
    fetcher = HttpFetcher()
    try:
        base = jwks.url.rsplit("/", 1)[0]
        assert (await fetcher(base + "/jwks", 2)).body
        with pytest.raises(FetchError, match="not https"):
            await fetcher(base + "/redirect", 2)
        with pytest.raises(FetchError, match="not https"):
            await fetcher(base + "/redirect-loop", 2)
    finally:
        await fetcher.close()


async def test_a_jwks_url_redirecting_to_http_gives_no_keys(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer
) -> None:
    jwks.document = {"keys": [keys.jwk("rsa", kid="k")]}
    base = jwks.url.rsplit("/", 1)[0]
    proxy = await proxy_for(idp_app(jwks_url=base + "/redirect"))
    response = await proxy.get("/x", token=sign(keys, "rsa", "RS256", "k"))
    assert response.status == 503
    assert (await response.json())["error"]["reason"] == "keys_unavailable"
    assert proxy.proxy.state.ready(proxy.clock()) == [f"jwks {base}/redirect"]


# --- RFC 7515 appendix A examples and an independent JOSE implementation ------------------------

RFC_PAYLOAD = b'{"iss":"joe",\r\n "exp":1300819380,\r\n "http://example.com/is_root":true}'
RFC_RSA = {
    "kty": "RSA",
    "e": "AQAB",
    "n": "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1P"
    "t0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSX"
    "ndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5I"
    "hlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ",
}
RFC_RS256_SIGNATURE = bytes([
    112, 46, 33, 137, 67, 232, 143, 209, 30, 181, 216, 45, 191, 120, 69, 243, 65, 6, 174, 27,
    129, 255, 247, 115, 17, 22, 173, 209, 113, 125, 131, 101, 109, 66, 10, 253, 60, 150, 238,
    221, 115, 162, 102, 62, 81, 102, 104, 123, 0, 11, 135, 34, 110, 1, 135, 237, 16, 115, 249,
    69, 229, 130, 173, 252, 239, 22, 216, 90, 121, 142, 232, 198, 109, 219, 61, 184, 151, 91,
    23, 208, 148, 2, 190, 237, 213, 217, 217, 112, 7, 16, 141, 178, 129, 96, 213, 248, 4, 12,
    167, 68, 87, 98, 184, 31, 190, 127, 249, 217, 46, 10, 231, 111, 36, 242, 91, 51, 187, 230,
    244, 74, 230, 30, 177, 4, 10, 203, 32, 4, 77, 62, 249, 18, 142, 212, 1, 48, 121, 91, 212,
    189, 59, 65, 238, 202, 208, 102, 171, 101, 25, 129, 253, 228, 141, 247, 127, 55, 45, 195,
    139, 159, 175, 221, 59, 239, 177, 139, 93, 163, 204, 60, 46, 176, 47, 158, 58, 65, 214, 18,
    202, 173, 21, 145, 18, 115, 160, 95, 35, 185, 232, 56, 250, 175, 132, 157, 105, 132, 41, 239,
    90, 30, 136, 121, 130, 54, 195, 212, 14, 96, 69, 34, 165, 68, 200, 242, 122, 122, 45, 184, 6,
    99, 209, 108, 247, 202, 234, 86, 222, 64, 92, 178, 33, 90, 69, 178, 194, 85, 102, 181, 90,
    193, 167, 72, 160, 112, 223, 200, 163, 42, 70, 149, 67, 208, 25, 238, 251, 71,
])  # fmt: skip
RFC_EC = {
    "kty": "EC",
    "crv": "P-256",
    "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
    "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
}
RFC_ES256_SIGNATURE = bytes([
    14, 209, 33, 83, 121, 99, 108, 72, 60, 47, 127, 21, 88, 7, 212, 2, 163, 178, 40, 3, 58, 249,
    124, 126, 23, 129, 154, 195, 22, 158, 166, 101, 197, 10, 7, 211, 140, 60, 112, 229, 216,
    241, 45, 175, 8, 74, 84, 128, 166, 101, 144, 197, 242, 147, 80, 154, 143, 63, 127, 138, 131,
    163, 84, 213,
])  # fmt: skip


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("alg", "key", "signature"),
    [("RS256", RFC_RSA, RFC_RS256_SIGNATURE), ("ES256", RFC_EC, RFC_ES256_SIGNATURE)],
)
async def test_rfc7515_examples(
    proxy_for: ProxyFactory, tmp_path: Path, alg: str, key: dict[str, str], signature: bytes
) -> None:
    (tmp_path / "rfc.json").write_text(json.dumps({"keys": [key]}))
    data = {
        "apps": [{"id": "joe", "match": {"claim": "iss", "value": "joe"}, "algorithms": [alg],
                  "jwks_file": str(tmp_path / "rfc.json")}],
    }  # fmt: skip
    token = ".".join(
        [b64url(json.dumps({"alg": alg}, separators=(",", ":")).encode()), b64url(RFC_PAYLOAD),
         b64url(signature)]
    )  # fmt: skip
    today = await proxy_for(data)
    expired = await today.get("/x", token=token)
    assert expired.status == 401
    assert (await expired.json())["error"]["code"] == 40
    back_then = Clock()
    back_then.now = 1300819380 - 60
    then = await proxy_for(data, clock=back_then)
    assert (await then.get("/x", token=token)).status == 200


@pytest.mark.parametrize(
    ("alg", "kty", "params"),
    [
        ("RS256", "RSA", {"size": 2048}),
        ("PS256", "RSA", {"size": 2048}),
        ("ES256", "EC", {"crv": "P-256"}),
        ("EdDSA", "OKP", {"crv": "Ed25519"}),
    ],
)
async def test_tokens_from_jwcrypto_verify(
    proxy_for: ProxyFactory, jwks: JwksServer, alg: str, kty: str, params: dict[str, Any]
) -> None:
    key = jc_jwk.JWK.generate(kty=kty, kid=f"jc-{alg}", use="sig", **params)
    jwks.document = {"keys": [json.loads(key.export_public())]}
    proxy = await proxy_for(idp_app(algorithms=[alg], jwks_url=jwks.url))
    now = int(time.time())
    token = jc_jwt.JWT(
        header={"alg": alg, "kid": f"jc-{alg}", "typ": "JWT"},
        claims={"iss": ISS, "sub": "jc", "iat": now, "exp": now + 60},
    )
    token.make_signed_token(key)
    response = await proxy.get("/x", token=token.serialize())
    assert response.status == 200
    assert (await response.json())["headers"]["X-Auth-Subject"] == "jc"


async def test_reload_fetches_new_urls_first(
    proxy_for: ProxyFactory, keys: KeyFiles, jwks: JwksServer, tmp_path: Path
) -> None:
    proxy = await proxy_for({})
    jwks.document = {"keys": [keys.jwk("rsa", kid="k")]}
    data = {"upstream": {"url": proxy.config.upstream.url}, **idp_app(jwks_url=jwks.url)}  # type: ignore[union-attr]
    config = load(str(write_config(tmp_path, data, "with-jwks.yaml")))
    resources: Resources = proxy.proxy.resources
    proxy.proxy.swap(await resources.prepare(config))
    assert jwks.fetches == 1
    assert (await proxy.get("/x", token=sign(keys, "rsa", "RS256", "k"))).status == 200


async def test_inspect_names_the_key_and_honours_offline(
    jwks: JwksServer, keys: KeyFiles, tmp_path: Path
) -> None:
    import sys

    jwks.document = {"keys": [keys.jwk("rsa", kid="k-7")]}
    data = {"upstream": {"url": "http://127.0.0.1:9"}, **idp_app(jwks_url=jwks.url)}
    config = write_config(tmp_path, data)
    token = sign(keys, "rsa", "RS256", "k-7")

    async def inspect(*flags: str) -> tuple[int, dict[str, Any]]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "inspect",
            "--config",
            str(config),
            "--json",
            *flags,
            token,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await process.communicate()
        assert process.returncode is not None
        return process.returncode, json.loads(out)

    code, online = await inspect()
    assert code == 0
    assert online["forwarded"] is True
    assert online["app"] == "idp"
    assert any("kid k-7 from jwks_url" in step["detail"] for step in online["steps"])
    code, offline = await inspect("--offline")
    assert code == 1
    assert offline["reason"] == "keys_unavailable"
    assert any("jwks_url not fetched" in step["detail"] for step in offline["steps"])
    assert jwks.fetches == 1
