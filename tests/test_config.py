"""The configuration file (SPEC §3): every rule refuses with the file and key path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load
from proxy.errors import ConfigError
from proxy.model import MANAGED_HEADERS
from tests.conftest import SECRET_B64, KeyFiles

HS_APP = {"id": "a", "match": {}, "algorithms": ["HS256"], "secrets": [SECRET_B64]}
BASE = {"upstream": {"url": "http://127.0.0.1:9000"}, "apps": [HS_APP]}


def problems(
    tmp_path: Path, data: dict[str, Any] | str, env: dict[str, str] | None = None
) -> list[str]:
    """The rendered problems of a config (empty when it loads)."""
    path = tmp_path / "proxy.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    try:
        load(str(path), env=env or {})
    except ConfigError as error:
        return error.lines()
    return []


def with_app(**fields: Any) -> dict[str, Any]:
    app = {k: v for k, v in {**HS_APP, **fields}.items() if v is not None}
    return {**BASE, "apps": [app]}


def asym(keys: KeyFiles, **fields: Any) -> dict[str, Any]:
    app = {"id": "idp", "match": {"claim": "iss", "value": "https://idp"}, "algorithms": ["RS256"]}
    app.update(fields)
    return {**BASE, "apps": [app]}


RULES = [
    pytest.param(lambda k: {**BASE, "listn": "x"}, "listn", "unknown key", id="unknown-key"),
    pytest.param(
        lambda k: with_app(algoritms=["HS256"]),
        "apps[0].algoritms",
        "unknown key",
        id="unknown-nested-key",
    ),
    pytest.param(
        lambda k: {**BASE, "shutdown_timeout": "soon"},
        "shutdown_timeout",
        "number",
        id="wrong-type",
    ),
    pytest.param(lambda k: {"apps": [HS_APP]}, "upstream", "required", id="no-upstream"),
    pytest.param(lambda k: {**BASE, "upstream": {}}, "upstream.url", "required", id="no-url"),
    pytest.param(
        lambda k: {**BASE, "upstream": {"url": "ftp://x"}},
        "upstream.url",
        "http",
        id="bad-url",
    ),
    pytest.param(
        lambda k: {**BASE, "apps": [HS_APP, HS_APP]},
        "apps[1].id",
        "another app",
        id="duplicate-id",
    ),
    pytest.param(
        lambda k: {**BASE, "apps": [HS_APP, {**HS_APP, "id": "b", "match": {"value": "a"}}]},
        "apps[1].match",
        "same claim and value",
        id="duplicate-match",
    ),
    pytest.param(
        lambda k: {
            **BASE,
            "apps": [
                with_app(match=None)["apps"][0],
                {**with_app(match=None)["apps"][0], "id": "b"},
            ],
        },
        "apps[1]",
        "without match",
        id="two-catch-alls",
    ),
    pytest.param(
        lambda k: with_app(algorithms=[]),
        "apps[0].algorithms",
        "at least one",
        id="empty-algorithms",
    ),
    pytest.param(
        lambda k: with_app(algorithms=["HS999"]),
        "apps[0].algorithms[0]",
        "must be one of",
        id="unknown-algorithm",
    ),
    pytest.param(
        lambda k: with_app(algorithms=["NONE"]),
        "apps[0].algorithms[0]",
        "never accepted",
        id="none-algorithm",
    ),
    pytest.param(
        lambda k: with_app(algorithms=["HS256", "RS256"]),
        "apps[0].algorithms",
        "mixes",
        id="mixed-algorithms",
    ),
    pytest.param(
        lambda k: with_app(secrets=None), "apps[0].secrets", "required", id="hs-without-secrets"
    ),
    pytest.param(
        lambda k: with_app(secrets=["!!not base64!!"]),
        "apps[0].secrets[0]",
        "base64",
        id="invalid-base64",
    ),
    pytest.param(
        lambda k: with_app(secrets=["c2hvcnQ="]),
        "apps[0].secrets[0]",
        "token-proxy keygen",
        id="short-secret",
    ),
    pytest.param(
        lambda k: with_app(algorithms=["HS512"], secrets=[SECRET_B64]),
        "apps[0].secrets[0]",
        "at least 64",
        id="short-for-hs512",
    ),
    pytest.param(
        lambda k: asym(k),
        "apps[0]",
        "public_keys, jwks_file or jwks_url",
        id="asymmetric-without-keys",
    ),
    pytest.param(
        lambda k: asym(k, public_keys=[k.path("ec.pub")]),
        "apps[0].public_keys[0]",
        "fits none",
        id="key-type-does-not-fit",
    ),
    pytest.param(
        lambda k: asym(k, public_keys=[k.path("rsa1024.pub")]),
        "apps[0].public_keys[0]",
        "2048",
        id="small-rsa",
    ),
    pytest.param(
        lambda k: asym(k, public_keys=["missing.pem"]),
        "apps[0].public_keys[0]",
        "cannot be read",
        id="unreadable-key",
    ),
    pytest.param(
        lambda k: asym(k, public_keys=[k.path("garbage.pem")]),
        "apps[0].public_keys[0]",
        "not a PEM",
        id="unparsable-key",
    ),
    pytest.param(
        lambda k: asym(k, jwks_url="http://idp.example/jwks"),
        "apps[0].jwks_url",
        "https",
        id="jwks-url-not-https",
    ),
    pytest.param(
        lambda k: asym(k, discovery_url="https://idp/d", jwks_url="https://idp/jwks"),
        "apps[0].discovery_url",
        "cannot be used with jwks_url",
        id="discovery-with-jwks-url",
    ),
    pytest.param(
        lambda k: asym(k, discovery_url="http://idp.example/.well-known/openid-configuration"),
        "apps[0].discovery_url",
        "https",
        id="discovery-url-not-https",
    ),
    pytest.param(
        lambda k: with_app(discovery_url="https://idp/.well-known/openid-configuration"),
        "apps[0].discovery_url",
        "secrets only",
        id="discovery-on-hs-app",
    ),
    pytest.param(
        lambda k: asym(k, discovery_url="https://idp/d", ca_file="none.pem"),
        "apps[0].ca_file",
        "CA bundle",
        id="app-ca-file-unreadable",
    ),
    pytest.param(
        lambda k: asym(k, jwks_file="missing.json"),
        "apps[0].jwks_file",
        "cannot be read",
        id="unreadable-jwks-file",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/a/*/b"}]},
        "routes[0].path",
        "last segment",
        id="bad-pattern",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/a", "apps": ["nobody"]}]},
        "routes[0].apps[0]",
        "unknown app",
        id="route-unknown-app",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/a", "upstream": "nowhere"}]},
        "routes[0].upstream",
        "unknown upstream",
        id="route-unknown-upstream",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/u/{id}", "bind": {"userId": "path.userId"}}]},
        "routes[0].bind.userId",
        "parameter",
        id="bind-to-missing-parameter",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/u/{id}", "bind": {"userId": "body.id"}}]},
        "routes[0].bind.userId",
        "path.NAME",
        id="bind-malformed-source",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/a", "claims": ["roles"]}]},
        "routes[0].claims",
        "mapping of claim to a value or a list of values",
        id="route-claims-not-a-mapping",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/a", "claims": {"roles": []}}]},
        "routes[0].claims.roles",
        "at least one value",
        id="route-claims-empty-list",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/a", "claims": {"": "x"}}]},
        "routes[0].claims",
        "claim names",
        id="route-claims-empty-name",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/a", "sources": ["header:X-T", "form:token"]}]},
        "routes[0].sources[1]",
        "kind",
        id="route-sources-unknown-kind",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/a", "sources": ["query:"]}]},
        "routes[0].sources[0]",
        "valid name",
        id="route-sources-no-name",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/a", "sources": []}]},
        "routes[0].sources",
        "at least one source",
        id="route-sources-empty",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/a", "sources": ["query:t", "query:t"]}]},
        "routes[0].sources[1]",
        "twice",
        id="route-sources-twice",
    ),
    pytest.param(
        lambda k: {**BASE, "routes": [{"path": "/a", "sources": ["header:X-Auth-User-Id"]}]},
        "routes[0].sources[0]",
        "identity",
        id="route-source-is-an-identity-header",
    ),
    pytest.param(
        lambda k: {**BASE, "token": {"sources": ["form:token"]}},
        "token.sources[0]",
        "kind",
        id="unknown-source-kind",
    ),
    pytest.param(
        lambda k: with_app(secrets=["${NOT_SET_ANYWHERE}"]),
        "apps[0].secrets[0]",
        "NOT_SET_ANYWHERE is not set",
        id="unset-variable",
    ),
    pytest.param(lambda k: with_app(id=123), "apps[0].id", "string", id="numeric-id"),
    pytest.param(
        lambda k: with_app(match={"value": 5}),
        "apps[0].match.value",
        "string",
        id="numeric-match-value",
    ),
    pytest.param(
        lambda k: {**BASE, "forward": {"token": "yes"}},
        "forward.token",
        "true or false",
        id="yes-is-not-a-boolean",
    ),
    pytest.param(
        lambda k: {**BASE, "forward": {"identity_headers": {"Host": "sub"}}},
        "forward.identity_headers.Host",
        "manages",
        id="identity-header-managed",
    ),
    pytest.param(
        lambda k: {**BASE, "upstreams": {"x": {"url": "http://h", "ca_file": "none.pem"}}},
        "upstreams.x.ca_file",
        "CA bundle",
        id="bad-ca-file",
    ),
    pytest.param(
        lambda k: {**BASE, "mode": "forward-auth"}, "mode", "proxy, authorize", id="unknown-mode"
    ),
    pytest.param(
        lambda k: {
            "mode": "authorize",
            "apps": [HS_APP],
            "upstreams": {"legacy": {"url": "http://127.0.0.1:9001"}},
            "routes": [{"path": "/a/*"}, {"path": "/*", "upstream": "legacy"}],
        },
        "routes[1].upstream",
        "mode authorize",
        id="authorize-route-upstream",
    ),
    pytest.param(
        lambda k: {**BASE, "mode": "authorize", "authorize": {"uri_header": "X Uri"}},
        "authorize.uri_header",
        "header name",
        id="authorize-bad-header",
    ),
    pytest.param(
        lambda k: {**BASE, "mode": "authorize", "authorize": {"method_header": ""}},
        "authorize.method_header",
        "header name",
        id="authorize-empty-header",
    ),
    pytest.param(
        lambda k: {**BASE, "mode": "authorize", "authorize": {"strip_prefix": "auth"}},
        "authorize.strip_prefix",
        "start with /",
        id="authorize-bad-prefix",
    ),
    pytest.param(
        lambda k: {**BASE, "authorize": {"host_heder": None}},
        "authorize.host_heder",
        "unknown key",
        id="authorize-unknown-key",
    ),
]


@pytest.mark.parametrize(("make", "path", "message"), RULES)
def test_each_rule_names_file_and_key_path(
    tmp_path: Path, keys: KeyFiles, make: Any, path: str, message: str
) -> None:
    found = problems(tmp_path, make(keys))
    prefix = f"{tmp_path / 'proxy.yaml'}: {path}: "
    matching = [line for line in found if line.startswith(prefix)]
    assert matching, found
    assert any(message in line for line in matching), matching


def test_jwks_file_rules(tmp_path: Path, keys: KeyFiles) -> None:
    document = {
        "keys": [
            keys.jwk("rsa", kid="good", use="sig"),
            keys.jwk("rsa2", kid="enc", use="enc"),
            keys.jwk("rsa1024", kid="small"),
            keys.jwk("ec", kid="wrong-alg", alg="RS256"),
        ]
    }
    (tmp_path / "jwks.json").write_text(json.dumps(document))
    found = problems(tmp_path, asym(keys, jwks_file="jwks.json"))
    assert len(found) == 3
    assert all(": apps[0].jwks_file: keys[" in line for line in found)


def test_valid_asymmetric_sources_load(tmp_path: Path, keys: KeyFiles) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [keys.jwk("rsa2", kid="k2")]}))
    data = asym(
        keys,
        public_keys=[keys.path("rsa.pub"), keys.path("rsa.crt")],
        jwks_file="jwks.json",
        jwks_url="http://127.0.0.1:9/jwks",
    )
    assert problems(tmp_path, data) == []


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    data = {
        "listn": 1,
        "upstream": {"url": "http://127.0.0.1:9000"},
        "apps": [{**HS_APP, "secrets": ["c2hvcnQ="]}, HS_APP],
        "routes": [{"path": "nope"}, {"path": "/a", "apps": ["ghost"]}],
    }
    found = problems(tmp_path, data)
    assert len(found) == 5, found


def test_secrets_never_appear_in_messages(tmp_path: Path) -> None:
    short = "c2VjcmV0LXRoYXQtaXMtc2hvcnQ="
    invalid = "this-is-a-secret-not-base64!!"
    found = problems(tmp_path, with_app(secrets=[short, invalid]))
    text = "\n".join(found)
    assert len(found) == 2
    assert short not in text
    assert invalid not in text


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    assert problems(tmp_path, "- just\n- a list\n") == [
        f"{tmp_path / 'proxy.yaml'}: must be a YAML mapping of settings"
    ]
    with pytest.raises(ConfigError) as raised:
        load(str(tmp_path / "absent.yaml"))
    assert raised.value.lines() == [f"{tmp_path / 'absent.yaml'}: no such file"]
    broken = problems(tmp_path, "apps: [\n")
    assert "not valid YAML" in broken[0]


def test_substitution_and_yaml_12_scalars(tmp_path: Path) -> None:
    digits = "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI="
    text = """
