"""The token service (SPEC §8): JWT credentials and token exchange, end to end."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from jwcrypto import jwk as jc_jwk
from jwcrypto import jwt as jc_jwt

from proxy.app import Resources
from proxy.config import load
from tests.conftest import (
    OTHER_SECRET,
    SECRET,
    SECRET_B64,
    KeyFiles,
    ProxyFactory,
    RunningProxy,
    mint,
    write_config,
)

ISSUER = "https://auth.example"
USERS = "https://users.example"
OTHER_B64 = base64.b64encode(OTHER_SECRET).decode()
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
CLIENT = ("app-123", "client-secret-123456")


def service_config(keys: KeyFiles, signing: tuple[str, ...] = ("ec.key",)) -> dict[str, Any]:
    return {
        "environment": "production",
        "token_service": {
            "issuer": ISSUER,
            "signing_keys": [keys.path(name) for name in signing],
            "token_ttl": 900,
            "audience": "api",
            "clients": [
                {"id": "app-123", "secret": CLIENT[1], "org": "acme"},
                {"id": "app-456", "secret": "other-secret-1234567", "org": "globex"},
                {"id": "app-789", "secret": "third-secret-12345678"},
            ],
            "jwt_bearer": {"apps": ["credentials"]},
            "token_exchange": {"apps": ["app-1", "token-service"]},
        },
        "apps": [
            {"id": "credentials", "match": {"claim": "iss", "value": USERS},
             "algorithms": ["HS256"], "secrets": [SECRET_B64], "required_claims": ["exp", "sub"]},
            {"id": "app-1", "match": {}, "algorithms": ["HS256"], "secrets": [OTHER_B64]},
        ],
        "routes": [{"path": "/*"}],
    }  # fmt: skip


def credential(**overrides: Any) -> str:
    claims: dict[str, Any] = {
        "iss": USERS,
        "sub": "user-42",
        "aud": ISSUER,
        "env": "production",
        "allowed_clients": ["app-123"],
        "userId": "42",
        "email": "u42@example.com",
    }
    claims.update(overrides)
    return mint(SECRET, ttl=overrides.pop("ttl", 3600), **claims)


async def token_request(
    proxy: RunningProxy,
    form: dict[str, str] | str,
    client: tuple[str, str] | None = CLIENT,
    basic: bool = True,
    content_type: str = "application/x-www-form-urlencoded",
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    headers = {"Content-Type": content_type}
    body = dict(form) if isinstance(form, dict) else form
    if client is not None and basic:
        pair = f"{client[0]}:{client[1]}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    elif client is not None and isinstance(body, dict):
        body.update(client_id=client[0], client_secret=client[1])
    from urllib.parse import urlencode

    data = urlencode(body) if isinstance(body, dict) else body
    response = await proxy.request("POST", "/oauth/token", headers=headers, data=data)
    return response.status, await response.json(), response


@pytest.fixture
async def service(proxy_for: ProxyFactory, keys: KeyFiles) -> RunningProxy:
    return await proxy_for(service_config(keys))


async def test_jwt_bearer_end_to_end(service: RunningProxy) -> None:
    status, body, response = await token_request(
        service, {"grant_type": JWT_BEARER, "assertion": credential()}
    )
    assert status == 200, body
    assert response.headers["Cache-Control"] == "no-store"
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert "issued_token_type" not in body
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["iss"] == ISSUER
    assert claims["sub"] == "user-42"
    assert claims["aud"] == "api"
    assert claims["client_id"] == "app-123"
    assert claims["env"] == "production"
    assert claims["userId"] == "42"
    assert claims["email"] == "u42@example.com"
    assert claims["exp"] - claims["iat"] == 900
    assert claims["jti"]
    assert jwt.get_unverified_header(body["access_token"])["kid"]
    forwarded = await service.get("/api/things", token=body["access_token"])
    assert forwarded.status == 200
    seen = (await forwarded.json())["headers"]
    assert seen["X-Auth-App-Id"] == "token-service"
    assert seen["X-Auth-Subject"] == "user-42"
    assert seen["X-Auth-User-Id"] == "42"
    assert 'token_proxy_tokens_issued_total{client="app-123",grant="jwt-bearer"} 1.0' in (
        service.metrics_text()
    )
    assert body["access_token"] not in service.log_text()
    # one access line per service request, kept out of the proxied requests' counter
    line = [x for x in service.log_lines() if x.get("route") == "/oauth/token"][-1]
    assert (line["event"], line["status"], line["outcome"], line["reason"]) == (
        "request",
        200,
        "token_service",
        "",
    )
    assert line["request_id"] == response.headers["X-Request-Id"]
    counted = [
        line
        for line in service.metrics_text().splitlines()
        if line.startswith("token_proxy_requests_total{")
    ]
    assert len(counted) == 1  # the proxied /api/things only
    assert 'app="token-service"' in counted[0] and counted[0].endswith(" 1.0")


async def test_client_secret_post_works_too(service: RunningProxy) -> None:
    status, body, _ = await token_request(
        service, {"grant_type": JWT_BEARER, "assertion": credential()}, basic=False
    )
    assert status == 200, body


async def test_org_restricted_credential(service: RunningProxy) -> None:
    assertion = credential(allowed_clients=None, org="acme")
    assert (await token_request(service, {"grant_type": JWT_BEARER, "assertion": assertion}))[
        0
    ] == 200
    other = ("app-456", "other-secret-1234567")
    status, body, _ = await token_request(
        service, {"grant_type": JWT_BEARER, "assertion": assertion}, client=other
    )
    assert (status, body["error"]) == (400, "unauthorized_client")


INVALID_CLIENT = [
    pytest.param(("app-123", "wrong-secret-000000"), id="wrong-secret"),
    pytest.param(("nobody", "client-secret-123456"), id="unknown-client"),
    pytest.param(None, id="no-credentials"),
]


@pytest.mark.parametrize("client", INVALID_CLIENT)
async def test_invalid_client(service: RunningProxy, client: tuple[str, str] | None) -> None:
    status, body, response = await token_request(
        service, {"grant_type": JWT_BEARER, "assertion": credential()}, client=client
    )
    assert status == 401
    assert body["error"] == "invalid_client"
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    line = service.log_lines()[-1]
    assert (line["route"], line["status"], line["outcome"], line["reason"]) == (
        "/oauth/token",
        401,
        "token_service",
        "invalid_client",
    )
    if client is not None:
        assert client[1] not in service.log_text()


GRANT_ERRORS = [
    pytest.param(lambda: credential(allowed_clients=["app-999"]), "unauthorized_client",
                 id="not-in-allowed-clients"),
    pytest.param(lambda: credential(allowed_clients=None, org="globex"), "unauthorized_client",
                 id="other-org"),
    pytest.param(lambda: credential(allowed_clients=None), "unauthorized_client",
                 id="unrestricted-credential"),
    pytest.param(lambda: credential(env="sandbox"), "invalid_grant", id="sandbox-in-production"),
    pytest.param(lambda: credential(aud="https://elsewhere"), "invalid_grant", id="wrong-aud"),
    pytest.param(lambda: mint(SECRET, ttl=-100, iss=USERS, sub="u", aud=ISSUER),
                 "invalid_grant", id="expired"),
    pytest.param(lambda: mint(b"x" * 32, iss=USERS, sub="u", aud=ISSUER), "invalid_grant",
                 id="bad-signature"),
    pytest.param(lambda: mint(SECRET, iss="https://nobody.example", sub="u", aud=ISSUER),
                 "invalid_grant", id="unknown-app"),
    pytest.param(lambda: mint(OTHER_SECRET, appId="app-1", sub="u", aud=ISSUER), "invalid_grant",
                 id="app-not-a-credential-issuer"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "error"), GRANT_ERRORS)
async def test_jwt_bearer_errors(service: RunningProxy, make: Any, error: str) -> None:
    status, body, _ = await token_request(service, {"grant_type": JWT_BEARER, "assertion": make()})
    assert status == 400
    assert body["error"] == error
    assert set(body) == {"error", "error_description"}


async def test_token_endpoint_as_audience(service: RunningProxy) -> None:
    assertion = credential(aud=[ISSUER + "/oauth/token", "other"])
    assert (await token_request(service, {"grant_type": JWT_BEARER, "assertion": assertion}))[
        0
    ] == 200


REQUEST_ERRORS = [
    pytest.param({"grant_type": "password", "username": "u"}, "unsupported_grant_type",
                 "application/x-www-form-urlencoded", id="unsupported-grant"),
    pytest.param({"assertion": "x"}, "invalid_request", "application/x-www-form-urlencoded",
                 id="no-grant-type"),
    pytest.param({"grant_type": JWT_BEARER}, "invalid_request",
                 "application/x-www-form-urlencoded", id="no-assertion"),
    pytest.param({"grant_type": EXCHANGE, "subject_token": "x"}, "invalid_request",
                 "application/x-www-form-urlencoded", id="no-subject-token-type"),
    pytest.param('{"grant_type": "x"}', "invalid_request", "application/json",
                 id="wrong-content-type"),
    pytest.param("grant_type=a&grant_type=b", "invalid_request",
                 "application/x-www-form-urlencoded", id="repeated-parameter"),
]  # fmt: skip


@pytest.mark.parametrize(("form", "error", "content_type"), REQUEST_ERRORS)
async def test_request_errors(
    service: RunningProxy, form: Any, error: str, content_type: str
) -> None:
    status, body, _ = await token_request(service, form, content_type=content_type)
    assert (status, body["error"]) == (400, error)


async def exchange(
    service: RunningProxy, subject: str, client: tuple[str, str] = CLIENT
) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": EXCHANGE, "subject_token": subject, "subject_token_type": ACCESS}
    status, body, response = await token_request(service, form, client=client)
    if status == 200:
        assert response.headers["Cache-Control"] == "no-store"
    return status, body


async def test_token_exchange_end_to_end_with_nested_act(service: RunningProxy) -> None:
    subject = mint(OTHER_SECRET, ttl=3600, appId="app-1", sub="user-7", userId="7")
    status, body = await exchange(service, subject)
    assert status == 200, body
    assert body["issued_token_type"] == ACCESS
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "user-7"
    assert claims["act"] == {"sub": "app-123"}
    seen = (await (await service.get("/x", token=body["access_token"])).json())["headers"]
    assert seen["X-Auth-Actor"] == "app-123"
    assert seen["X-Auth-User-Id"] == "7"
    third = ("app-789", "third-secret-12345678")
    status, again = await exchange(service, body["access_token"], client=third)
    assert status == 200, again
    nested = jwt.decode(again["access_token"], options={"verify_signature": False})
    assert nested["act"] == {"sub": "app-789", "act": {"sub": "app-123"}}
    assert 'grant="token-exchange"' in service.metrics_text()


async def test_exchanged_token_never_outlives_its_subject(service: RunningProxy) -> None:
    subject = mint(OTHER_SECRET, ttl=120, appId="app-1", sub="user-7")
    status, body = await exchange(service, subject)
    assert status == 200
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["exp"] <= jwt.decode(subject, options={"verify_signature": False})["exp"]
    assert body["expires_in"] <= 120


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param(lambda: mint(OTHER_SECRET, ttl=-100, appId="app-1", sub="u"), id="expired"),
        pytest.param(lambda: mint(b"q" * 32, appId="app-1", sub="u"), id="bad-signature"),
        pytest.param(lambda: credential(), id="app-not-exchangeable"),
    ],
)
async def test_bad_subject_token_is_invalid_request(service: RunningProxy, subject: Any) -> None:
    status, body = await exchange(service, subject())
    assert (status, body["error"]) == (400, "invalid_request")


async def test_issued_tokens_verify_with_jwcrypto_from_published_jwks(
    service: RunningProxy,
) -> None:
    _, body, _ = await token_request(service, {"grant_type": JWT_BEARER, "assertion": credential()})
    published = await (await service.get("/.well-known/jwks.json")).json()
    assert all(set(key) >= {"kid", "kty", "alg", "use"} for key in published["keys"])
    assert all("d" not in key for key in published["keys"])
    key_set = jc_jwk.JWKSet.from_json(json.dumps(published))
    verified = jc_jwt.JWT(jwt=body["access_token"], key=key_set, expected_type="JWS")
    claims = json.loads(verified.claims)
    assert claims["iss"] == ISSUER
    metadata = await (await service.get("/.well-known/oauth-authorization-server")).json()
    assert metadata["issuer"] == ISSUER
    assert metadata["token_endpoint"] == ISSUER + "/oauth/token"
    assert metadata["jwks_uri"] == ISSUER + "/.well-known/jwks.json"
    assert JWT_BEARER in metadata["grant_types_supported"]


async def test_key_rotation_across_reload(
    proxy_for: ProxyFactory, keys: KeyFiles, tmp_path: Path
) -> None:
    proxy = await proxy_for(service_config(keys, ("ec.key",)))
    _, before, _ = await token_request(proxy, {"grant_type": JWT_BEARER, "assertion": credential()})
    old_kid = jwt.get_unverified_header(before["access_token"])["kid"]
    data = {
        "upstream": {"url": proxy.config.upstream.url},  # type: ignore[union-attr]
        **service_config(keys, ("rsa.key", "ec.key")),
    }
    config = load(str(write_config(tmp_path, data, "rotated.yaml")))
    resources: Resources = proxy.proxy.resources
    proxy.proxy.swap(await resources.prepare(config))
    _, after, _ = await token_request(proxy, {"grant_type": JWT_BEARER, "assertion": credential()})
    header = jwt.get_unverified_header(after["access_token"])
    assert header["alg"] == "RS256"
    assert header["kid"] != old_kid
    published = await (await proxy.get("/.well-known/jwks.json")).json()
    assert [key["kid"] for key in published["keys"]] == [header["kid"], old_kid]
    assert (await proxy.get("/x", token=before["access_token"])).status == 200
    assert (await proxy.get("/x", token=after["access_token"])).status == 200


async def test_service_paths_come_before_routes(proxy_for: ProxyFactory, keys: KeyFiles) -> None:
    data = service_config(keys)
    data["routes"] = [{"path": "/oauth/*", "apps": ["app-1"]}, {"path": "/*"}]
    proxy = await proxy_for(data)
    assert (await proxy.get("/.well-known/jwks.json")).status == 200
    status, _, _ = await token_request(proxy, {"grant_type": JWT_BEARER, "assertion": credential()})
    assert status == 200
    get = await proxy.get("/oauth/token")
    assert get.status == 405


def test_check_refuses_an_app_matching_the_issuer(tmp_path: Path, keys: KeyFiles) -> None:
    from proxy.errors import ConfigError

    data = {"upstream": {"url": "http://127.0.0.1:9"}, **service_config(keys)}
    data["apps"].append(
        {"id": "shadow", "match": {"claim": "iss", "value": ISSUER}, "algorithms": ["HS256"],
         "secrets": [SECRET_B64]}
    )  # fmt: skip
    with pytest.raises(ConfigError) as raised:
        load(str(write_config(tmp_path, data)))
    assert any("apps[2].match" in line for line in raised.value.lines())


async def test_issued_tokens_expire(service: RunningProxy) -> None:
    _, body, _ = await token_request(service, {"grant_type": JWT_BEARER, "assertion": credential()})
    service.clock.now = time.time() + 2000
    response = await service.get("/x", token=body["access_token"])
    assert (await response.json())["error"]["reason"] == "expired"
