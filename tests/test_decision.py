"""The decision core (SPEC §4), called directly: no listener, no upstream.

config = build({"routes": [...]})
await decide(view("DELETE", "/v1/users/43/threads/1", token), config, verifier(config), now)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from multidict import CIMultiDict

from proxy.config import Config, load
from proxy.decision import Decision, decide, match_route
from proxy.errors import Reason, Rejection
from proxy.explain import explain
from proxy.keys import AppKeys
from proxy.model import RequestView
from proxy.state import compile_core
from proxy.tokens import Verifier
from tests.conftest import OTHER_SECRET, SECRET, SECRET_B64, KeyFiles, mint

OTHER_B64 = __import__("base64").b64encode(OTHER_SECRET).decode()

# SPEC §3's example routes, with the `/admin/*` route of issue 17 defect 5.
SPEC_EXAMPLE: dict[str, Any] = {
    "upstream": {"url": "http://127.0.0.1:9"},
    "apps": [
        {
            "id": "TR21063826",
            "match": {"claim": "appId"},
            "algorithms": ["HS256"],
            "secrets": [SECRET_B64],
        },
        {
            "id": "admin-app",
            "match": {"claim": "appId"},
            "algorithms": ["HS256"],
            "secrets": [OTHER_B64],
        },
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


def build(data: dict[str, Any], tmp_path: Path | None = None) -> Config:
    """A loaded config from a dict (the default upstream and apps filled in)."""
    data = {"upstream": SPEC_EXAMPLE["upstream"], "apps": SPEC_EXAMPLE["apps"], **data}
    where = str((tmp_path or Path.cwd()) / "proxy.yaml")
    return load(where, env={}, text=yaml.safe_dump(data, sort_keys=False))


def verifier(config: Config) -> Verifier:
    return Verifier(config, {app.id: AppKeys(app) for app in config.apps})


def view(method: str, target: str, token: str | None = None, **headers: str) -> RequestView:
    all_headers: CIMultiDict[str] = CIMultiDict(Host="api.example")
    if token is not None:
        all_headers["Authorization"] = "Bearer " + token
    for name, value in headers.items():
        all_headers[name.replace("_", "-")] = value
    return RequestView(method, target, all_headers, "127.0.0.1")


async def run(config: Config, request: RequestView) -> Decision | Rejection:
    """The decision, or the rejection it raised."""
    try:
        return await decide(request, config, verifier(config), time.time())
    except Rejection as rejection:
        return rejection


def user_42() -> str:
    return mint(SECRET, appId="TR21063826", userId="42", scope="threads:write")


# --- Step 2: methods never open a path to a weaker route ---------------------------------------


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
@pytest.mark.parametrize("target", ["/v1/users/43/threads/1", "/admin/users/1"])
async def test_methods_never_fall_through_to_the_catch_all(method: str, target: str) -> None:
    config = build({"routes": SPEC_EXAMPLE["routes"]})
    result = await run(config, view(method, target, user_42()))
    assert isinstance(result, Rejection), f"{method} {target} was forwarded"
    assert result.reason.value == "method_not_allowed"
    assert getattr(result, "allow", None) == "GET, POST"
    assert result.route == SPEC_EXAMPLE["routes"][1 if target.startswith("/v1") else 2]["path"]


async def test_the_listed_methods_still_get_their_route() -> None:
    config = build({"routes": SPEC_EXAMPLE["routes"]})
    result = await run(config, view("POST", "/v1/users/42/threads/1", user_42()))
    assert isinstance(result, Decision)
    assert result.route is not None and result.route.pattern.pattern.startswith("/v1/users/")
    other_user = await run(config, view("GET", "/v1/users/43/threads/1", user_42()))
    assert isinstance(other_user, Rejection)
    assert other_user.reason.value == "binding_mismatch"


def test_later_routes_with_the_same_pattern_are_tried() -> None:
    config = build(
        {
            "routes": [
                {"path": "/docs/{page}", "methods": ["GET"], "auth": "none"},
                {"path": "/docs/*", "methods": ["PUT"]},
                {"path": "/docs/{name}", "methods": ["POST", "GET"], "apps": ["admin-app"]},
                {"path": "/*", "auth": "none"},
            ]
        }
    )
    route, params = match_route(config.routes, "POST", "/docs/a")
    assert route is config.routes[2]
    assert params == {"name": "a"}  # the parameters under that route's own names
    route, _ = match_route(config.routes, "GET", "/docs/a")
    assert route is config.routes[0]
    with pytest.raises(Rejection) as raised:
        match_route(config.routes, "PUT", "/docs/a")  # /docs/* is another pattern
    assert raised.value.reason.value == "method_not_allowed"
    assert getattr(raised.value, "allow", None) == "GET, POST"


def test_a_route_without_methods_takes_every_method() -> None:
    config = build({"routes": [{"path": "/a/*", "methods": ["GET"]}, {"path": "/a/*"}]})
    route, _ = match_route(config.routes, "DELETE", "/a/b")
    assert route is config.routes[1]
    assert match_route(config.routes, "GET", "/elsewhere") == (None, {})


# --- Step 3: a near-miss Bearer is never "no token" --------------------------------------------

OPTIONAL = {"routes": [{"path": "/*", "auth": "optional"}]}
UNSIGNED = "eyJhbGciOiJub25lIn0.eyJ1c2VySWQiOiIxIn0."  # {"alg":"none"}.{"userId":"1"}.


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(f"Bearer\t{UNSIGNED}", id="tab"),
        pytest.param("Bearer,x", id="comma"),
        pytest.param("Bearer\xa0x", id="nbsp"),
        pytest.param(f"Bearer{UNSIGNED}", id="no-space"),
        pytest.param(f"BEARER\t{UNSIGNED}", id="tab-any-case"),
        pytest.param("Bearer", id="scheme-alone"),
        pytest.param("bearer   ", id="spaces-only"),
    ],
)
async def test_near_miss_bearer_is_malformed_on_an_optional_route(value: str) -> None:
    config = build(OPTIONAL)
    result = await run(config, view("GET", "/x", Authorization=value))
    assert isinstance(result, Rejection), f"{value!r} went upstream unverified"
    assert result.reason.value == "malformed"


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Digest x", "Bear x", "Token x"])
async def test_another_scheme_is_still_no_token(value: str) -> None:
    config = build(OPTIONAL)
    result = await run(config, view("GET", "/x", Authorization=value))
    assert isinstance(result, Decision)
    assert result.verified is None


# --- Step 7: claims a signature cannot make sane ------------------------------------------------


def signed(payload: bytes, secret: bytes = SECRET) -> str:
    """An HS256 token whose payload is exactly this JSON text."""
    import base64
    import hashlib
    import hmac

    def encode(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = encode(b'{"alg":"HS256","typ":"JWT"}') + "." + encode(payload)
    return signing + "." + encode(hmac.new(secret, signing.encode(), hashlib.sha256).digest())


NOW = int(time.time())


def payload_with(extra: str, times: str = f'"exp":{NOW + 300},"iat":{NOW}') -> str:
    """A payload's JSON text: the app's match claim, the times, then `extra` as is."""
    return '{"appId":"TR21063826",' + times + extra + "}"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(payload_with(',"sub":"\\udfff"'), id="lone-surrogate-forwarded"),
        pytest.param(payload_with(',"note":"a\\ud800b"'), id="lone-surrogate-not-forwarded"),
        pytest.param(payload_with(',"d":{"a":[1,{"b":"\\udc00"}]}'), id="lone-surrogate-nested"),
        pytest.param(payload_with(',"x":{"\\udfff":1}'), id="lone-surrogate-member-name"),
        pytest.param(payload_with("", '"exp":1' + "0" * 400), id="exp-400-digits"),
        pytest.param(payload_with("", '"exp":1e999'), id="exp-1e999"),
        pytest.param(payload_with("", '"exp":-1e999'), id="exp-minus-1e999"),
        pytest.param(payload_with(f',"nbf":{2**63}'), id="nbf-2^63"),
        pytest.param(payload_with("", f'"iat":{-(2**63) - 1}'), id="iat-below-minus-2^63"),
        pytest.param(payload_with(',"nbf":"1"'), id="nbf-numeric-string"),
        pytest.param(payload_with(',"nbf":false'), id="nbf-boolean"),
    ],
)
async def test_odd_claims_are_malformed_never_a_crash(payload: str) -> None:
    config = build({"forward": {"claims_header": "X-Auth-Claims"}})
    with pytest.raises(Rejection) as raised:
        await verifier(config).verify_fresh(signed(payload.encode()), time.time())
    assert raised.value.reason.value == "malformed"


async def test_paired_surrogates_and_large_finite_times_are_fine() -> None:
    config = build({"forward": {"claims_header": "X-Auth-Claims"}})
    payload = payload_with(f',"sub":"\\ud83d\\ude00","nbf":{-(2**62)}')
    verified = await verifier(config).verify_fresh(signed(payload.encode()), time.time())
    assert verified.claims["sub"] == "\U0001f600"


# --- Step 7: a forwarded claim holds no control character, at any depth ------------------------

ROLES = {"forward": {"identity_headers": {"X-Auth-Roles": "roles", "X-Auth-Org": "org.unit"}}}


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"roles": ["admin", "ops\r\nX-Admin: 1"]}, id="list"),
        pytest.param({"roles": {"name": "a\x00b"}}, id="object"),
        pytest.param({"roles": [[{"deep": ["\x7f"]}]]}, id="nested"),
        pytest.param({"roles": {"tab\tname": 1}}, id="member-name"),
        pytest.param({"org": {"unit": ["x\x1f"]}}, id="dotted-path"),
    ],
)
async def test_forwarded_list_or_object_with_a_control_character_is_malformed(
    claims: dict[str, Any],
) -> None:
    config = build(ROLES)
    token = mint(SECRET, appId="TR21063826", **claims)
    with pytest.raises(Rejection) as raised:
        await verifier(config).verify_fresh(token, time.time())
    assert raised.value.reason.value == "malformed"


async def test_control_characters_in_claims_nobody_forwards_are_fine() -> None:
    config = build(ROLES)
    token = mint(SECRET, appId="TR21063826", roles=["a", {"b": 1}], other=["x\ny"])
    verified = await verifier(config).verify_fresh(token, time.time())
    assert dict(verified.identity)[b"X-Auth-Roles"] == b'["a",{"b":1}]'


# --- Step 6: no key verifies → bad_signature ----------------------------------------------------


def asymmetric(keys: KeyFiles, files: list[str]) -> dict[str, Any]:
    app = {
        "id": "idp",
        "algorithms": ["RS256", "ES256"],
        "public_keys": [keys.path(file) for file in files],
    }
    return {"apps": [app]}


def signed_by(keys: KeyFiles, name: str, alg: str, kid: str | None = None) -> str:
    headers = {"kid": kid} if kid is not None else None
    claims = {"exp": int(time.time()) + 60}
    return jwt.encode(claims, keys.private[name], algorithm=alg, headers=headers)


async def test_no_kid_and_no_key_fitting_the_algorithm_is_bad_signature(keys: KeyFiles) -> None:
    config = build(asymmetric(keys, ["rsa.pub"]))
    with pytest.raises(Rejection) as raised:
        await verifier(config).verify_fresh(signed_by(keys, "ec", "ES256"), time.time())
    assert raised.value.reason.value == "bad_signature"


async def test_unknown_kid_stays_for_a_kid_not_found_and_for_too_many_keys(
    keys: KeyFiles,
) -> None:
    config = build(asymmetric(keys, ["rsa.pub"]))
    with pytest.raises(Rejection) as raised:
        await verifier(config).verify_fresh(signed_by(keys, "ec", "ES256", "nope"), time.time())
    assert raised.value.reason.value == "unknown_kid"
    crowded = build(asymmetric(keys, ["rsa2.pub", "rsa2.pub", "rsa2.pub", "rsa2.pub", "rsa.pub"]))
    with pytest.raises(Rejection) as raised:
        await verifier(crowded).verify_fresh(signed_by(keys, "rsa", "RS256"), time.time())
    assert raised.value.reason.value == "unknown_kid"
    few = build(asymmetric(keys, ["rsa2.pub", "rsa.pub"]))
    verified = await verifier(few).verify_fresh(signed_by(keys, "rsa", "RS256"), time.time())
    assert verified.app.id == "idp"


# --- Step 2: a CORS preflight has no body ----------------------------------------------------


def preflight(has_body: bool) -> RequestView:
    headers: CIMultiDict[str] = CIMultiDict(
        {"Host": "api.example", "Origin": "https://app.example"}
    )
    headers["Access-Control-Request-Method"] = "POST"
    return RequestView("OPTIONS", "/x", headers, "127.0.0.1", "http", has_body)


async def test_a_preflight_passes_without_a_token() -> None:
    result = await run(build({}), preflight(has_body=False))
    assert isinstance(result, Decision)


async def test_an_options_with_a_body_is_an_ordinary_request() -> None:
    result = await run(build({}), preflight(has_body=True))
    assert isinstance(result, Rejection)
    assert result.reason.value == "missing"


# --- Step 8: route claims (roles and groups) ---------------------------------------------------

ROLE_ROUTES = {
    "routes": [
        {"path": "/ops/*", "claims": {"roles": ["admin", "ops"], "tier": 1}},
        {"path": "/nested/*", "claims": {"realm_access.roles": "admin"}},
        {"path": "/exact/*", "claims": {"flags": [["a", "b"]], "org": {"id": 7}}},
        {"path": "/*", "auth": "none"},
    ]
}


@pytest.mark.parametrize(
    ("path", "claims", "allowed"),
    [
        pytest.param("/ops/x", {"roles": "ops", "tier": 1}, True, id="one-of-the-values"),
        pytest.param("/ops/x", {"roles": ["viewer", "admin"], "tier": 1}, True, id="list-claim"),
        pytest.param("/ops/x", {"roles": ["viewer"], "tier": 1}, False, id="no-element"),
        pytest.param("/ops/x", {"roles": "Admin", "tier": 1}, False, id="case-matters"),
        pytest.param("/ops/x", {"roles": "admin", "tier": 1.0}, True, id="1-is-1.0"),
        pytest.param("/ops/x", {"roles": "admin", "tier": True}, False, id="true-is-not-1"),
        pytest.param("/ops/x", {"roles": "admin", "tier": "1"}, False, id="string-is-not-1"),
        pytest.param("/ops/x", {"roles": "admin"}, False, id="absent"),
        pytest.param("/ops/x", {"roles": {"admin": True}, "tier": 1}, False, id="object"),
        pytest.param("/nested/x", {"realm_access": {"roles": ["admin"]}}, True, id="dotted"),
        pytest.param("/nested/x", {"realm_access.roles": "admin"}, True, id="dotted-name"),
        pytest.param("/nested/x", {"realm_access": {"roles": []}}, False, id="dotted-empty"),
        pytest.param("/exact/x", {"flags": ["a", "b"], "org": {"id": 7}}, True, id="exact"),
        pytest.param("/exact/x", {"flags": ["a"], "org": {"id": 7}}, False, id="not-exact"),
    ],
)
async def test_route_claims(path: str, claims: dict[str, Any], allowed: bool) -> None:
    config = build(ROLE_ROUTES)
    result = await run(config, view("GET", path, mint(SECRET, appId="TR21063826", **claims)))
    if allowed:
        assert isinstance(result, Decision), result
    else:
        assert isinstance(result, Rejection)
        assert result.reason.value == "route_claim_mismatch"


async def test_route_claims_run_on_cache_hits() -> None:
    config = build(ROLE_ROUTES)
    shared = verifier(config)
    token = mint(SECRET, appId="TR21063826", roles=["ops"], tier=1)
    first = await decide(view("GET", "/ops/a", token), config, shared, time.time())
    assert first.verified is not None
    with pytest.raises(Rejection) as raised:
        await decide(view("GET", "/nested/a", token), config, shared, time.time())
    assert raised.value.reason.value == "route_claim_mismatch"


# --- Step 3: a route's own token sources -------------------------------------------------------

SOURCED = {
    "routes": [
        {"path": "/ws/*", "sources": ["query:access_token", "cookie:jwt"]},
        {"path": "/*"},
    ]
}


async def test_a_route_takes_its_token_from_its_own_sources() -> None:
    config = build(SOURCED)
    token = mint(SECRET, appId="TR21063826")
    by_query = await run(config, view("GET", f"/ws/chat?access_token={token}"))
    assert isinstance(by_query, Decision)
    assert by_query.found is not None and by_query.found.source.label == "query:access_token"
    by_cookie = await run(config, view("GET", "/ws/chat", Cookie=f"jwt={token}"))
    assert isinstance(by_cookie, Decision) and by_cookie.verified is not None
    # the route's sources replace token.sources there, and open nothing elsewhere
    header_on_ws = await run(config, view("GET", "/ws/chat", token))
    assert isinstance(header_on_ws, Rejection) and header_on_ws.reason.value == "missing"
    assert "query:access_token" in header_on_ws.detail
    query_elsewhere = await run(config, view("GET", f"/api?access_token={token}"))
    assert isinstance(query_elsewhere, Rejection) and query_elsewhere.reason.value == "missing"
    both = await run(config, view("GET", f"/ws/x?access_token={token}", Cookie=f"jwt={token}"))
    assert isinstance(both, Rejection) and both.reason.value == "multiple_tokens"


# --- `inspect`'s machinery on the framework-free state: no listener, no pool, no network ------


async def test_explain_runs_on_the_offline_core() -> None:
    config = build({"routes": SPEC_EXAMPLE["routes"]})
    core = compile_core(config, {})  # no JWKS source: the apps' own secrets
    now = time.time()
    good = await explain(config, core.verifier, user_42(), "post", "/v1/users/42/threads/1", now)
    assert good.summary()["forwarded"] is True
    assert good.summary()["app"] == "TR21063826"
    bad = await explain(config, core.verifier, user_42(), "GET", "/v1/users/43/threads/1", now)
    summary = bad.summary()
    assert (summary["status"], summary["name"], summary["reason"]) == (
        403,
        "TokenInvalid",
        "binding_mismatch",
    )
    assert summary["steps"][-1] == {
        "step": "bind userId",
        "ok": False,
        "detail": "differs from path.userId",
    }
    status, body, challenge = core.errors.rendered(Reason.BINDING_MISMATCH)
    assert status == 403 and b'"name":"TokenInvalid"' in body
    assert challenge is not None and 'error="insufficient_scope"' in challenge
