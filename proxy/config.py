"""The configuration file (SPEC §3): frozen objects, validated and compiled once.

    config = load("config/proxy.yaml")          # raises ConfigError listing every problem
    config.apps[0].secrets                      # decoded bytes, never in a repr
    config.routes[0].pattern.match("/v1/x")     # compiled once

`load()` reads the whole file, collects every problem with its key path, reads every key file,
and names the offending value where it cannot be a secret (`unknown app "ghost-app"`): never a
value of `secrets` or `clients[].secret`, never one that came from `${VAR}` substitution.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from . import jwk
from .errors import ConfigError, Problem
from .routing import PathPattern
from .yamlconf import (
    Section,
    Substituted,
    as_number,
    as_string,
    join,
    load_yaml,
    optional,
    quoted,
    substitute,
    substituted_strings,
)

TOKEN_SERVICE_APP = "token-service"  # noqa: S105 - an app id, not a password
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TOKEN_CHARS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REALM = re.compile(r"[\x20-\x7e]*")
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,254}[\x21-\x7e])?")
# Headers the proxy itself manages: identity headers may not take these names.
_MANAGED = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-type",
        "expect",
        "cookie",
        "authorization",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    }
)
DEFAULT_IDENTITY = {
    "X-Auth-App-Id": "@app",
    "X-Auth-User-Id": "userId",
    "X-Auth-Subject": "sub",
    "X-Auth-Actor": "act.sub",
}


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
    connect_timeout: float
    timeout: float
    max_connections: int
    preserve_host: bool
    ca_file: str | None


@dataclass(frozen=True, slots=True)
class Source:
    kind: str  # header | query | cookie
    name: str  # lower case for headers, which are looked up case-insensitively
    label: str = field(compare=False)  # as configured, for messages: "header:Authorization"


@dataclass(frozen=True, slots=True)
class TokenSettings:
    sources: tuple[Source, ...]
    leeway: float
    max_length: int
    cache_size: int
    cache_ttl: float
    jwks_cache_ttl: float
    jwks_min_refresh: float
    jwks_max_stale: float
    jwks_timeout: float


@dataclass(frozen=True, slots=True)
class Forward:
    token: bool
    identity_headers: tuple[tuple[str, str], ...]  # (header, claim path or "@app")
    claims_header: str | None
    request_id_header: str


@dataclass(frozen=True, slots=True)
class Errors:
    realm: str
    expose_reason: bool


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


@dataclass(frozen=True, slots=True)
class Binding:
    claim: str
    kind: str  # path | query | header
    name: str


@dataclass(frozen=True, slots=True)
class Route:
    index: int
    pattern: PathPattern
    methods: frozenset[str] | None
    auth: str  # none | optional | required
    apps: frozenset[str] | None
    scopes: frozenset[str]
    required_claims: tuple[str, ...]
    bind: tuple[Binding, ...]
    upstream: str | None
    # claim (name, or dotted path when no claim has that name) -> the values it may equal
    claims: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    sources: tuple[Source, ...] | None = None  # None: token.sources


@dataclass(frozen=True, slots=True)
class Client:
    id: str
    secret: str = field(repr=False)
    org: str | None


@dataclass(frozen=True, slots=True)
class SigningKey:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = field(repr=False)
    alg: str
    kid: str


@dataclass(frozen=True, slots=True)
class TokenService:
    issuer: str
    signing_keys: tuple[SigningKey, ...]
    token_ttl: float
    audience: str | None
    copy_claims: tuple[str, ...]
    clients: tuple[Client, ...]
    jwt_bearer_apps: tuple[str, ...]
    token_exchange_apps: tuple[str, ...]


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
    listen: Listen
    tls: Tls | None
    admin_listen: Listen | None
    environment: str | None
    shutdown_timeout: float
    log_level: str
    access_log: bool
    case_insensitive_paths: bool
    upstream: Upstream | None  # None only in mode authorize, which forwards nothing
    upstreams: Mapping[str, Upstream]
    token: TokenSettings
    forward: Forward
    errors: Errors
    apps: tuple[App, ...]
    routes: tuple[Route, ...]
    preflight: str
    token_service: TokenService | None
    limits: Limits = Limits()
    server_header: str | None = "token-proxy"  # on the proxy's own answers; None: no Server
    dev_console: bool = False  # /console on the admin listener (SPEC §12): see _dev_console()
    mode: str = "proxy"  # proxy | authorize (SPEC §10)
    authorize: Authorize = Authorize()

    @property
    def jwks_urls(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(app.jwks_url for app in self.apps if app.jwks_url))


_TOP = (
    "listen tls admin_listen environment shutdown_timeout log case_insensitive_paths upstream "
    "upstreams token forward errors apps routes preflight token_service"
).split()
_TOP += ["limits", "server_header", "mode", "authorize"]
_TOP += ["dev_console"]


def default_path() -> str:
    """The config file `serve` reads without --config."""
    return os.environ.get("TOKEN_PROXY_CONFIG") or "config/proxy.yaml"


def load(
    file: str,
    env: Mapping[str, str] | None = None,
    text: str | None = None,
    adjust: Callable[[dict[str, Any]], None] | None = None,
) -> Config:
    """Read, validate and compile a config file, or raise ConfigError with every problem.

    `adjust` edits the substituted YAML tree first (command-line flags override the file).
    """
    problems: list[Problem] = []
    if text is None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([Problem("", "no such file")], file) from None
        except (OSError, UnicodeDecodeError) as error:
            reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else "unreadable"
            raise ConfigError([Problem("", f"cannot be read ({reason})")], file) from None
    tree = load_yaml(text, problems)
    if problems:
        raise ConfigError(problems, file)
    if not isinstance(tree, dict):
        raise ConfigError([Problem("", "must be a YAML mapping of settings")], file)
    tree = substitute(tree, os.environ if env is None else env, problems)
    if adjust is not None:
        adjust(tree)
    config = _Builder(file, problems, substituted_strings(tree)).build(tree)
    if problems or config is None:
        raise ConfigError(problems, file)
    return config


class _Builder:
    """Reads the YAML tree section by section, recording every problem."""

    def __init__(self, file: str, problems: list[Problem], hidden: frozenset[str]) -> None:
        self.file = file
        self.base = Path(file).resolve().parent
        self.problems = problems
        self.hidden = frozenset(h for h in hidden if h)  # substituted: never in a message

    def url_problem(self, url: str, problem: str) -> str:
        """A URL rule's message with the URL (without its userinfo) when it may be shown."""
        shown = self.show(without_userinfo(url)) if self.show(url) else None
        return f"{problem}, not {shown}" if shown else problem

    def show(self, value: object) -> str | None:
        """`"value"` for a message, or None when it must not be shown: it is, or is part of,
        a string from `${VAR}` substitution."""
        text = quoted(value)
        if text is None or any(str(value) in h or h in str(value) for h in self.hidden):
            return None
        return text

    def that(self, value: object) -> str:
        """`"value"` as the subject of a message, or "the value" when it must not be shown."""
        return self.show(value) or "the value"

    def named(self, what: str, value: object) -> str:
        """`what "value"`, or just `what` when the value must not be shown."""
        text = self.show(value)
        return f"{what} {text}" if text else what

    def path(self, value: str) -> Path:
        return self.base / value

    def read_file(self, section: Section, key: str, value: str) -> bytes | None:
        try:
            return self.path(value).read_bytes()
        except (OSError, ValueError) as error:  # ValueError: a NUL in the path
            why = (
                "no such file"
                if isinstance(error, FileNotFoundError)
                else "permission denied"
                if isinstance(error, PermissionError)
                else "unreadable"
            )
            section.problem(key, f"{self.named('file', value)} cannot be read ({why})")
            return None

    def build(self, tree: dict[str, Any]) -> Config | None:
        root = Section(tree, "", self.problems, _TOP)
        # Defaults are values as read, not text: a missing `listen` must still be a Listen.
        listen = root.field("listen", _listen, "HOST:PORT", _listen("0.0.0.0:8080"))
        admin = root.field(
            "admin_listen",
            lambda v: None if v is None else _listen(v),
            "HOST:PORT or null",
            _listen("0.0.0.0:9901"),
        )
        tls = self.tls(root)
        environment = root.optional_string("environment")
        shutdown = root.number("shutdown_timeout", 30)
        log = Section(root.raw("log"), "log", self.problems, ("level", "access"))
        level = log.choice("level", ("debug", "info", "warning", "error"), "info")
        access = log.boolean("access", True)
        ignore_case = root.boolean("case_insensitive_paths", False)
        mode, authorize = self.mode(root)
        upstream = None  # mode authorize needs none (one given is checked, then ignored)
        if mode != "authorize" or root.raw("upstream") is not None:
            upstream = self.upstream(root.raw("upstream"), "upstream", "default", required=True)
        upstreams = self.upstreams(root)
        token = self.token(root)
        forward = self.forward(root, token)
        errors = self.errors(root)
        service = self.token_service(root, environment)
        apps = self.apps(root, service)
        routes = self.routes(root, bool(ignore_case), apps, upstreams, service, forward)
        preflight = root.choice("preflight", ("pass", "check"), "pass")
        self.cross_checks(root, apps, routes, service)
        limits = self.limits(root)
        server_header = root.field(
            "server_header", _server_header, "a string or null", "token-proxy"
        )
        dev_console = _dev_console(root, admin)
        if self.problems:
            return None
        if not (listen and token and forward and errors and level):
            return None
        if upstream is None and mode != "authorize":
            return None
        return Config(
            file=self.file,
            listen=listen,
            tls=tls,
            admin_listen=admin,
            environment=environment,
            shutdown_timeout=float(shutdown or 0),
            log_level=level,
            access_log=bool(access),
            case_insensitive_paths=bool(ignore_case),
            upstream=upstream,
            upstreams=upstreams,
            token=token,
            forward=forward,
            errors=errors,
            apps=tuple(apps),
            routes=tuple(routes),
            preflight=preflight or "pass",
            token_service=service,
            limits=limits,
            server_header=server_header,
            dev_console=dev_console,
            mode=mode,
            authorize=authorize,
        )

    # --- mode: authorize (SPEC §10) --------------------------------------------------------

    def mode(self, root: Section) -> tuple[str, Authorize]:
        """`mode` and the `authorize` section; in authorize mode no route names an upstream."""
        mode = root.choice("mode", ("proxy", "authorize"), "proxy") or "proxy"
        keys = ("method_header", "uri_header", "host_header", "strip_prefix")
        section = Section(root.raw("authorize"), "authorize", self.problems, keys)
        default = Authorize()
        headers: list[str | None] = []
        for key in keys[:3]:
            if not section.has(key):
                headers.append(getattr(default, key))  # absent: the default (null: "own")
                continue
            name = section.field(key, optional(as_string), "a header name or null")
            if name is not None and not _TOKEN_CHARS.fullmatch(name):
                section.problem(key, "must be a valid header name or null")
            headers.append(name)
        prefix = section.string("strip_prefix", "") or ""
        if prefix and not prefix.startswith("/"):
            section.problem("strip_prefix", "must be empty or start with /")
        if mode == "authorize":
            routes = root.raw("routes")
            for index, route in enumerate(routes if isinstance(routes, list) else ()):
                if isinstance(route, dict) and route.get("upstream") is not None:
                    self.problems.append(
                        Problem(
                            f"routes[{index}].upstream",
                            "cannot be used in mode authorize (nothing is forwarded)",
                        )
                    )
        return mode, Authorize(headers[0], headers[1], headers[2], prefix)

    def limits(self, root: Section) -> Limits:
        keys = ("header_timeout", "idle_timeout")
        section = Section(root.raw("limits"), "limits", self.problems, keys)
        header = section.field("header_timeout", _timeout, "a number", 10.0)
        idle = section.field("idle_timeout", _timeout, "a number", 75.0)
        return Limits(float(header or 10.0), float(idle or 75.0))

    def tls(self, root: Section) -> Tls | None:
        if root.raw("tls") is None:
            return None
        section = Section(root.raw("tls"), "tls", self.problems, ("cert_file", "key_file"))
        cert, key = section.string("cert_file"), section.string("key_file")
        if cert is None or key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.path(cert), self.path(key))
        except (OSError, ssl.SSLError, ValueError):
            section.problem("", "cert_file and key_file must be a readable PEM certificate and key")
            return None
        return Tls(str(self.path(cert)), str(self.path(key)))

    def upstream(self, data: Any, path: str, name: str, required: bool = False) -> Upstream | None:
        if data is None and required:
            self.problems.append(Problem(path, "is required (the default upstream, with a url)"))
            return None
        keys = "url connect_timeout timeout max_connections preserve_host ca_file".split()
        section = Section(data, path, self.problems, keys)
        url = section.string("url")
        connect_timeout = section.field("connect_timeout", _timeout, "a number", 5.0)
        timeout = section.field("timeout", _timeout, "a number", 60.0)
        max_connections = section.integer("max_connections", 512, minimum=1)
        preserve_host = section.boolean("preserve_host", False)
        ca_file = section.optional_string("ca_file")
        if ca_file is not None:
            try:
                ssl.create_default_context().load_verify_locations(self.path(ca_file))
            except (OSError, ssl.SSLError, ValueError):
                section.problem("ca_file", f"{self.that(ca_file)} is not a readable PEM CA bundle")
        if url is None:
            return None
        target = self.upstream_url(section, url)
        if target is None or None in (connect_timeout, timeout, max_connections, preserve_host):
            return None
        scheme, host, port, socket_path, base_path = target
        default = {"http": 80, "https": 443}.get(scheme)
        shown = f"[{host}]" if ":" in host else host
        return Upstream(
            name=name,
            url=url,
            scheme=scheme,
            host=host,
            port=port,
            socket_path=socket_path,
            base_path=base_path,
            host_header=shown if port == default or socket_path else f"{shown}:{port}",
            connect_timeout=float(connect_timeout or 0),
            timeout=float(timeout or 0),
            max_connections=int(max_connections or 1),
            preserve_host=bool(preserve_host),
            ca_file=str(self.path(ca_file)) if ca_file else None,
        )

    def upstream_url(
        self, section: Section, url: str
    ) -> tuple[str, str, int, str | None, str] | None:
        if url.startswith("unix:"):
            socket = url[len("unix:") :]
            if not socket:
                section.problem("url", "unix: needs a socket path (unix:/path/to.sock)")
                return None
            return "unix", "localhost", 0, str(self.path(socket)), ""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:  # not a URL at all ("http://[::1"), or a bad port
            parts, port = urlsplit(""), -1
        host = parts.hostname
        why = _upstream_url_flaw(parts, port) if host else "it has no host (or is not a URL)"
        if why is not None or not host:
            shown = self.show(without_userinfo(url)) if self.show(url) else None
            section.problem(
                "url",
                "must be http://HOST[:PORT][/PATH], https://… or unix:/PATH"
                + (f" ({shown}: {why})" if shown else f" ({why})"),
            )
            return None
        base = parts.path.rstrip("/")
        default = 443 if parts.scheme == "https" else 80
        return parts.scheme, host, port or default, None, base

    def upstreams(self, root: Section) -> dict[str, Upstream]:
        data = root.raw("upstreams")
        if data is None:
            return {}
        if not isinstance(data, dict):
            root.problem("upstreams", "must be a mapping of name to upstream")
            return {}
        found: dict[str, Upstream] = {}
        for name, value in data.items():
            if not isinstance(name, str) or not _ID.fullmatch(name):
                what = self.named("the name", name)
                root.problem("upstreams", f"{what} is not a string of [A-Za-z0-9._-]{{1,64}}")
                continue
            upstream = self.upstream(value, f"upstreams.{name}", name)
            if upstream is not None:
                found[name] = upstream
        return found

    def token(self, root: Section) -> TokenSettings | None:
        keys = (
            "sources leeway max_length cache_size cache_ttl jwks_cache_ttl jwks_min_refresh "
            "jwks_max_stale jwks_timeout"
        ).split()
        section = Section(root.raw("token"), "token", self.problems, keys)
        sources = self.sources(section, ("header:Authorization",))
        values = (
            section.number("leeway", 30),
            section.integer("max_length", 8192, minimum=16),
            section.integer("cache_size", 10000),
            section.number("cache_ttl", 60),
            section.number("jwks_cache_ttl", 300, minimum=1),
            section.number("jwks_min_refresh", 30),
            section.number("jwks_max_stale", 86400),
            section.field("jwks_timeout", _timeout, "a number", 5.0),
        )
        if None in values or not sources:
            return None
        leeway, max_length, size, ttl, cache_ttl, min_refresh, max_stale, timeout = values
        return TokenSettings(
            tuple(sources),
            float(leeway or 0),
            int(max_length or 0),
            int(size or 0),
            float(ttl or 0),
            float(cache_ttl or 0),
            float(min_refresh or 0),
            float(max_stale or 0),
            float(timeout or 0),
        )

    def sources(self, section: Section, default: Any) -> list[Source]:
        """`sources` of token (or of a route): header:NAME, query:NAME, cookie:NAME."""
        raw = section.strings("sources", default)
        sources: list[Source] = []
        for index, entry in enumerate(raw or ()):
            kind, _, name = entry.partition(":")
            where = f"sources[{index}]"
            if kind not in ("header", "query", "cookie"):
                section.problem(
                    where, f"{self.that(entry)}: the kind must be header:, query: or cookie:"
                )
            elif not name or (kind == "header" and not _TOKEN_CHARS.fullmatch(name)):
                section.problem(where, f"{self.that(entry)} needs a valid name after {kind}:")
            else:
                source = Source(kind, name.lower() if kind == "header" else name, entry)
                if source in sources:
                    section.problem(where, f"{self.that(entry)} is listed twice")
                sources.append(source)
        if raw is not None and not raw:
            section.problem("sources", "needs at least one source")
        return sources

    def forward(self, root: Section, token: TokenSettings | None) -> Forward | None:
        keys = ("token", "identity_headers", "claims_header", "request_id_header")
        section = Section(root.raw("forward"), "forward", self.problems, keys)
        send_token = section.boolean("token", True)
        headers = section.raw("identity_headers", DEFAULT_IDENTITY)
        identity: list[tuple[str, str]] = []
        seen: set[str] = set()
        if headers is None:
            headers = {}
        if not isinstance(headers, dict):
            section.problem("identity_headers", "must be a mapping of header to claim")
            headers = {}
        claims_header = section.optional_string("claims_header")
        request_id = section.string("request_id_header", "X-Request-Id")
        names = [(f"identity_headers.{name}", name) for name in headers]
        if claims_header is not None:
            names.append(("claims_header", claims_header))
        if request_id is not None:
            names.append(("request_id_header", request_id))
        token_headers = {s.name for s in token.sources if s.kind == "header"} if token else set()
        for key, name in names:
            if not isinstance(name, str) or not _TOKEN_CHARS.fullmatch(name):
                section.problem(key, f"{self.that(name)} is not a valid header name")
                continue
            folded = name.lower().replace("_", "-")
            if folded in _MANAGED or folded in token_headers or folded.startswith("proxy-"):
                section.problem(key, f"{self.that(name)} is a header the proxy manages")
            elif folded in seen:
                section.problem(key, f"{self.that(name)} names a header twice (case and _ ignored)")
            seen.add(folded)
        for name, claim in headers.items():
            if not isinstance(claim, str) or not claim or claim.startswith(".") or ".." in claim:
                section.problem(
                    f"identity_headers.{name}",
                    f"must be a claim name or @app, not {self.that(claim)}",
                )
            elif isinstance(name, str):
                identity.append((name, claim))
        if send_token is None or request_id is None:
            return None
        return Forward(bool(send_token), tuple(identity), claims_header, request_id)

    def errors(self, root: Section) -> Errors | None:
        section = Section(root.raw("errors"), "errors", self.problems, ("realm", "expose_reason"))
        realm = section.string("realm", "api")
        if realm is not None and (not _REALM.fullmatch(realm) or '"' in realm or "\\" in realm):
            section.problem("realm", "must be printable ASCII without quotes or backslashes")
            realm = None
        expose = section.boolean("expose_reason", True)
        if realm is None or expose is None:
            return None
        return Errors(realm, expose)

    def apps(self, root: Section, service: TokenService | None) -> list[App]:
        data = root.raw("apps", [])
        if data is None:
            data = []
        if not isinstance(data, list):
            root.problem("apps", "must be a list of apps")
            return []
        apps: list[App] = []
        ids: set[str] = set()
        matches: dict[tuple[str, str], str] = {}
        catch_all: str | None = None
        for index, item in enumerate(data):
            path = f"apps[{index}]"
            app = self.app(item, path)
            if app is None:
                continue
            if app.id in ids:
                first = next(i for i, a in enumerate(apps) if a.id == app.id)
                self.problems.append(
                    Problem(
                        f"{path}.id", f"{self.that(app.id)} is used by another app (apps[{first}])"
                    )
                )
                continue
            if service and app.id == TOKEN_SERVICE_APP:
                self.problems.append(
                    Problem(
                        f"{path}.id", f'"{TOKEN_SERVICE_APP}" is reserved for the token service'
                    )
                )
            ids.add(app.id)
            if app.match_claim is None:
                if catch_all is not None:
                    self.problems.append(
                        Problem(path, f"is a second app without match ({catch_all} has none)")
                    )
                catch_all = catch_all or path
            else:
                pair = (app.match_claim, app.match_value or "")
                if pair in matches:
                    value = self.show(pair[1])
                    what = f"{pair[0]} = {value}" if value else pair[0]
                    self.problems.append(
                        Problem(
                            f"{path}.match",
                            f"{matches[pair]} matches the same claim and value ({what})",
                        )
                    )
                matches.setdefault(pair, path)
                if service and pair == ("iss", service.issuer):
                    self.problems.append(
                        Problem(f"{path}.match", "matches the token service's own issuer")
                    )
            apps.append(app)
        return apps

    def app(self, data: Any, path: str) -> App | None:
        keys = (
            "id match algorithms secrets secret_encoding jwks_url discovery_url ca_file jwks_file "
            "public_keys issuer audience required_claims claims max_lifetime"
        ).split()
        section = Section(data, path, self.problems, keys)
        app_id = section.string("id")
        if app_id is not None and not _ID.fullmatch(app_id):
            section.problem(
                "id", f"{self.that(app_id)} is not 1-64 characters of A-Z a-z 0-9 . _ -"
            )
        match_claim, match_value = self.match(section, app_id)
        algorithms = section.strings("algorithms")
        algs: set[str] = set()
        for index, alg in enumerate(algorithms or ()):
            if alg.lower() == "none":
                section.problem(f"algorithms[{index}]", f"{self.that(alg)} is never accepted")
            elif alg not in jwk.SUPPORTED:
                section.problem(
                    f"algorithms[{index}]",
                    f"{self.named('unknown algorithm', alg)}: must be one of "
                    + ", ".join(sorted(jwk.SUPPORTED)),
                )
            else:
                algs.add(alg)
        if algorithms is not None and not algorithms:
            section.problem("algorithms", "must name at least one algorithm")
        hs = algs & jwk.HS_MIN_BYTES.keys()
        if hs and algs - hs:
            section.problem(
                "algorithms",
                f"mixes HS* ({', '.join(sorted(hs))}) and asymmetric "
                f"({', '.join(sorted(algs - hs))}) algorithms; use two apps",
            )
        secrets = self.secrets(section, hs) if hs and not algs - hs else ()
        keys_found: tuple[jwk.VerifyKey, ...] = ()
        jwks_url = section.optional_string("jwks_url")
        discovery_url = self.discovery_url(section, jwks_url)
        ca_file = self.remote_ca_file(section)
        if algs and not hs:
            keys_found = self.app_keys(section, algs, jwks_url, discovery_url)
            if section.raw("secrets"):
                section.problem("secrets", "only HS* apps verify with secrets")
        elif hs:
            for key in ("jwks_url", "discovery_url", "ca_file", "jwks_file", "public_keys"):
                if section.raw(key):
                    section.problem(key, "HS* apps verify with secrets only")
        issuer = section.field("issuer", _one_or_more, "a string or a list of strings", None)
        audience = section.field("audience", _one_or_more, "a string or a list of strings", None)
        required = section.strings("required_claims", ("exp",))
        claims = section.field("claims", _claims, "a mapping of claim to value", {})
        max_lifetime = section.field(
            "max_lifetime", lambda v: None if v is None else _positive(v), "a number", None
        )
        if app_id is None or algorithms is None or required is None or claims is None:
            return None
        if max_lifetime is not None and "exp" not in required:
            required = (*required, "exp")  # a lifetime needs an end
        return App(
            id=app_id,
            match_claim=match_claim,
            match_value=match_value,
            algorithms=tuple(dict.fromkeys(a for a in algorithms if a in algs)),
            secrets=secrets,
            keys=keys_found,
            jwks_url=jwks_url,
            issuer=issuer,
            audience=audience,
            required_claims=required,
            claims=tuple(claims.items()),
            max_lifetime=max_lifetime,
            discovery_url=discovery_url,
            ca_file=ca_file,
        )

    def discovery_url(self, section: Section, jwks_url: str | None) -> str | None:
        """`discovery_url` (SPEC §11): https (http on loopback), never with `jwks_url`."""
        url = section.optional_string("discovery_url")
        if url is None:
            return None
        if jwks_url is not None:
            section.problem(
                "discovery_url", "cannot be used with jwks_url (the document names the JWKS)"
            )
        problem = jwks_url_problem(url, what="discovery_url")
        if problem:
            section.problem("discovery_url", self.url_problem(url, problem))
        return url

    def remote_ca_file(self, section: Section) -> str | None:
        """`ca_file`: an extra CA bundle for this app's JWKS / discovery fetches."""
        ca_file = section.optional_string("ca_file")
        if ca_file is None:
            return None
        try:
            ssl.create_default_context().load_verify_locations(self.path(ca_file))
        except (OSError, ssl.SSLError):
            section.problem("ca_file", f"{self.that(ca_file)} is not a readable PEM CA bundle")
            return None
        return str(self.path(ca_file))

    def match(self, section: Section, app_id: str | None) -> tuple[str | None, str | None]:
        data = section.raw("match")
        if data is None:
            return None, None
        match = Section(data, section.at("match"), self.problems, ("claim", "value"))
        claim = match.string("claim", "appId")
        value = match.string("value", app_id)
        return claim, value

    def secrets(self, section: Section, hs: set[str]) -> tuple[bytes, ...]:
        encoding = section.choice("secret_encoding", ("base64", "raw"), "base64")
        values = section.strings("secrets")
        if values is not None and not values:
            section.problem("secrets", "an HS* app needs at least one secret")
        need = max(jwk.HS_MIN_BYTES[alg] for alg in hs)
        decoded: list[bytes] = []
        for index, value in enumerate(values or ()):
            key = f"secrets[{index}]"
            if encoding == "raw":
                try:
                    secret = value.encode("utf-8")
                except UnicodeEncodeError:  # a non-UTF-8 byte from the environment
                    section.problem(key, "is not valid UTF-8 text")
                    continue
            else:
                try:
                    secret = _b64decode(value)
                except ValueError:
                    section.problem(key, "is not valid base64 (standard or url-safe alphabet)")
                    continue
            if len(secret) < need:
                section.problem(
                    key,
                    f"is {len(secret)} bytes; {'/'.join(sorted(hs))} needs at least {need} "
                    f"(make one with: token-proxy keygen --alg {max(hs)})",
                )
                continue
            decoded.append(secret)
        return tuple(decoded)

    def app_keys(
        self, section: Section, algs: set[str], jwks_url: str | None, discovery_url: str | None
    ) -> tuple[jwk.VerifyKey, ...]:
        # (key path, what within it, key): a problem names the one key it is about
        found: list[tuple[str, str, jwk.VerifyKey]] = []
        files = section.strings("public_keys", ()) or ()
        for index, file in enumerate(files):
            where = f"public_keys[{index}]"
            data = self.read_file(section, where, file)
            if data is None:
                continue
            try:
                found.append((where, self.that(file), jwk.load_pem_public(data, where)))
            except jwk.KeyMaterialError as error:
                section.problem(where, f"{self.that(file)} {error}")
        jwks_file = section.optional_string("jwks_file")
        if jwks_file is not None:
            found.extend(("jwks_file", at, key) for at, key in self.jwks_file(section, jwks_file))
        if jwks_url is not None:
            problem = jwks_url_problem(jwks_url)
            if problem:
                section.problem("jwks_url", self.url_problem(jwks_url, problem))
        given = files or section.has("jwks_file") or jwks_url or discovery_url
        if not given:  # a source given but unusable has its own problem already
            section.problem(
                "", "an asymmetric app needs public_keys, jwks_file or jwks_url (or discovery_url)"
            )
        for where, at, key in found:
            if not any(key.fits(alg) for alg in algs):
                section.problem(
                    where,
                    f"{at} holds {jwk.describe(key.key)}, which fits none of the app's algorithms "
                    f"({', '.join(sorted(algs))})",
                )
        return tuple(key for _, _, key in found)

    def jwks_file(self, section: Section, file: str) -> list[tuple[str, jwk.VerifyKey]]:
        """The keys of a JWKS file, each with where it is (`keys[1]`); one problem per bad key."""
        data = self.read_file(section, "jwks_file", file)
        if data is None:
            return []
        try:
            document = json.loads(data)
        except ValueError:
            document = None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            what = self.that(file)
            section.problem(
                "jwks_file", f"{what} is not a JWKS document (an object with a keys list)"
            )
            return []
        if not document["keys"]:
            section.problem("jwks_file", f"{self.that(file)} holds no key")
        keys: list[tuple[str, jwk.VerifyKey]] = []
        for index, item in enumerate(document["keys"]):
            try:
                keys.append((f"keys[{index}]", jwk.from_jwk(item, "jwks_file")))
            except jwk.KeyMaterialError as error:
                section.problem("jwks_file", f"keys[{index}] {error}")
        return keys

    def routes(
        self,
        root: Section,
        ignore_case: bool,
        apps: list[App],
        upstreams: Mapping[str, Upstream],
        service: TokenService | None,
        forward: Forward | None,
    ) -> list[Route]:
        data = root.raw("routes", [])
        if data is None:
            data = []
        if not isinstance(data, list):
            root.problem("routes", "must be a list of routes")
            return []
        app_ids = {app.id for app in apps} | ({TOKEN_SERVICE_APP} if service else set())
        keys = "path methods auth apps scopes required_claims bind claims sources upstream".split()
        # Headers the proxy sets upstream (identity, claims): a token source cannot be one.
        managed = set()
        if forward is not None:
            managed = {name.lower().replace("_", "-") for name, _ in forward.identity_headers}
            if forward.claims_header:
                managed.add(forward.claims_header.lower().replace("_", "-"))
        routes: list[Route] = []
        for index, item in enumerate(data):
            section = Section(item, f"routes[{index}]", self.problems, keys)
            pattern_text = section.string("path")
            pattern = None
            if pattern_text is not None:
                try:
                    pattern = PathPattern.compile(pattern_text, ignore_case)
                except ValueError as error:
                    # the message may quote the pattern: never a value from ${VAR} substitution
                    substituted = isinstance(section.raw("path"), Substituted)
                    section.problem(
                        "path", "is not a valid route pattern" if substituted else str(error)
                    )
            methods = section.strings("methods", None)
            if methods is not None:
                for m_index, method in enumerate(methods):
                    if not _TOKEN_CHARS.fullmatch(method):
                        section.problem(
                            f"methods[{m_index}]", f"{self.that(method)} is not an HTTP method"
                        )
            auth = section.choice("auth", ("none", "optional", "required"), "required")
            allowed = section.strings("apps", None)
            for a_index, app_id in enumerate(allowed or ()):
                if app_id not in app_ids:
                    section.problem(f"apps[{a_index}]", self.named("unknown app", app_id))
            scopes = section.strings("scopes", ())
            required = section.strings("required_claims", ())
            bind = self.bind(section, pattern)
            claims = self.route_claims(section)
            sources = self.sources(section, None) if section.raw("sources") is not None else None
            for s_index, source in enumerate(sources or ()):
                if source.kind == "header" and source.name.replace("_", "-") in managed:
                    section.problem(
                        f"sources[{s_index}]",
                        f"{self.that(source.label)} names a header the proxy sets "
                        "(identity_headers)",
                    )
            upstream = section.optional_string("upstream")
            if upstream is not None and upstream not in upstreams:
                section.problem("upstream", self.named("unknown upstream", upstream))
            if pattern is None or auth is None or scopes is None or required is None:
                continue
            routes.append(
                Route(
                    index=index,
                    pattern=pattern,
                    methods=frozenset(m.upper() for m in methods) if methods else None,
                    auth=auth,
                    apps=frozenset(allowed) if allowed is not None else None,
                    scopes=frozenset(scopes),
                    required_claims=required,
                    bind=bind,
                    upstream=upstream,
                    claims=claims,
                    sources=tuple(sources) if sources else None,
                )
            )
        return routes

    def route_claims(self, section: Section) -> tuple[tuple[str, tuple[Any, ...]], ...]:
        data = section.raw("claims", {})
        if data is None:
            return ()
        if not isinstance(data, dict):
            section.problem("claims", "must be a mapping of claim to a value or a list of values")
            return ()
        rules: list[tuple[str, tuple[Any, ...]]] = []
        for claim, value in data.items():
            if not isinstance(claim, str) or not claim:
                section.problem("claims", "claim names must be non-empty strings")
                continue
            # A list names the values the claim may equal; a single value is a list of one.
            values = tuple(map(_plain, value)) if isinstance(value, list) else (_plain(value),)
            if not values:
                section.problem(join("claims", claim), "needs at least one value")
                continue
            rules.append((str(claim), values))
        return tuple(rules)

    def bind(self, section: Section, pattern: PathPattern | None) -> tuple[Binding, ...]:
        data = section.raw("bind", {})
        if data is None:
            return ()
        if not isinstance(data, dict):
            section.problem("bind", "must be a mapping of claim to path.NAME, query.NAME or ...")
            return ()
        bindings: list[Binding] = []
        for claim, source in data.items():
            key = join("bind", claim)
            kind, _, name = source.partition(".") if isinstance(source, str) else ("", "", "")
            if kind not in ("path", "query", "header") or not name:
                section.problem(
                    key, f"must be path.NAME, query.NAME or header.NAME, not {self.that(source)}"
                )
            elif kind == "header" and not _TOKEN_CHARS.fullmatch(name):
                section.problem(key, f"{self.that(source)} names an invalid header")
            elif kind == "path" and pattern is not None and name not in pattern.params:
                section.problem(
                    key,
                    f"{self.named('names the path parameter', name)}, which "
                    f"{self.named('the pattern', pattern.pattern)} does not have",
                )
            else:
                bindings.append(Binding(str(claim), kind, name))
        return tuple(bindings)

    def token_service(self, root: Section, environment: str | None) -> TokenService | None:
        if root.raw("token_service") is None:
            return None
        keys = (
            "issuer signing_keys token_ttl audience copy_claims clients jwt_bearer token_exchange"
        ).split()
        section = Section(root.raw("token_service"), "token_service", self.problems, keys)
        issuer = section.string("issuer")
        if issuer is not None:
            problem = jwks_url_problem(issuer, what="issuer")
            parts = urlsplit(issuer) if problem is None else None
            if parts is None or parts.path not in ("", "/") or parts.query or parts.fragment:
                section.problem(
                    "issuer",
                    self.url_problem(
                        issuer, "must be an https URL without a path (http: loopback)"
                    ),
                )
            issuer = issuer.rstrip("/")
        signing: list[SigningKey] = []
        files = section.strings("signing_keys")
        if files is not None and not files:
            section.problem("signing_keys", "needs at least one private key")
        for index, file in enumerate(files or ()):
            where = f"signing_keys[{index}]"
            data = self.read_file(section, where, file)
            if data is not None:
                key = _signing_key(data)
                if key is None:
                    section.problem(
                        where,
                        f"{self.that(file)} is not a PEM private key: EC P-256 or RSA >= 2048",
                    )
                else:
                    signing.append(key)
        ttl = section.number("token_ttl", 900, minimum=1)
        audience = section.optional_string("audience")
        copy = section.strings("copy_claims", ("appId", "userId", "customerId", "email", "scope"))
        clients = self.clients(section)
        bearer = Section(
            section.raw("jwt_bearer"), section.at("jwt_bearer"), self.problems, ("apps",)
        ).strings("apps", ())
        exchange = Section(
            section.raw("token_exchange"), section.at("token_exchange"), self.problems, ("apps",)
        ).strings("apps", ())
        if issuer is None or ttl is None or copy is None or bearer is None or exchange is None:
            return None
        return TokenService(
            issuer, tuple(signing), float(ttl), audience, copy, tuple(clients), bearer, exchange
        )

    def clients(self, section: Section) -> list[Client]:
        data = section.raw("clients", [])
        if not isinstance(data, list):
            section.problem("clients", "must be a list of clients")
            return []
        clients: list[Client] = []
        for index, item in enumerate(data):
            where = section.at(f"clients[{index}]")
            client = Section(item, where, self.problems, ("id", "secret", "org"))
            client_id, secret = client.string("id"), client.string("secret")
            org = client.optional_string("org")
            if client_id is not None and not _ID.fullmatch(client_id):
                client.problem(
                    "id", f"{self.that(client_id)} is not 1-64 characters of A-Z a-z 0-9 . _ -"
                )
            elif client_id in {c.id for c in clients}:
                client.problem("id", f"{self.that(client_id)} is used twice")
            if secret is not None and len(secret) < 16:
                client.problem("secret", "must be at least 16 characters")
            if client_id is not None and secret is not None:
                clients.append(Client(client_id, secret, org))
        return clients

    def cross_checks(
        self, root: Section, apps: list[App], routes: list[Route], service: TokenService | None
    ) -> None:
        needs_token = not routes or any(route.auth != "none" for route in routes)
        if needs_token and not apps and service is None and not root.raw("apps"):
            root.problem("apps", "needs at least one app (some routes need a token)")
        if service is None:
            return
        known = {app.id for app in apps}
        for key, ids, extra in (
            ("jwt_bearer.apps", service.jwt_bearer_apps, set()),
            ("token_exchange.apps", service.token_exchange_apps, {TOKEN_SERVICE_APP}),
        ):
            for index, app_id in enumerate(ids):
                if app_id not in known | extra:
                    self.problems.append(
                        Problem(f"token_service.{key}[{index}]", self.named("unknown app", app_id))
                    )