upstream: {url: "${UP:-http://127.0.0.1:9000}"}
shutdown_timeout: ${T:-12}
errors: {expose_reason: "${EXPOSE}", realm: on}
case_insensitive_paths: TRUE
apps:
  - id: a
    match: {claim: env, value: "${ENV}"}
    algorithms: [HS256]
    secrets: ["${S}"]
    claims: {tier: "${TIER}", flag: yes}
"""
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    env = {"EXPOSE": "False", "ENV": "123", "S": digits, "TIER": "7"}
    config = load(str(path), env=env)
    assert config.upstream.url == "http://127.0.0.1:9000"  # type: ignore[union-attr]
    assert config.shutdown_timeout == 12
    assert config.errors.expose_reason is False
    assert config.errors.realm == "on"
    assert config.case_insensitive_paths is True
    app = config.apps[0]
    assert app.match_value == "123"
    assert dict(app.claims) == {"tier": "7", "flag": "yes"}
    assert app.secrets == (b"12345678901234567890123456789012",)


def test_relative_paths_follow_the_config_file(tmp_path: Path, keys: KeyFiles) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "idp.pem").write_bytes(keys.public_pem("ec"))
    data = asym(keys, algorithms=["ES256"], public_keys=["idp.pem"])
    (tmp_path / "sub" / "proxy.yaml").write_text(yaml.safe_dump(data))
    config = load(str(tmp_path / "sub" / "proxy.yaml"))
    assert config.apps[0].keys[0].source == "public_keys[0]"


def test_secret_not_in_repr(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(BASE))
    config = load(str(path))
    assert SECRET_B64 not in repr(config)
    assert "ssss" not in repr(config)


def test_url_safe_base64_and_raw_secrets(tmp_path: Path) -> None:
    url_safe = "-_-_" * 11
    data: dict[str, Any] = {
        **BASE,
        "apps": [
            {**HS_APP, "secrets": [url_safe]},
            {
                "id": "raw",
                "match": {},
                "algorithms": ["HS256"],
                "secret_encoding": "raw",
                "secrets": ["x" * 32],
            },
        ],
    }
    data["apps"][1]["match"] = {"value": "other"}
    assert problems(tmp_path, data) == []


def test_listeners_default_when_the_file_names_none(tmp_path: Path) -> None:
    """SPEC §3 defaults: a file without `listen`/`admin_listen` serves on 8080 and 9901 (a
    default once stayed text, and `serve` crashed on it)."""
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(BASE))
    config = load(str(path), env={})
    every = "0.0.0.0"  # noqa: S104 - the documented default
    assert (config.listen.host, config.listen.port) == (every, 8080)
    assert config.admin_listen is not None
    assert (config.admin_listen.host, config.admin_listen.port) == (every, 9901)


def test_limits_default_and_must_be_positive(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(BASE))
    limits = load(str(path), env={}).limits
    assert (limits.header_timeout, limits.idle_timeout) == (10, 75)
    for key in ("header_timeout", "idle_timeout"):
        for value in (0, -1, "soon"):
            found = problems(tmp_path, {**BASE, "limits": {key: value}})
            assert len(found) == 1 and f": limits.{key}: must be a" in found[0], found
    assert problems(tmp_path, {**BASE, "limits": {"header_timout": 1}})  # a typo is no default
    path.write_text(yaml.safe_dump({**BASE, "limits": {"header_timeout": 2.5, "idle_timeout": 9}}))
    assert load(str(path), env={}).limits.header_timeout == 2.5


def test_server_header(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    for value, expected in (("token-proxy", "token-proxy"), ("edge 7", "edge 7"), (None, None)):
        data = {**BASE, "server_header": value} if value != "token-proxy" else BASE
        path.write_text(yaml.safe_dump(data))
        assert load(str(path), env={}).server_header == expected
    for bad in ("a\r\nX-Injected: 1", "", " padded", 7, "x" * 300):
        found = problems(tmp_path, {**BASE, "server_header": bad})
        assert len(found) == 1 and ": server_header: must be" in found[0], found


@pytest.mark.parametrize(
    ("data", "path"),
    [
        pytest.param({"upstream": {"url": "http://h", "connect_timeout": 0}},
                     "upstream.connect_timeout", id="connect_timeout-0"),
        pytest.param({"upstream": {"url": "http://h", "connect_timeout": -1}},
                     "upstream.connect_timeout", id="connect_timeout-negative"),
        pytest.param({"upstream": {"url": "http://h", "timeout": 0}},
                     "upstream.timeout", id="timeout-0"),
        pytest.param({"upstreams": {"x": {"url": "http://h", "timeout": 0}}},
                     "upstreams.x.timeout", id="named-upstream-timeout-0"),
        pytest.param({"token": {"jwks_timeout": 0}}, "token.jwks_timeout", id="jwks_timeout-0"),
        pytest.param({"token": {"jwks_timeout": -2}}, "token.jwks_timeout",
                     id="jwks_timeout-negative"),
        pytest.param({"limits": {"idle_timeout": 0}}, "limits.idle_timeout", id="idle_timeout-0"),
    ],
)  # fmt: skip
def test_a_zero_timeout_is_refused(tmp_path: Path, data: dict[str, Any], path: str) -> None:
    """Defect: `connect_timeout: 0` / `timeout: 0` silently became 5 / 60 seconds."""
    found = problems(tmp_path, {**BASE, **data})
    assert found == [f"{tmp_path / 'proxy.yaml'}: {path}: must be a positive number of seconds"]


def test_zero_leeway_cache_ttl_and_shutdown_timeout_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    data = {**BASE, "shutdown_timeout": 0, "token": {"leeway": 0, "cache_ttl": 0}}
    path.write_text(yaml.safe_dump(data))
    config = load(str(path), env={})
    assert (config.shutdown_timeout, config.token.leeway, config.token.cache_ttl) == (0, 0, 0)
    path.write_text(yaml.safe_dump({**BASE, "upstream": {"url": "http://h", "timeout": 0.5}}))
    assert load(str(path), env={}).upstream.timeout == 0.5  # type: ignore[union-attr]


def test_authorize_mode_needs_no_upstream_and_keeps_null_headers(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "mode": "authorize",
                "apps": [HS_APP],
                "authorize": {"method_header": None, "uri_header": None, "strip_prefix": "/auth"},
            }
        )
    )
    config = load(str(path), env={})
    assert config.mode == "authorize"
    assert config.upstream is None
    assert config.authorize.method_header is None
    assert config.authorize.uri_header is None
    assert config.authorize.host_header == "X-Forwarded-Host"  # absent: the default
    assert config.authorize.strip_prefix == "/auth"


# --- Messages name the offending value, never a secret or a substituted one (issue 18 §4) ---

ROUTE_APP = {**HS_APP, "id": "real-app"}
MESSAGES = [
    pytest.param(
        {**BASE, "apps": [ROUTE_APP], "routes": [{"path": "/x", "apps": ["ghost-app"]}]},
        'routes[0].apps[0]: unknown app "ghost-app"',
        id="unknown-app",
    ),
    pytest.param(
        {**BASE, "routes": [{"path": "/x", "upstream": "billing"}]},
        'routes[0].upstream: unknown upstream "billing"',
        id="unknown-upstream",
    ),
    pytest.param(
        {**BASE, "routes": [{"path": "/x", "methods": ["GET", "G E T"]}]},
        'routes[0].methods[1]: "G E T" is not an HTTP method',
        id="bad-method",
    ),
    pytest.param(
        {**BASE, "routes": [{"path": "/a/{id}", "bind": {"userId": "path.user"}}]},
        'routes[0].bind.userId: names the path parameter "user", which the pattern "/a/{id}" '
        "does not have",
        id="bind-unknown-param",
    ),
    pytest.param(
        {**BASE, "routes": [{"path": "/x", "bind": {"userId": "body.user"}}]},
        'routes[0].bind.userId: must be path.NAME, query.NAME or header.NAME, not "body.user"',
        id="bind-bad-source",
    ),
    pytest.param(
        with_app(algorithms=["HS256", "HS257"]),
        'apps[0].algorithms[1]: unknown algorithm "HS257": must be one of ES256, ES384, ES512, '
        "EdDSA, HS256, HS384, HS512, PS256, PS384, PS512, RS256, RS384, RS512",
        id="unknown-algorithm",
    ),
    pytest.param(
        with_app(algorithms=["none"]),
        'apps[0].algorithms[0]: "none" is never accepted',
        id="alg-none",
    ),
    pytest.param(
        with_app(id="bad id!"),
        'apps[0].id: "bad id!" is not 1-64 characters of A-Z a-z 0-9 . _ -',
        id="bad-app-id",
    ),
    pytest.param(
        {**BASE, "apps": [HS_APP, HS_APP]},
        'apps[1].id: "a" is used by another app (apps[0])',
        id="duplicate-app-id",
    ),
    pytest.param(
        {**BASE, "token": {"sources": ["headr:Authorization"]}},
        'token.sources[0]: "headr:Authorization": the kind must be header:, query: or cookie:',
        id="bad-source-kind",
    ),
    pytest.param(
        {**BASE, "upstream": {"url": "ftp://files.example/x"}},
        "upstream.url: must be http://HOST[:PORT][/PATH], https://… or unix:/PATH "
        '("ftp://files.example/x": the scheme is not http or https)',
        id="upstream-scheme",
    ),
    pytest.param(
        {**BASE, "upstream": {"url": "http://user:hunter2@up.example"}},
        "upstream.url: must be http://HOST[:PORT][/PATH], https://… or unix:/PATH "
        '("http://up.example": it has user:password (never sent upstream))',
        id="upstream-userinfo-not-shown",
    ),
    pytest.param(
        {
            **BASE,
            "apps": [
                {
                    "id": "idp",
                    "match": {},
                    "algorithms": ["RS256"],
                    "jwks_url": "http://idp.example/jwks",
                }
            ],
        },
        "apps[0].jwks_url: jwks_url must be https (http only for 127.0.0.0/8, ::1, localhost), "
        'not "http://idp.example/jwks"',
        id="jwks-url-not-https",
    ),
    pytest.param(
        {**BASE, "log": {"level": "verbose"}},
        'log.level: must be one of debug, info, warning, error, not "verbose"',
        id="bad-choice",
    ),
    pytest.param(
        {**BASE, "forward": {"token": "yes"}},
        'forward.token: must be true or false, not "yes"',
        id="yaml-12-boolean",
    ),
    pytest.param(
        {**BASE, "shutdown_timeout": [30]},
        "shutdown_timeout: must be a number, not a list",
        id="wrong-type-named",
    ),
    pytest.param(
        with_app(secretz=["x"]),
        'apps[0].secretz: unknown key (did you mean "secrets"?)',
        id="unknown-key-suggests",
    ),
    pytest.param(
        with_app(public_keys=["absent.pem"], algorithms=["RS256"], secrets=None),
        'apps[0].public_keys[0]: file "absent.pem" cannot be read (no such file)',
        id="missing-key-file-only",  # and no "needs public_keys, ..." on top
    ),
]


@pytest.mark.parametrize(("data", "message"), MESSAGES)
def test_messages_name_the_offending_value(tmp_path: Path, data: Any, message: str) -> None:
    assert problems(tmp_path, data) == [f"{tmp_path / 'proxy.yaml'}: {message}"]


def test_substituted_values_are_never_named(tmp_path: Path) -> None:
    """The same mistakes, with each value from `${VAR}`: the message keeps the rule, drops the
    value (it may be a secret the operator keeps in the environment)."""
    env = {
        "APP": "ghost-app-QZX",
        "METHOD": "G E T QZX",
        "URL": "ftp://QZX.example",
        "JWKS": "http://QZX.example/jwks",
        "LEVEL": "QZXverbose",
        "ID": "bad id QZX",
    }
    text = """
