"""The configuration's schema (SPEC §3): frozen dataclasses, each default on its field.

    Config(file="proxy.yaml").listen          # Listen(host="0.0.0.0", port=8080)
    default(Upstream, "connect_timeout")      # 5.0: what a reader uses when the key is absent

A field's default is the value an absent key stands for: the readers take it from here
(`default()`), so no default is written twice. The `*_KEYS` tuples name the YAML keys of the
sections whose keys are not their fields' names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .. import jwk
from ..routing import PathPattern

TOKEN_SERVICE_APP = "token-service"  # noqa: S105 - an app id, not a password
DEFAULT_IDENTITY = {
    "X-Auth-App-Id": "@app",
    "X-Auth-User-Id": "userId",
    "X-Auth-Subject": "sub",
    "X-Auth-Actor": "act.sub",
}
MATCH_CLAIM = "appId"  # an app's `match.claim` when only `match.value` (or nothing) is given


def default(cls: type, name: str) -> Any:
    """The default the schema gives field `name` of `cls`."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def names(cls: type) -> tuple[str, ...]:
    """The field names of `cls`: the YAML keys of a section whose keys are its fields."""
    return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Limits:
    """The main listener's client timeouts (SPEC §6), fixed at start."""

    header_timeout: float = 10.0  # a request head must arrive within this
    idle_timeout: float = 75.0  # an idle keep-alive connection closes after this


@dataclass(frozen=True, slots=True)
class Tls:
    cert_file: str
    key_file: str


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    scheme: str  # http | https | unix
    host: str  # for http(s); "localhost" for unix
    port: int
    socket_path: str | None
    base_path: str  # prepended to the forwarded path ("" for none)
    host_header: str  # the Host sent upstream unless preserve_host
    connect_timeout: float = 5.0
    timeout: float = 60.0
    max_connections: int = 512
    preserve_host: bool = False
    ca_file: str | None = None


UPSTREAM_KEYS = ("url", "connect_timeout", "timeout", "max_connections", "preserve_host", "ca_file")


@dataclass(frozen=True, slots=True)
class Source:
    kind: str  # header | query | cookie
    name: str  # lower case for headers, which are looked up case-insensitively
    label: str = field(compare=False)  # as configured, for messages: "header:Authorization"


@dataclass(frozen=True, slots=True)
class TokenSettings:
    sources: tuple[Source, ...] = (Source("header", "authorization", "header:Authorization"),)
    leeway: float = 30.0
    max_length: int = 8192
    cache_size: int = 10000
    cache_ttl: float = 60.0
    jwks_cache_ttl: float = 300.0
    jwks_min_refresh: float = 30.0
    jwks_max_stale: float = 86400.0
    jwks_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Forward:
    token: bool = True
    # (header, claim path or "@app")
    identity_headers: tuple[tuple[str, str], ...] = tuple(DEFAULT_IDENTITY.items())
    claims_header: str | None = None
    request_id_header: str = "X-Request-Id"


@dataclass(frozen=True, slots=True)
class Errors:
    realm: str = "api"
    expose_reason: bool = True


@dataclass(frozen=True, slots=True)
class App:
    id: str
    match_claim: str | None  # None: takes tokens no other app matches
    match_value: str | None
    algorithms: tuple[str, ...]  # config order, without repeats
    secrets: tuple[bytes, ...] = field(repr=False)
    keys: tuple[jwk.VerifyKey, ...] = field(repr=False)  # from public_keys and jwks_file
    jwks_url: str | None
    issuer: tuple[str, ...] | None
    audience: tuple[str, ...] | None
    required_claims: tuple[str, ...]
    claims: tuple[tuple[str, Any], ...]
    max_lifetime: float | None
    discovery_url: str | None = None  # gives the JWKS URL and, without `issuer`, the issuer
    ca_file: str | None = None  # extra CA bundle for jwks_url / discovery_url (resolved path)


APP_KEYS = (
    "id match algorithms secrets secret_encoding jwks_url discovery_url ca_file jwks_file "
    "public_keys issuer audience required_claims claims max_lifetime"
).split()
APP_REQUIRED_CLAIMS = ("exp",)  # an app's `required_claims` when absent


@dataclass(frozen=True, slots=True)
class Binding:
    claim: str
    kind: str  # path | query | header
    name: str


@dataclass(frozen=True, slots=True)
class Route:
    index: int
    pattern: PathPattern
    methods: frozenset[str] | None = None
    auth: str = "required"  # none | optional | required
    apps: frozenset[str] | None = None
    scopes: frozenset[str] = frozenset()
    required_claims: tuple[str, ...] = ()
    bind: tuple[Binding, ...] = ()
    upstream: str | None = None
    # claim (name, or dotted path when no claim has that name) -> the values it may equal
    claims: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    sources: tuple[Source, ...] | None = None  # None: token.sources


ROUTE_KEYS = "path methods auth apps scopes required_claims bind claims sources upstream".split()


@dataclass(frozen=True, slots=True)
class Client:
    id: str
    secret: str = field(repr=False)
    org: str | None = None


@dataclass(frozen=True, slots=True)
class SigningKey:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = field(repr=False)
    alg: str
    kid: str


@dataclass(frozen=True, slots=True)
class TokenService:
    issuer: str
    signing_keys: tuple[SigningKey, ...]
    token_ttl: float = 900.0
    audience: str | None = None
    copy_claims: tuple[str, ...] = ("appId", "userId", "customerId", "email", "scope")
    clients: tuple[Client, ...] = ()
    jwt_bearer_apps: tuple[str, ...] = ()
    token_exchange_apps: tuple[str, ...] = ()


TOKEN_SERVICE_KEYS = (
    "issuer signing_keys token_ttl audience copy_claims clients jwt_bearer token_exchange"
).split()


@dataclass(frozen=True, slots=True)
class Authorize:
    """mode: authorize (SPEC §10): where the gateway puts the request it asks about."""

    method_header: str | None = "X-Forwarded-Method"  # None: the subrequest's own method
    uri_header: str | None = "X-Forwarded-Uri"  # None: the subrequest's own target
    host_header: str | None = "X-Forwarded-Host"  # must be present once; None: not checked
    strip_prefix: str = ""  # removed from the start of the own target (Envoy's path_prefix)


@dataclass(frozen=True, slots=True)
class Config:
    file: str
    listen: Listen = Listen("0.0.0.0", 8080)  # noqa: S104 - the documented default
    tls: Tls | None = None
    admin_listen: Listen | None = Listen("0.0.0.0", 9901)  # noqa: S104 - as listen
    environment: str | None = None
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    access_log: bool = True
    case_insensitive_paths: bool = False
    upstream: Upstream | None = None  # None only in mode authorize, which forwards nothing
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    token: TokenSettings = TokenSettings()
    forward: Forward = Forward()
    errors: Errors = Errors()
    apps: tuple[App, ...] = ()
    routes: tuple[Route, ...] = ()
    preflight: str = "pass"
    token_service: TokenService | None = None
    limits: Limits = Limits()
    server_header: str | None = "token-proxy"  # on the proxy's own answers; None: no Server
    dev_console: bool = False  # /console on the admin listener (SPEC §12): loopback only
    mode: str = "proxy"  # proxy | authorize (SPEC §10)
    authorize: Authorize = Authorize()

    @property
    def jwks_urls(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(app.jwks_url for app in self.apps if app.jwks_url))


TOP_KEYS = (
    "listen tls admin_listen environment shutdown_timeout log case_insensitive_paths upstream "
    "upstreams token forward errors apps routes preflight token_service limits server_header "
    "mode authorize dev_console"
).split()
