"""End to end: what a client of the proxy sees, for every reason word and every decision step."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from proxy.app import Resources
from proxy.config import load
from tests.conftest import (
    OTHER_SECRET,
    SECRET,
    SECRET_B64,
    Clock,
    ProxyFactory,
    mint,
    parse_head,
    raw_exchange,
    write_config,
)

OTHER_B64 = base64.b64encode(OTHER_SECRET).decode()
ISSUER = "https://issuer.example"

STRICT: dict[str, Any] = {
    "token": {"max_length": 2048, "sources": ["header:Authorization", "query:access_token"]},
    "apps": [
        {
            "id": "app-1",
            "match": {"claim": "appId"},
            "algorithms": ["HS256"],
            "secrets": [SECRET_B64],
            "issuer": ISSUER,
            "audience": ["api", "api2"],
            "required_claims": ["exp", "sub"],
            "claims": {"env": "production"},
            "max_lifetime": 3600,
        },
        {"id": "other-app", "match": {}, "algorithms": ["HS256"], "secrets": [OTHER_B64]},
    ],
    "routes": [
        {"path": "/public", "auth": "none"},
        {"path": "/optional/*", "auth": "optional"},
        {
            "path": "/v1/users/{userId}/*",
            "apps": ["app-1"],
            "scopes": ["threads:write"],
            "required_claims": ["userId"],
            "bind": {"userId": "path.userId"},
        },
        {"path": "/admin/*", "apps": ["other-app"]},
        {"path": "/*"},
    ],
}


def good(now: float | None = None, **overrides: Any) -> dict[str, Any]:
    """Claims that pass every check of STRICT's app-1."""
    claims: dict[str, Any] = {
        "appId": "app-1",
        "iss": ISSUER,
        "aud": "api",
        "sub": "user-42",
        "env": "production",
        "userId": "42",
        "scope": "threads:read threads:write",
    }
    claims.update(overrides)
    return claims


def raw_token(header: Any, payload: Any, signature: bytes = b"sig") -> str:
    """A token with exactly this header and payload (JSON text or objects), unsigned."""

    def encode(part: Any) -> str:
        text = part if isinstance(part, bytes) else json.dumps(part).encode()
        return base64.urlsafe_b64encode(text).rstrip(b"=").decode()

    return f"{encode(header)}.{encode(payload)}.{encode(signature)}"


def hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes = SECRET) -> str:
    """A correctly HS256-signed token with this exact header (PyJWT would add its own)."""
    import hashlib
    import hmac

    def encode(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = encode(json.dumps(header).encode()) + "." + encode(json.dumps(payload).encode())
    signature = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return signing + "." + encode(signature)


def hs256_text(payload: str, secret: bytes = SECRET) -> str:
    """A correctly HS256-signed token whose payload is exactly this JSON text."""
    import hashlib
    import hmac

    def encode(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = encode(b'{"alg":"HS256"}') + "." + encode(payload.encode())
    signature = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return signing + "." + encode(signature)


def good_text(**raw: str) -> str:
    """good()'s claims as JSON text, with members whose JSON text is given as is."""
    times = {"exp": int(time.time()) + 60, "iat": int(time.time())}
    fields = {k: v for k, v in {**good(), **times}.items() if k not in raw}
    claims = json.dumps(fields)
    return claims[:-1] + "".join(f', "{name}": {text}' for name, text in raw.items()) + "}"


# The contract's table, written out independently of proxy.errors.
INVALID = (401, 38, "TokenInvalid", "The token is invalid.")
FORBIDDEN = (403, 38, "TokenInvalid", "The token does not allow this request.")
CHALLENGE_INVALID = (
    'Bearer realm="api", error="invalid_token", error_description="The token is invalid."'
)
CHALLENGE_EXPIRED = (
    'Bearer realm="api", error="invalid_token", error_description="The token has expired."'
)
CHALLENGE_FORBIDDEN = (
    'Bearer realm="api", error="insufficient_scope", '
    'error_description="The token does not allow this request."'
)
CHALLENGE_MULTIPLE = (
    'Bearer realm="api", error="invalid_request", '
    'error_description="The request carries more than one token."'
)


def long_lived() -> dict[str, int]:
    return {"iat": int(time.time()), "exp": int(time.time() + 7200)}


CASES = [
    # (id, path, headers or token maker, expected status/code/name/message, challenge, reason)
    pytest.param(
        "/x", lambda: "not-a-jwt", INVALID, CHALLENGE_INVALID, "malformed", id="not-three-segments"
    ),
    pytest.param(
        "/x", lambda: "a.b.c.d", INVALID, CHALLENGE_INVALID, "malformed", id="four-segments"
    ),
    pytest.param(
        "/x",
        lambda: raw_token(b"not json", {"a": 1}),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="header-not-json",
    ),
    pytest.param(
        "/x",
        lambda: raw_token([1, 2], {"a": 1}),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="header-not-object",
    ),
    pytest.param(
        "/x",
        lambda: raw_token(b'{"alg":"HS256","alg":"none"}', {"a": 1}),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="duplicate-member",
    ),
    pytest.param(
        "/x",
        lambda: hs256({"alg": "HS256", "kid": 5}, good()),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="kid-not-string",
    ),
    pytest.param(
        "/x",
        lambda: mint(**good(exp="9999999999")),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="exp-numeric-string",
    ),
    pytest.param(
        "/x",
        lambda: mint(**good(exp=True)),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="exp-boolean",
    ),
    pytest.param(
        "/x",
        lambda: hs256({"alg": "HS256"}, good(iss=5, exp=int(time.time()) + 60)),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="iss-not-string",
    ),
    pytest.param(
        "/x",
        lambda: mint(**good(aud=[1])),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="aud-not-strings",
    ),
    pytest.param(
        "/x",
        lambda: mint(**good(userId="4\n2")),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="control-char-in-forwarded-claim",
    ),
    pytest.param(
        "/x",
        lambda: mint(**good(userId={"id": "42", "roles": ["a\r\nX-Admin: 1"]})),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="control-char-inside-forwarded-object",
    ),
    pytest.param(
        "/x",
        lambda: hs256_text(good_text(sub='"\\udfff"')),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="lone-surrogate-in-forwarded-claim",
    ),
    pytest.param(
        "/x",
        lambda: hs256_text(good_text(extra='{"list": ["\\ud800"]}')),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="lone-surrogate-nested",
    ),
    pytest.param(
        "/x",
        lambda: hs256_text(good_text(exp="1" + "0" * 400)),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="exp-400-digits",
    ),
    pytest.param(
        "/x",
        lambda: hs256_text(good_text(exp="1e999")),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="exp-1e999",
    ),
    pytest.param(
        "/x",
        lambda: hs256_text(good_text(nbf=str(2**63))),
        INVALID,
        CHALLENGE_INVALID,
        "malformed",
        id="nbf-beyond-2^63",
    ),
    pytest.param("/x", lambda: "a" * 3000, INVALID, CHALLENGE_INVALID, "too_long", id="too-long"),
    pytest.param(
        "/x",
        lambda: raw_token({"alg": "none"}, good(), b""),
        INVALID,
        CHALLENGE_INVALID,
        "alg_not_allowed",
        id="alg-none",
    ),
    pytest.param(
        "/x",
        lambda: raw_token({"alg": "NoNe"}, good(), b""),
        INVALID,
        CHALLENGE_INVALID,
        "alg_not_allowed",
        id="alg-none-any-case",
    ),
    pytest.param(
        "/x",
        lambda: raw_token({"typ": "JWT"}, good()),
        INVALID,
        CHALLENGE_INVALID,
        "alg_not_allowed",
        id="alg-missing",
    ),
    pytest.param(
        "/x",
        lambda: raw_token({"alg": "XS999"}, good()),
        INVALID,
        CHALLENGE_INVALID,
        "alg_not_allowed",
        id="alg-not-jws",
    ),
    pytest.param(
        "/x",
        lambda: mint(SECRET + b"x" * 16, alg="HS384", **good()),
        INVALID,
        CHALLENGE_INVALID,
        "alg_not_allowed",
        id="alg-outside-app-allowlist",
    ),
    pytest.param(
        "/x",
        lambda: mint(headers={"crit": ["exp"]}, **good()),
        INVALID,
        CHALLENGE_INVALID,
        "crit_header",
        id="crit",
    ),
    pytest.param(
        "/x",
        lambda: mint(headers={"typ": "dpop+jwt"}, **good()),
        INVALID,
        CHALLENGE_INVALID,
        "bad_typ",
        id="typ",
    ),
    pytest.param(
        "/x",
        lambda: mint(**good(appId="nobody")),
        INVALID,
        CHALLENGE_INVALID,
        "unknown_app",
        id="unknown-app",
    ),
    pytest.param(
        "/x",
        lambda: mint(b"w" * 32, **good()),
        INVALID,
        CHALLENGE_INVALID,
        "bad_signature",
        id="bad-signature",
    ),
    pytest.param(
        "/x",
        lambda: mint(now=time.time() - 400, ttl=300, **good()),
        (401, 40, "TokenExpired", "The token has expired."),
        CHALLENGE_EXPIRED,
        "expired",
        id="expired",
    ),
    pytest.param(
        "/x",
        lambda: mint(**good(nbf=int(time.time() + 300))),
        INVALID,
        CHALLENGE_INVALID,
        "not_yet_valid",
        id="nbf-future",
    ),
    pytest.param(
        "/x",
        lambda: mint(now=time.time() + 300, **good()),
        INVALID,
        CHALLENGE_INVALID,
        "not_yet_valid",
        id="iat-future",
    ),
    pytest.param(
        "/x",
        lambda: mint(**good(**long_lived())),
        INVALID,
        CHALLENGE_INVALID,
        "lifetime_too_long",
        id="lifetime",
    ),
    pytest.param(
        "/x",
        lambda: mint(**good(iss="https://evil.example")),
        INVALID,
        CHALLENGE_INVALID,
        "issuer",
        id="issuer",
    ),
    pytest.param(
        "/x",
        lambda: mint(**good(aud=["web"])),
        INVALID,
        CHALLENGE_INVALID,
        "audience",
        id="audience",
    ),
    pytest.param(
        "/x",
        lambda: mint(**good(sub=None)),
        INVALID,
        CHALLENGE_INVALID,
        "missing_claim",
        id="missing-claim",
    ),
    pytest.param(
        "/x",
        lambda: mint(**good(env="sandbox")),
        INVALID,
        CHALLENGE_INVALID,
        "claim_mismatch",
        id="claim-mismatch",
    ),
    pytest.param(
        "/admin/x",
        lambda: mint(**good()),
        FORBIDDEN,
        CHALLENGE_FORBIDDEN,
        "app_not_allowed",
        id="app-not-allowed",
    ),
    pytest.param(
        "/v1/users/42/threads",
        lambda: mint(**good(scope="threads:read")),
        FORBIDDEN,
        CHALLENGE_FORBIDDEN,
        "insufficient_scope",
        id="insufficient-scope",
    ),
    pytest.param(
        "/v1/users/42/threads",
        lambda: mint(**good(userId=None)),
        FORBIDDEN,
        CHALLENGE_FORBIDDEN,
        "route_missing_claim",
        id="route-missing-claim",
    ),
    pytest.param(
        "/v1/users/7/threads",
        lambda: mint(**good()),
        FORBIDDEN,
        CHALLENGE_FORBIDDEN,
        "binding_mismatch",
        id="binding-mismatch",
    ),
]


@pytest.mark.parametrize(("path", "make", "expected", "challenge", "reason"), CASES)
async def test_every_token_reason_end_to_end(
    proxy_for: ProxyFactory,
    path: str,
    make: Any,
    expected: tuple[int, int, str, str],
    challenge: str,
    reason: str,
) -> None:
    proxy = await proxy_for(STRICT)
    token = make()
    response = await proxy.get(path, token=token)
    status, code, name, message = expected
    assert response.status == status
    assert response.headers.getall("WWW-Authenticate") == [challenge]
    assert response.headers["Content-Type"] == "application/json"
    body = await response.json()
    assert body == {"error": {"code": code, "name": name, "message": message, "reason": reason}}
    assert len(response.headers["X-Request-Id"]) == 32
    assert token not in proxy.log_text()
    assert f'reason="{reason}"' in proxy.metrics_text()


async def test_missing_token_is_39_with_bare_challenge(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(STRICT)
    response = await proxy.get("/x")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert await response.json() == {
        "error": {
            "code": 39,
            "name": "TokenRequired",
            "message": "A token is required.",
            "reason": "missing",
        }
    }


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(
            [("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer d.e.f")],
            id="two-authorization-lines",
        ),
        pytest.param(
            [("Authorization", "Basic dTpw"), ("Authorization", "Bearer d.e.f")],
            id="two-authorization-lines-any-scheme",
        ),
    ],
)
async def test_multiple_tokens_is_400(
    proxy_for: ProxyFactory, headers: list[tuple[str, str]]
) -> None:
    proxy = await proxy_for(STRICT)
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
    raw = await raw_exchange(
        proxy.url, f"GET /x HTTP/1.1\r\nHost: a\r\n{lines}Connection: close\r\n\r\n".encode()
    )
    status, head, body = parse_head(raw)
    assert status == 400
    assert head["www-authenticate"] == [CHALLENGE_MULTIPLE]
    assert json.loads(body) == {
        "error": {
            "code": 38,
            "name": "TokenInvalid",
            "message": "The request carries more than one token.",
            "reason": "multiple_tokens",
        }
    }


async def test_token_in_header_and_query_is_multiple(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(STRICT)
    token = mint(**good())
    response = await proxy.get(f"/x?access_token={token}", token=token)
    assert response.status == 400
    assert (await response.json())["error"]["reason"] == "multiple_tokens"


async def test_bearer_without_token_is_malformed(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(STRICT)
    response = await proxy.get("/x", headers={"Authorization": "Bearer   "})
    assert response.status == 401
    assert (await response.json())["error"]["reason"] == "malformed"


@pytest.mark.parametrize(
    "value",
    [b"Bearer\t%s", b"Bearer,%s", b"Bearer\xc2\xa0%s", b"Bearer%s", b"bearer"],
    ids=["tab", "comma", "nbsp", "no-space", "alone"],
)
async def test_near_miss_bearer_never_passes_an_optional_route(
    proxy_for: ProxyFactory, upstream: Any, value: bytes
) -> None:
    proxy = await proxy_for(STRICT)
    forged = raw_token({"alg": "none"}, good(userId="1"), b"").encode()
    line = value % forged if b"%s" in value else value
    raw = await raw_exchange(
        proxy.url,
        b"GET /optional/page HTTP/1.1\r\nHost: a\r\nAuthorization: "
        + line
        + b"\r\nConnection: close\r\n\r\n",
    )
    status, head, body = parse_head(raw)
    assert (status, json.loads(body)["error"]["reason"]) == (401, "malformed")
    assert head["www-authenticate"] == [CHALLENGE_INVALID]
    assert upstream.seen == []


async def test_no_key_fitting_a_kidless_token_is_bad_signature(
    proxy_for: ProxyFactory, keys: Any
) -> None:
    # An RS256/ES256 app whose only key is RSA: an ES256 token without kid fits no key.
    app = {"id": "idp", "algorithms": ["RS256", "ES256"], "public_keys": [keys.path("rsa.pub")]}
    proxy = await proxy_for({"apps": [app]})
    claims = {"exp": int(time.time()) + 60}
    response = await proxy.get("/x", token=jwt.encode(claims, keys.private["ec"], "ES256"))
    assert response.status == 401
    assert (await response.json())["error"]["reason"] == "bad_signature"
    fitting = jwt.encode(claims, keys.private["rsa"], "RS256")
    assert (await proxy.get("/x", token=fitting)).status == 200


async def test_other_scheme_counts_as_no_token(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(STRICT)
    response = await proxy.get("/x", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status == 401
    assert (await response.json())["error"]["code"] == 39


async def test_bearer_scheme_is_case_insensitive(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(STRICT)
    token = mint(**good())
    response = await proxy.get("/x", headers={"Authorization": f"bEaReR   {token}"})
    assert response.status == 200


async def test_bad_path_is_400_without_challenge(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(STRICT)
    raw = await raw_exchange(
        proxy.url, b"GET /a/../../etc HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    status, head, body = parse_head(raw)
    assert status == 400
    assert "www-authenticate" not in head
    assert json.loads(body) == {
        "error": {
            "code": 400,
            "name": "BadRequest",
            "message": "The request path is not acceptable.",
            "reason": "bad_path",
        }
    }


async def test_expose_reason_false_hides_reason_but_logs_and_counts_it(
    proxy_for: ProxyFactory,
) -> None:
    proxy = await proxy_for({**STRICT, "errors": {"expose_reason": False, "realm": "things"}})
    response = await proxy.get("/x", token=mint(now=time.time() - 400, **good()))
    assert await response.json() == {
        "error": {"code": 40, "name": "TokenExpired", "message": "The token has expired."}
    }
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="things", ')
    assert proxy.log_lines()[-1]["reason"] == "expired"
    assert 'reason="expired"' in proxy.metrics_text()


@pytest.mark.interpreted  # patches a module global, which compiled code binds at import
async def test_internal_error_is_500_logged_with_traceback(
    proxy_for: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await proxy_for(STRICT)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr("proxy.exchange.decide_now", broken)
    response = await proxy.get("/x", token=mint(**good()))
    assert response.status == 500
    assert "WWW-Authenticate" not in response.headers
    assert await response.json() == {
        "error": {
            "code": 500,
            "name": "InternalError",
            "message": "The proxy failed to handle the request.",
            "reason": "internal",
        }
    }
    errors = [line for line in proxy.log_lines() if line["event"] == "internal_error"]
    assert "RuntimeError: a bug" in errors[0]["traceback"]


# --- Forwarding what the token proved ----------------------------------------------------------


@pytest.mark.parametrize(
    ("scopes", "status"),
    [
        pytest.param({"scope": None, "scp": ["threads:write"]}, 200, id="scp-list"),
        pytest.param({"scope": None, "scp": "a threads:write"}, 200, id="scp-string"),
        pytest.param({"scope": ["threads:write", 7]}, 200, id="scope-list"),
        pytest.param({"scope": "threads:read", "scp": ["threads:write"]}, 200, id="union"),
        pytest.param({"scope": "threads:writer"}, 403, id="no-prefix-match"),
        pytest.param({"scope": None, "scp": {"threads:write": True}}, 403, id="object-ignored"),
    ],
)
async def test_scopes_come_from_scope_and_scp(
    proxy_for: ProxyFactory, scopes: dict[str, Any], status: int
) -> None:
    proxy = await proxy_for(STRICT)
    claims = {k: v for k, v in good(**scopes).items() if v is not None}
    response = await proxy.get("/v1/users/42/threads", token=mint(**claims))
    assert response.status == status


async def test_valid_token_forwards_identity_and_request_id(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(STRICT)
    token = mint(**good(act={"sub": "app-9"}))
    response = await proxy.get("/v1/users/42/threads?a=1&b=%41", token=token)
    assert response.status == 200
    seen = await response.json()
    assert seen["target"] == "/v1/users/42/threads?a=1&b=%41"
    headers = seen["headers"]
    assert headers["X-Auth-App-Id"] == "app-1"
    assert headers["X-Auth-User-Id"] == "42"
    assert headers["X-Auth-Subject"] == "user-42"
    assert headers["X-Auth-Actor"] == "app-9"
    assert headers["Authorization"] == f"Bearer {token}"
    assert headers["X-Request-Id"] == response.headers["X-Request-Id"]
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    line = proxy.log_lines()[-1]
    assert line["event"] == "request"
    assert line["route"] == "/v1/users/{userId}/*"
    assert line["path"] == "/v1/users/42/threads"
    assert line["outcome"] == "forwarded" and line["status"] == 200 and line["app"] == "app-1"
    assert set(line) >= {
        "time",
        "level",
        "request_id",
        "method",
        "client",
        "duration_ms",
        "upstream_ms",
        "bytes_in",
        "bytes_out",
        "reason",
    }
    assert token not in proxy.log_text()


IDENTITY = {
    "forward": {
        "identity_headers": {
            "X-Id-Int": "n",
            "X-Id-Float": "f",
            "X-Id-Bool": "b",
            "X-Id-List": "roles",
            "X-Id-Obj": "org",
            "X-Id-Nested": "org.name",
            "X-Id-Absent": "nothere",
            "X-Id-Utf8": "name",
            "X-Id-App": "@app",
        },
        "claims_header": "X-Auth-Claims",
    }
}


async def test_identity_header_values_by_claim_type(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(IDENTITY)
    token = proxy.token(
        n=42, f=1.5, b=True, roles=["a", "b"], org={"name": "Acme", "id": 7}, name="Zoë"
    )
    response = await proxy.get("/x", token=token)
    seen = await response.json()
    raw = dict(seen["raw_headers"])
    assert raw["X-Id-Int"] == "42"
    assert raw["X-Id-Float"] == "1.5"
    assert raw["X-Id-Bool"] == "true"
    assert raw["X-Id-List"] == '["a","b"]'
    assert raw["X-Id-Obj"] == '{"name":"Acme","id":7}'
    assert raw["X-Id-Nested"] == "Acme"
    assert raw["X-Id-App"] == "app-1"
    assert raw["X-Id-Utf8"].encode("latin-1").decode("utf-8") == "Zoë"
    assert "X-Id-Absent" not in raw
    claims_b64 = raw["X-Auth-Claims"]
    assert "=" not in claims_b64
    decoded = json.loads(base64.urlsafe_b64decode(claims_b64 + "=" * (-len(claims_b64) % 4)))
    assert decoded == jwt.decode(token, options={"verify_signature": False})


SPOOFS = {
    "X-Auth-User-Id": "admin",
    "x-auth-app-id": "root-app",
    "X_Auth_Subject": "evil",
    "x_auth_actor": "evil",
    "X-Auth-Claims": "e30",
}


@pytest.mark.parametrize(
    ("path", "with_token"),
    [
        pytest.param("/public", False, id="auth-none"),
        pytest.param("/optional/x", False, id="optional-without-token"),
        pytest.param("/x", True, id="required"),
    ],
)
async def test_spoofed_identity_headers_never_reach_upstream(
    proxy_for: ProxyFactory, path: str, with_token: bool
) -> None:
    proxy = await proxy_for({**STRICT, "forward": {"claims_header": "X-Auth-Claims"}})
    token = mint(**good(userId=None)) if with_token else None
    response = await proxy.get(path, token=token, headers=SPOOFS)
    assert response.status == 200
    seen = await response.json()
    names = [name.lower().replace("_", "-") for name, _ in seen["raw_headers"]]
    values = [value for _, value in seen["raw_headers"]]
    for spoof in ("admin", "root-app", "evil", "e30"):
        assert spoof not in values
    if with_token:
        assert names.count("x-auth-app-id") == 1
        assert dict(seen["raw_headers"])["X-Auth-App-Id"] == "app-1"
    else:
        assert "x-auth-app-id" not in names
    assert "x-auth-user-id" not in names


async def test_request_id_kept_when_sane_and_replaced_when_not(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(STRICT)
    kept = await proxy.get("/public", headers={"X-Request-Id": "abc.DEF-1:2_3"})
    assert kept.headers["X-Request-Id"] == "abc.DEF-1:2_3"
    assert (await kept.json())["headers"]["X-Request-Id"] == "abc.DEF-1:2_3"
    replaced = await proxy.get("/public", headers={"X-Request-Id": "bad id <script>"})
    assert replaced.headers["X-Request-Id"] != "bad id <script>"
    assert len(replaced.headers["X-Request-Id"]) == 32
    rejected = await proxy.get("/x", headers={"X-Request-Id": "r-1"})
    assert rejected.status == 401
    assert rejected.headers["X-Request-Id"] == "r-1"
    assert proxy.log_lines()[-1]["request_id"] == "r-1"


async def test_optional_route(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(STRICT)
    anonymous = await proxy.get("/optional/page")
    assert anonymous.status == 200
    assert "X-Auth-App-Id" not in (await anonymous.json())["headers"]
    identified = await proxy.get("/optional/page", token=mint(**good()))
    assert (await identified.json())["headers"]["X-Auth-App-Id"] == "app-1"
    bad = await proxy.get("/optional/page", token=mint(b"w" * 32, **good()))
    assert bad.status == 401
    assert (await bad.json())["error"]["reason"] == "bad_signature"


async def test_route_claims_roles_rule(proxy_for: ProxyFactory, upstream: Any) -> None:
    routes = [{"path": "/ops/*", "claims": {"roles": ["admin", "ops"]}}, {"path": "/*"}]
    proxy = await proxy_for({"routes": routes})
    allowed = await proxy.get("/ops/deploy", token=proxy.token(roles=["viewer", "ops"]))
    assert allowed.status == 200
    assert len(upstream.seen) == 1
    for token in (proxy.token(roles=["viewer"]), proxy.token(), proxy.token(roles="Admin")):
        response = await proxy.get("/ops/deploy", token=token)
        assert response.status == 403
        assert response.headers["WWW-Authenticate"] == CHALLENGE_FORBIDDEN
        assert await response.json() == {
            "error": {
                "code": 38,
                "name": "TokenInvalid",
                "message": "The token does not allow this request.",
                "reason": "route_claim_mismatch",
            }
        }
    assert len(upstream.seen) == 1
    assert 'reason="route_claim_mismatch"' in proxy.metrics_text()
    assert (await proxy.get("/elsewhere", token=proxy.token())).status == 200


async def test_route_without_match_requires_a_token(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"routes": [{"path": "/public/*", "auth": "none"}]})
    assert (await proxy.get("/public/a")).status == 200
    assert (await proxy.get("/elsewhere")).status == 401
    assert (await proxy.get("/elsewhere", token=proxy.token())).status == 200


async def test_methods_try_only_routes_with_the_same_pattern(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(
        {
            "routes": [
                {"path": "/docs/*", "methods": ["GET"], "auth": "none"},
                {"path": "/docs/*", "methods": ["POST"]},
                {"path": "/*", "auth": "none"},
            ]
        }
    )
    assert (await proxy.get("/docs/a")).status == 200
    post = await proxy.request("POST", "/docs/a")
    assert post.status == 401  # the POST rule of the same pattern: a token is required
    delete = await proxy.request("DELETE", "/docs/a")
    assert delete.status == 405  # never the later, broader /*
    assert delete.headers["Allow"] == "GET, POST"


# SPEC §3's example routes (and issue 17's /admin/* route): user 42 must not reach another
# user's threads, nor /admin, by choosing a method the stricter route does not list.
SPEC_ROUTES = {
    "apps": [
        {"id": "TR21063826", "match": {}, "algorithms": ["HS256"], "secrets": [SECRET_B64]},
        {"id": "admin-app", "match": {}, "algorithms": ["HS256"], "secrets": [OTHER_B64]},
    ],
    "routes": [
        {"path": "/healthz", "auth": "none"},
        {
            "path": "/v1/users/{userId}/threads/*",
            "methods": ["GET", "POST"],
            "apps": ["TR21063826"],
            "scopes": ["threads:write"],
            "required_claims": ["userId"],
            "bind": {"userId": "path.userId"},
        },
        {"path": "/admin/*", "methods": ["GET", "POST"], "apps": ["admin-app"]},
        {"path": "/*", "auth": "required"},
    ],
}


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
@pytest.mark.parametrize("path", ["/v1/users/43/threads/1", "/admin/users/1"])
async def test_an_unlisted_method_is_405_not_the_catch_all(
    proxy_for: ProxyFactory, upstream: Any, method: str, path: str
) -> None:
    proxy = await proxy_for(SPEC_ROUTES)
    token = mint(appId="TR21063826", userId="42", scope="threads:write")
    response = await proxy.request(method, path, token=token)
    assert response.status == 405
    assert response.headers["Allow"] == "GET, POST"
    assert "WWW-Authenticate" not in response.headers
    assert await response.json() == {
        "error": {
            "code": 405,
            "name": "MethodNotAllowed",
            "message": "The method is not allowed for this path.",
            "reason": "method_not_allowed",
        }
    }
    assert upstream.seen == []
    assert 'outcome="MethodNotAllowed",reason="method_not_allowed"' in proxy.metrics_text()
    line = proxy.log_lines()[-1]
    pattern = "/admin/*" if path.startswith("/admin") else "/v1/users/{userId}/threads/*"
    assert (line["status"], line["route"]) == (405, pattern)


@pytest.mark.parametrize(("preflight", "status"), [("pass", 200), ("check", 401)])
async def test_cors_preflight(proxy_for: ProxyFactory, preflight: str, status: int) -> None:
    proxy = await proxy_for({"preflight": preflight})
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    response = await proxy.request("OPTIONS", "/x", headers=headers)
    assert response.status == status
    plain_options = await proxy.request("OPTIONS", "/x")
    assert plain_options.status == 401


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\n\r\nhello",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_a_preflight_with_a_body_needs_a_token(
    proxy_for: ProxyFactory, upstream: Any, framing: bytes
) -> None:
    proxy = await proxy_for({"preflight": "pass"})
    raw = await raw_exchange(
        proxy.url,
        b"OPTIONS /x HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example\r\n"
        b"Access-Control-Request-Method: POST\r\nConnection: close\r\n" + framing,
    )
    status, _, body = parse_head(raw)
    assert (status, json.loads(body)["error"]["reason"]) == (401, "missing")
    assert upstream.seen == []
    empty = await raw_exchange(
        proxy.url,
        b"OPTIONS /x HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example\r\n"
        b"Access-Control-Request-Method: POST\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    assert parse_head(empty)[0] == 200  # no body: still a preflight


async def test_leeway_accepts_recent_expiry(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"token": {"leeway": 30}})
    assert (
        await proxy.get("/x", token=proxy.token(now=proxy.clock.now - 310, ttl=300))
    ).status == 200
    assert (
        await proxy.get("/x", token=proxy.token(now=proxy.clock.now - 340, ttl=300))
    ).status == 401


async def test_secret_rotation_accepts_older_secrets(proxy_for: ProxyFactory) -> None:
    apps = [
        {
            "id": "app-1",
            "match": {},
            "algorithms": ["HS256", "HS384"],
            "secrets": [OTHER_B64, SECRET_B64],
        }
    ]
    proxy = await proxy_for({"apps": apps})
    assert (await proxy.get("/x", token=proxy.token(OTHER_SECRET))).status == 200
    old = proxy.token(SECRET + b"x" * 16, alg="HS384")
    assert (await proxy.get("/x", token=old)).status == 401
    assert (await proxy.get("/x", token=proxy.token(SECRET))).status == 200


async def test_catch_all_app_takes_unmatched_tokens(proxy_for: ProxyFactory) -> None:
    apps = [
        {
            "id": "named",
            "match": {"claim": "iss", "value": "https://host.example"},
            "algorithms": ["HS256"],
            "secrets": [OTHER_B64],
        },
        {"id": "fallback", "algorithms": ["HS256"], "secrets": [SECRET_B64]},
    ]
    proxy = await proxy_for({"apps": apps})
    named = await proxy.get("/x", token=mint(OTHER_SECRET, iss="https://host.example"))
    assert (await named.json())["headers"]["X-Auth-App-Id"] == "named"
    other = await proxy.get("/x", token=mint(SECRET, iss="https://else.example"))
    assert (await other.json())["headers"]["X-Auth-App-Id"] == "fallback"
    # a token naming the first app's issuer is that app's, even if the fallback's key signed it
    confused = await proxy.get("/x", token=mint(SECRET, iss="https://host.example"))
    assert (await confused.json())["error"]["reason"] == "bad_signature"


async def test_query_and_cookie_sources(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"token": {"sources": ["query:access_token", "cookie:session"]}})
    token = proxy.token()
    via_query = await proxy.get(f"/x?a=1&access_token={token}&b=2")
    assert via_query.status == 200
    assert (await via_query.json())["target"] == f"/x?a=1&access_token={token}&b=2"
    raw = await raw_exchange(
        proxy.url,
        f"GET /x HTTP/1.1\r\nHost: a\r\nCookie: theme=dark\r\nCookie: session={token}; "
        f"lang=en\r\nConnection: close\r\n\r\n".encode(),
    )
    assert parse_head(raw)[0] == 200
    twice = await raw_exchange(
        proxy.url,
        f"GET /x HTTP/1.1\r\nHost: a\r\nCookie: session={token}\r\nCookie: session={token}\r\n"
        f"Connection: close\r\n\r\n".encode(),
    )
    assert parse_head(twice)[0] == 400
    repeated_query = await proxy.get(f"/x?access_token={token}&access_token={token}")
    assert repeated_query.status == 400


async def test_forward_token_false_removes_it_from_where_it_came(
    proxy_for: ProxyFactory,
) -> None:
    proxy = await proxy_for(
        {
            "forward": {"token": False},
            "token": {"sources": ["header:Authorization", "query:t", "cookie:jwt"]},
        }
    )
    token = proxy.token()
    header = await (await proxy.get("/x", token=token)).json()
    assert "Authorization" not in header["headers"]
    query = await (await proxy.get(f"/x?a=%20&t={token}&z")).json()
    assert query["target"] == "/x?a=%20&z"
    cookie = await (await proxy.get("/x", headers={"Cookie": f"a=1; jwt={token}; b=2"})).json()
    assert cookie["headers"]["Cookie"] == "a=1; b=2"
    assert token not in json.dumps([header, query, cookie])


@pytest.mark.parametrize(
    ("name", "sent"),
    [("a+b", "a+b"), ("a+b", "a%2Bb"), ("a b", "a+b"), ("a%20b", "a%20b"), ("a%20b", "a%2520b")],
)
async def test_forward_token_false_removes_a_query_token_however_its_name_is_spelled(
    proxy_for: ProxyFactory, upstream: Any, name: str, sent: str
) -> None:
    """The pair the token was read from is the pair removed: a name with `+` or `%` is
    matched as sent and percent-decoded, both when reading and when removing."""
    proxy = await proxy_for({"forward": {"token": False}, "token": {"sources": [f"query:{name}"]}})
    token = proxy.token()
    response = await proxy.get(f"/x?a=1&{sent}={token}&b=%20")
    assert response.status == 200  # the token was read...
    assert (await response.json())["target"] == "/x?a=1&b=%20"  # ...and removed, the rest kept
    assert token not in json.dumps(upstream.seen)


async def test_forward_token_false_removes_a_cookie_token_with_a_non_ascii_name(
    proxy_for: ProxyFactory, upstream: Any
) -> None:
    """Cookie lines are read as UTF-8 text, and removed in the same reading: not a Latin-1
    spelling of the name that never matches the bytes sent."""
    proxy = await proxy_for({"forward": {"token": False}, "token": {"sources": ["cookie:jwté"]}})
    token = proxy.token()
    cookie = f"Cookie: a=1; jwté={token}; b=ü".encode()
    head = b"GET /x HTTP/1.1\r\nHost: a\r\n" + cookie + b"\r\nConnection: close\r\n\r\n"
    raw = await raw_exchange(proxy.url, head)
    assert parse_head(raw)[0] == 200
    assert [value for name, value in upstream.seen[-1]["raw_headers"] if name == "Cookie"] == [
        "a=1; b=ü".encode().decode("latin-1")
    ]
    assert token not in json.dumps(upstream.seen)


async def test_route_sources_open_the_query_only_where_listed(
    proxy_for: ProxyFactory, upstream: Any
) -> None:
    proxy = await proxy_for(
        {
            "forward": {"token": False},
            "routes": [{"path": "/ws/*", "sources": ["query:access_token"]}, {"path": "/*"}],
        }
    )
    token = proxy.token()
    allowed = await proxy.get(f"/ws/chat?a=1&access_token={token}&b=2")
    assert allowed.status == 200
    seen = await allowed.json()
    assert seen["target"] == "/ws/chat?a=1&b=2"  # forward.token false: removed from the query
    assert seen["headers"]["X-Auth-App-Id"] == "app-1"
    header = await proxy.get("/ws/chat", token=token)
    assert (header.status, (await header.json())["error"]["reason"]) == (401, "missing")
    elsewhere = await proxy.get(f"/api?access_token={token}")
    assert (elsewhere.status, (await elsewhere.json())["error"]["reason"]) == (401, "missing")
    plain = await proxy.get("/api", token=token)
    assert plain.status == 200
    assert "Authorization" not in (await plain.json())["headers"]
    assert token not in json.dumps(upstream.seen)


async def test_case_insensitive_paths_match_but_keep_case(proxy_for: ProxyFactory) -> None:
    routes = [
        {"path": "/admin/*", "apps": ["other"]},
        {"path": "/users/{userId}", "bind": {"userId": "path.userId"}},
        {"path": "/*", "auth": "none"},
    ]
    apps = [
        *STRICT["apps"][:1],
        {"id": "other", "match": {}, "algorithms": ["HS256"], "secrets": [OTHER_B64]},
    ]
    insensitive = await proxy_for({"routes": routes, "apps": apps, "case_insensitive_paths": True})
    response = await insensitive.get("/ADMIN/Panel", token=mint(**good()))
    assert response.status == 403
    bound = await insensitive.get("/USERS/Ab", token=mint(**good(userId="Ab")))
    assert bound.status == 200
    assert (await bound.json())["target"] == "/USERS/Ab"
    sensitive = await proxy_for({"routes": routes, "apps": apps})
    assert (await sensitive.get("/ADMIN/Panel")).status == 200  # another resource then


# --- Path attacks never reach a stricter route's upstream unchecked ----------------------------

ATTACK_ROUTES = {
    "routes": [
        {"path": "/admin/*", "apps": ["admins"]},
        {"path": "/*", "auth": "none"},
    ],
    "apps": [
        {"id": "admins", "match": {}, "algorithms": ["HS256"], "secrets": [OTHER_B64]},
        {
            "id": "app-1",
            "match": {"claim": "appId"},
            "algorithms": ["HS256"],
            "secrets": [SECRET_B64],
        },
    ],
}


@pytest.mark.parametrize(
    "target",
    [
        "/public/../admin/users",
        "/public/%2e%2e/admin/users",
        "/public/%2E%2e/admin/users",
        "/admin;x/users",
        "/admin/;x/users",
        "/admin;jsessionid=1",
        "//admin/users",
        "/./admin/users",
        "/admin/./users",
        "/%61dmin/users",
        "http://a/admin/users",
    ],
)
async def test_path_variants_are_judged_as_admin(
    proxy_for: ProxyFactory, upstream: Any, target: str
) -> None:
    proxy = await proxy_for(ATTACK_ROUTES)
    raw = await raw_exchange(
        proxy.url, f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    assert parse_head(raw)[0] == 401, target
    assert upstream.seen == []


@pytest.mark.parametrize(
    "target",
    [
        "/public/..;/admin/users",
        "/public/%2e%2e;x/admin",
        "/admin%2Fusers",
        "/admin%2fusers",
        "/admin%5cusers",
        "/public/%00",
        "/a%zz",
        "/a%4",
        "/../admin",
        "http://other-host/admin/users",
        "admin/users",
    ],
)
async def test_path_attacks_are_bad_path(
    proxy_for: ProxyFactory, upstream: Any, target: str
) -> None:
    proxy = await proxy_for(ATTACK_ROUTES)
    raw = await raw_exchange(
        proxy.url, f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    status, _, body = parse_head(raw)
    assert status == 400, target
    assert b"bad_path" in body
    assert upstream.seen == []


async def test_backslash_never_reaches_upstream(proxy_for: ProxyFactory, upstream: Any) -> None:
    proxy = await proxy_for(ATTACK_ROUTES)
    raw = await raw_exchange(
        proxy.url, b"GET /public\\..\\admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert parse_head(raw)[0] == 400
    assert upstream.seen == []


async def test_normalised_path_is_forwarded(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(ATTACK_ROUTES)
    raw = await raw_exchange(
        proxy.url,
        b"GET /a//b/./c/../%7euser;v=1/%2a?q=%2e%2e&x HTTP/1.1\r\nHost: a\r\n"
        b"Connection: close\r\n\r\n",
    )
    status, _, body = parse_head(raw)
    assert status == 200
    assert json.loads(body)["target"] == "/a/b/~user;v=1/%2A?q=%2e%2e&x"


# --- Verified-token cache ---------------------------------------------------------------------


async def test_cache_hits_are_counted_and_never_outlive_exp(proxy_for: ProxyFactory) -> None:
    clock = Clock()
    proxy = await proxy_for({"token": {"leeway": 0, "cache_ttl": 600}}, clock=clock)
    token = proxy.token(ttl=100)
    for _ in range(3):
        assert (await proxy.get("/x", token=token)).status == 200
    text = proxy.metrics_text()
    assert 'token_proxy_token_cache_requests_total{result="hit"} 2.0' in text
    assert 'token_proxy_token_cache_requests_total{result="miss"} 1.0' in text
    clock.now += 101
    expired = await proxy.get("/x", token=token)
    assert expired.status == 401
    assert (await expired.json())["error"]["reason"] == "expired"


async def test_cache_holds_at_most_cache_size_tokens(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({"token": {"cache_size": 2, "cache_ttl": 600}})
    first, second, third = (proxy.token(jti=f"t{n}") for n in range(3))
    for token in (first, second, first, third, second, first):
        assert (await proxy.get("/x", token=token)).status == 200
    text = proxy.metrics_text()
    # first, second: misses; first: a hit; third evicts first (the oldest); second: a hit;
    # first: verified again, a miss
    assert 'token_proxy_token_cache_requests_total{result="hit"} 2.0' in text
    assert 'token_proxy_token_cache_requests_total{result="miss"} 4.0' in text


async def test_cached_token_within_leeway_after_exp(proxy_for: ProxyFactory) -> None:
    clock = Clock()
    proxy = await proxy_for({"token": {"leeway": 30, "cache_ttl": 600}}, clock=clock)
    token = proxy.token(ttl=100)
    assert (await proxy.get("/x", token=token)).status == 200
    clock.now += 110  # past exp, inside the leeway: still good
    assert (await proxy.get("/x", token=token)).status == 200
    clock.now += 21  # past exp + leeway
    assert (await (await proxy.get("/x", token=token)).json())["error"]["reason"] == "expired"


async def test_route_checks_run_on_cache_hits(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for(STRICT)
    token = mint(**good())
    assert (await proxy.get("/v1/users/42/a", token=token)).status == 200
    assert (await proxy.get("/v1/users/7/a", token=token)).status == 403
    assert (await proxy.get("/admin/a", token=token)).status == 403


async def test_reload_empties_the_cache(proxy_for: ProxyFactory, tmp_path: Any) -> None:
    proxy = await proxy_for({})
    token = proxy.token()
    assert (await proxy.get("/x", token=token)).status == 200
    rotated = {
        "upstream": {"url": proxy.config.upstream.url},  # type: ignore[union-attr]
        "apps": [{"id": "app-1", "match": {}, "algorithms": ["HS256"], "secrets": [OTHER_B64]}],
    }
    config = load(str(write_config(tmp_path, rotated, "rotated.yaml")))
    resources: Resources = proxy.proxy.resources
    proxy.proxy.swap(await resources.prepare(config))
    response = await proxy.get("/x", token=token)
    assert response.status == 401
    assert (await response.json())["error"]["reason"] == "bad_signature"


async def test_bad_input_never_crashes(proxy_for: ProxyFactory) -> None:
    proxy = await proxy_for({**STRICT, "token": {"max_length": 8192}})
    deep = raw_token({"alg": "HS256"}, b"[" * 3000 + b"]" * 3000)
    response = await proxy.get("/x", token=deep)
    assert (await response.json())["error"]["reason"] == "malformed"
    huge_number = raw_token({"alg": "HS256"}, b'{"exp": 1' + b"0" * 5000 + b"}")
    response = await proxy.get("/x", token=huge_number)
    assert (await response.json())["error"]["reason"] == "malformed"
    nan = hs256({"alg": "HS256"}, {"exp": 1}).split(".")
    nan[1] = base64.urlsafe_b64encode(b'{"exp": NaN}').rstrip(b"=").decode()
    response = await proxy.get("/x", token=".".join(nan))
    assert (await response.json())["error"]["reason"] == "malformed"
    raw = await raw_exchange(
        proxy.url,
        b"GET /caf\xe9/\xff\xfe HTTP/1.1\r\nHost: a\r\nX-Odd: \xff\r\nConnection: close\r\n\r\n",
    )
    assert parse_head(raw)[0] in (400, 401)
    assert (await proxy.get("/public")).status == 200  # and the proxy still serves