upstream: {url: "${URL}"}
log: {level: "${LEVEL}"}
apps:
  - {id: "${ID}", match: {}, algorithms: [RS256], jwks_url: "${JWKS}"}
  - {id: "x-${ID}-y", algorithms: [HS256], secrets: ["QZXsecret-not-base64*"]}
routes:
  - {path: /x, apps: ["${APP}"], methods: ["${METHOD}"]}
"""
    found = problems(tmp_path, text, env)
    joined = "\n".join(found)
    assert "QZX" not in joined
    assert 'unknown app"' not in joined
    file = tmp_path / "proxy.yaml"
    assert f"{file}: routes[0].apps[0]: unknown app" in found
    assert f"{file}: routes[0].methods[0]: the value is not an HTTP method" in found
    assert f"{file}: log.level: must be one of debug, info, warning, error" in found


def test_jwks_file_problems_once_per_key_with_the_library_reason(
    tmp_path: Path, keys: KeyFiles
) -> None:
    """Two unfit keys: one line each, naming keys[i]; a bad JWK keeps PyJWT's explanation."""
    short = keys.jwk("ec521", kid="short")
    short["x"] = short["x"][:-4]
    document = {"keys": [keys.jwk("ec", kid="e1"), keys.jwk("ed", kid="e2"), short]}
    (tmp_path / "jwks.json").write_text(json.dumps(document))
    found = problems(tmp_path, asym(keys, jwks_file="jwks.json"))
    file = tmp_path / "proxy.yaml"
    assert found == [
        f"{file}: apps[0].jwks_file: keys[2] is not a valid JWK "
        "(Coords should be 66 bytes for curve P-521)",
        f"{file}: apps[0].jwks_file: keys[0] holds an EC P-256 key, which fits none of the "
        "app's algorithms (RS256)",
        f"{file}: apps[0].jwks_file: keys[1] holds an Ed25519 key, which fits none of the "
        "app's algorithms (RS256)",
    ]
    assert short["x"] not in "\n".join(found)


@pytest.mark.parametrize("name", sorted(MANAGED_HEADERS))
def test_no_identity_header_takes_a_header_the_proxy_manages(tmp_path: Path, name: str) -> None:
    """The one list the header plan drops by is the one `check` refuses identity names by."""
    spelled = "-".join(part.capitalize() for part in name.split("-"))
    data = {**BASE, "forward": {"identity_headers": {spelled: "sub"}}}
    assert problems(tmp_path, data) == [
        f"{tmp_path / 'proxy.yaml'}: forward.identity_headers.{spelled}: "
        f'"{spelled}" is a header the proxy manages'
    ]