def _listen(value: Any) -> Listen:
    text = as_string(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        shown = quoted(value)
        raise ValueError("must be HOST:PORT" + (f", not {shown}" if shown else ""))
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return Listen(host or "0.0.0.0", int(port))  # noqa: S104 - the documented default


def _upstream_url_flaw(parts: SplitResult, port: int | None) -> str | None:
    """Why an upstream URL with a host is not one the proxy can send to, or None."""
    if parts.scheme not in ("http", "https"):
        return "the scheme is not http or https"
    if port == -1:
        return "its port is not a number"
    if parts.query or parts.fragment:
        return "it has a query or fragment"
    if parts.username is not None:
        return "it has user:password (never sent upstream)"
    return None


def without_userinfo(url: str) -> str:
    """A URL as a message may show it: `user:password@` removed."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1", url)


def jwks_url_problem(url: str, what: str = "jwks_url") -> str | None:
    """Why `url` may not be fetched (https only, http for loopback), or None."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL at all ("https://[x")
        parts = urlsplit("")
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return None
    return f"{what} must be https (http only for 127.0.0.0/8, ::1, localhost)"


# --- dev_console (SPEC §12) -------------------------------------------------------------------


def _dev_console(root: Section, admin: Listen | None) -> bool:
    """`dev_console`: true only with a loopback `admin_listen`, since the console mints tokens
    for every HS* app (and null would serve it nowhere)."""
    enabled = bool(root.boolean("dev_console", False))
    if enabled and (admin is None or not is_loopback(admin.host)):
        # (the admin_listen value is not echoed: it may have come from ${VAR} substitution)
        root.problem(
            "dev_console",
            "needs a loopback admin_listen (127.0.0.1, ::1 or localhost): the console mints tokens",
        )
    return enabled


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _b64decode(value: str) -> bytes:
    text = value.strip()
    alt = b"-_" if ("-" in text or "_" in text) else None
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, altchars=alt, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64") from None


def _one_or_more(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (str(value),)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(str(v) for v in value)
    raise ValueError("must be a string or a non-empty list of strings")


def _claims(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("must be a mapping of claim to value")
    return {str(k): _plain(v) for k, v in value.items()}


def _plain(value: Any) -> Any:
    """A YAML value as the JSON value it stands for (Substituted strings become plain str)."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _positive(value: Any) -> float:
    number = as_number(value)
    if number <= 0:
        raise ValueError("must be a positive number of seconds")
    return number


def _server_header(value: Any) -> str | None:
    if value is None:
        return None
    text = as_string(value)
    if not _HEADER_VALUE.fullmatch(text):
        raise ValueError("must be 1-256 printable ASCII characters (a header value) or null")
    return text


def _timeout(value: Any) -> float:
    """A timeout: a positive number of seconds (zero would mean "never" or "at once")."""
    number = as_number(value, minimum=-float("inf"))
    if number <= 0:
        raise ValueError("must be a positive number of seconds")
    return number


def _signing_key(data: bytes) -> SigningKey | None:
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return None
    except Exception:  # UnsupportedAlgorithm for exotic keys
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
        alg = "ES256"
    elif isinstance(key, rsa.RSAPrivateKey) and key.key_size >= jwk.MIN_RSA_BITS:
        alg = "RS256"
    else:
        return None
    return SigningKey(key, alg, jwk.thumbprint(key.public_key()))
