"""The aiohttp shell: the one request handler, the swappable state, the admin endpoints.

    resources = Resources(metrics, log)                # per process: pools, JWKS sources
    proxy = Proxy(await resources.prepare(config), resources)
    server = make_server(proxy, config)                # server.py: aiohttp's low-level server
    proxy.swap(await resources.prepare(new_config))    # SIGHUP: atomic, in-flight untouched

Everything aiohttp-specific about a request happens here: it becomes a `RequestView`, the core
decides, `forward.exchange` streams, and a `Rejection` is rendered through `errors.CONTRACT`.
"""

from __future__ import annotations

import asyncio
import json
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter  # a module attribute lookup less, compiled
from typing import Any, Final

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST

from .authorize import allow_headers, asked_request
from .config import App, Config, Errors, Upstream
from .decision import Decision, decide
from .errors import CONTRACT, Reason, Rejection
from .forward import Traffic, UpstreamError, UpstreamPool, exchange
from .headers import (
    Forwarding,
    HeaderPlan,
    remove_query_param,
    request_id,
)
from .keys import AppKeys, Fetcher, HttpFetcher, JwksSource
from .metrics import Metrics
from .model import RequestView
from .request import ProxyRequest
from .telemetry import Log
from .tokens import Verifier, service_app
from .websocket import WebSocketClients, is_websocket, relay

# The token service's handler: its answer and its OAuth error word ("" on success).
ServiceHandler = Callable[[web.BaseRequest], Awaitable[tuple[web.StreamResponse, str]]]
# The access-log outcome of a token-service request (not a proxied one: not in requests_total).
SERVICE_OUTCOME: Final = "token_service"
# The logged status of a request whose client left before any answer (nginx's 499), and its
# outcome when it left before the decision was made.
CLIENT_CLOSED: Final = 499
CLIENT_CLOSED_OUTCOME: Final = "client_closed"


class ErrorBodies:
    """Every rejection's status, body and challenge, rendered once per config."""

    def __init__(self, errors: Errors) -> None:
        self._rendered: dict[Reason, tuple[int, bytes, str | None]] = {}
        for reason, outcome in CONTRACT.items():
            error: dict[str, Any] = {
                "code": outcome.code,
                "name": outcome.name,
                "message": outcome.message,
            }
            if errors.expose_reason:
                error["reason"] = reason.value
            body = json.dumps({"error": error}, separators=(",", ":")).encode()
            challenge = None
            if outcome.challenge == "":
                challenge = f'Bearer realm="{errors.realm}"'
            elif outcome.challenge is not None:
                challenge = (
                    f'Bearer realm="{errors.realm}", error="{outcome.challenge}", '
                    f'error_description="{outcome.message}"'
                )
            self._rendered[reason] = (outcome.status, body, challenge)

    def rendered(self, reason: Reason) -> tuple[int, bytes, str | None]:
        """Status, body and challenge (None: no challenge) of one reason."""
        return self._rendered[reason]

    def response(
        self,
        reason: Reason,
        rid_name: str,
        rid: str,
        retry_after: int | None = None,
        allow: str | None = None,
    ) -> web.Response:
        status, body, challenge = self._rendered[reason]
        headers = {rid_name: rid}
        if challenge is not None:
            headers["WWW-Authenticate"] = challenge
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if allow is not None:
            headers["Allow"] = allow
        return web.Response(
            status=status, body=body, headers=headers, content_type="application/json"
        )


@dataclass(frozen=True, slots=True)
class State:
    """One loaded configuration and everything compiled from it; swapped whole on reload."""

    config: Config
    verifier: Verifier
    plan: HeaderPlan
    errors: ErrorBodies
    # route upstream name (None: the default) -> the upstream and its connection pool
    upstreams: dict[str | None, tuple[Upstream, UpstreamPool]]
    sources: tuple[JwksSource, ...]

    def ready(self, now: float) -> list[str]:
        """What is not ready: each JWKS or discovery URL without usable keys."""
        return [s.label for s in self.sources if not s.usable(now)]


class Resources:
    """What outlives one configuration in a process: pools, JWKS sources, metrics, log."""

    def __init__(
        self,
        metrics: Metrics,
        log: Log,
        clock: Callable[[], float] = time.time,
        fetcher: Fetcher | None = None,
    ) -> None:
        self.metrics = metrics
        self.log = log
        self.clock = clock
        self.fetcher = fetcher or HttpFetcher()
        self.pools: dict[Upstream, UpstreamPool] = {}
        self.sources: dict[tuple[Any, ...], JwksSource] = {}
        self.tasks: dict[JwksSource, asyncio.Task[None]] = {}
        self.websockets = WebSocketClients()
        self.active: State | None = None

    def _keys_changed(self) -> None:
        if self.active is not None:
            self.active.verifier.clear_cache()

    async def prepare(self, config: Config, fetch: bool = True) -> State:
        """Compile a config into a State; new JWKS / discovery URLs get one fetch first."""
        # Apps share a source when they fetch the same thing the same way: URL, CA bundle and,
        # for discovery, the issuers the document is checked against.
        remote: dict[tuple[Any, ...], list[str]] = {}
        for app in config.apps:
            spec = _remote(app)
            if spec is not None:
                remote.setdefault(spec, []).append(app.id)
        sources: dict[tuple[Any, ...], JwksSource] = {}
        by_app: dict[str, JwksSource] = {}
        fresh: list[JwksSource] = []
        for spec, app_ids in remote.items():
            discovery, url, ca_file, issuers = spec
            apps = tuple(app_ids)
            key = (*spec, apps, config.token)
            source = self.sources.get(key)
            if source is None:
                source = JwksSource(
                    url,
                    apps,
                    config.token,
                    fetcher=self.fetcher,
                    clock=self.clock,
                    metrics=self.metrics,
                    log=self.log,
                    on_change=self._keys_changed,
                    discovery=discovery,
                    issuers=issuers,
                    ca_file=ca_file,
                )
                self.sources[key] = source
                fresh.append(source)
            sources[spec] = source
            by_app.update(dict.fromkeys(apps, source))
        if fetch and fresh:
            await asyncio.gather(*(source.fetch() for source in fresh))
        keys = {app.id: AppKeys(app, by_app.get(app.id)) for app in config.apps}
        implicit = service_app(config)
        if implicit is not None:
            keys[implicit.id] = AppKeys(implicit)
        verifier = Verifier(config, keys, metrics=self.metrics, service_app=implicit)
        named: dict[str | None, Upstream] = {}
        if config.mode != "authorize" and config.upstream is not None:  # authorize: no pools
            named[None] = config.upstream
            named.update(config.upstreams)
        upstreams = {name: (up, self._pool(up)) for name, up in named.items()}
        return State(
            config,
            verifier,
            HeaderPlan(config.forward),
            ErrorBodies(config.errors),
            upstreams,
            tuple(sources.values()),
        )

    def _pool(self, upstream: Upstream) -> UpstreamPool:
        pool = self.pools.get(upstream)
        if pool is None:
            pool = self.pools[upstream] = UpstreamPool(upstream)
        return pool

    def activate(self, state: State) -> None:
        """Make `state` the active one (its JWKS sources refreshing); retire what it dropped."""
        self.active = state
        used_sources = set(state.sources)
        for key, source in list(self.sources.items()):
            if source not in used_sources:
                del self.sources[key]
                task = self.tasks.pop(source, None)
                if task is not None:
                    task.cancel()
        for source in used_sources:
            if source not in self.tasks:
                self.tasks[source] = asyncio.ensure_future(source.run())
        used_pools = {pool for _, pool in state.upstreams.values()}
        for upstream, pool in list(self.pools.items()):
            if pool not in used_pools:
                del self.pools[upstream]
                pool.close()

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
        for pool in self.pools.values():
            pool.close()
        await self.websockets.close()
        if isinstance(self.fetcher, HttpFetcher):
            await self.fetcher.close()


SERVICE_PATHS: Final = frozenset(
    {"/oauth/token", "/.well-known/jwks.json", "/.well-known/oauth-authorization-server"}
)


class Proxy:
    """The request handler of the main listener."""

    def __init__(self, state: State, resources: Resources, scheme: str = "http") -> None:
        self.state = state
        self.resources = resources
        self.metrics = resources.metrics
        self.log = resources.log
        self.clock = resources.clock
        self.scheme = scheme
        self.service: ServiceHandler | None = None
        resources.activate(state)

    def swap(self, state: State) -> None:
        """Serve `state` from the next request on (requests in flight keep theirs)."""
        self.state = state
        self.resources.activate(state)

    async def handle(self, request: ProxyRequest) -> web.StreamResponse:
        state = self.state
        config = state.config
        started = perf_counter()
        metrics = self.metrics
        metrics.in_flight(1)
        head = request.head
        rid_name = config.forward.request_id_header
        rid = request_id(head.headers.get(rid_name))
        peer = request.peer
        traffic = Traffic()
        decided: Decision | Rejection | None = None
        response: web.StreamResponse | None = None
        reason = app = ""
        outcome = "forwarded"
        asked = head.method  # the method logged: in authorize mode, the one asked about
        try:
            if (
                config.token_service is not None
                and self.service is not None
                and head.path.partition("?")[0] in SERVICE_PATHS
            ):
                outcome = SERVICE_OUTCOME
                response, reason = await self.service(request)
                response.headers[rid_name] = rid
                traffic.bytes_out = _body_size(response, head.method)
                return response
            if config.mode == "authorize":  # SPEC §10: a gateway asks about another request
                view = asked_request(config.authorize, head.method, head.path, head.raw_headers,
                                     peer, self.scheme, request.with_body)  # fmt: skip
                asked = view.method
                decided = await decide(view, config, state.verifier, self.clock())
                app = decided.app
                response = web.Response(headers=_text(allow_headers(decided, config.forward,
                                                                    rid_name, rid)))  # fmt: skip
                return response
            view = RequestView(
                head.method, head.path, head.headers, peer, self.scheme, request.with_body
            )
            decided = await decide(view, config, state.verifier, self.clock())
            app = decided.app
            response = await self.forward(request, state, decided, peer, rid, traffic)
        except Rejection as rejection:
            decided = rejection
            reason, app = rejection.reason.value, rejection.app
            outcome = CONTRACT[rejection.reason].name
            response = state.errors.response(
                rejection.reason, rid_name, rid, rejection.retry_after, rejection.allow
            )
            traffic.bytes_out = _body_size(response, head.method)
            if request.with_body and not request.content.is_eof():
                response.force_close()  # never read a rejected body (Expect: 100-continue)
        except UpstreamError as error:
            reason, outcome = error.reason.value, CONTRACT[error.reason].name
            traffic.broken = error.detail
            response = state.errors.response(error.reason, rid_name, rid)
            traffic.bytes_out = _body_size(response, head.method)
        except Exception:
            reason, outcome = Reason.INTERNAL.value, CONTRACT[Reason.INTERNAL].name
            self.log.event(
                "error", "internal_error", request_id=rid, traceback=traceback.format_exc()
            )
            response = state.errors.response(Reason.INTERNAL, rid_name, rid)
            traffic.bytes_out = _body_size(response, head.method)
        finally:
            metrics.in_flight(-1)
            if traffic.broken is not None:
                self.log.event(
                    "warning",
                    "upstream_error",
                    request_id=rid,
                    upstream=_upstream_name(decided),
                    error=traffic.broken,
                )
            status = _answered(response, traffic)
            if status is None:
                # No answer went out: the client left (aiohttp cancelled the handler) before
                # one. Still one access line and one count, as nginx logs its 499.
                status = CLIENT_CLOSED
                if not isinstance(decided, Decision) and outcome != SERVICE_OUTCOME:
                    outcome = CLIENT_CLOSED_OUTCOME  # left while the decision was pending
            elapsed = perf_counter() - started
            if outcome != SERVICE_OUTCOME:
                metrics.request(outcome, reason, app, elapsed)
            if traffic.upstream_seconds is not None:
                metrics.upstream(_upstream_name(decided), traffic.upstream_seconds)
            if config.access_log:
                self._access(
                    request,
                    asked,
                    decided,
                    rid,
                    status,
                    reason,
                    app,
                    outcome,
                    elapsed,
                    traffic,
                )
        return response

    def forward(
        self,
        request: ProxyRequest,
        state: State,
        decision: Decision,
        peer: str,
        rid: str,
        traffic: Traffic,
    ) -> Awaitable[web.StreamResponse]:
        """The exchange (or WebSocket relay) to await: one coroutine less on every resume."""
        config = state.config
        route = decision.route
        upstream, pool = state.upstreams[route.upstream if route is not None else None]
        verified = decision.verified
        found = decision.found
        head = request.head
        client_host = head.headers.get("Host")
        client_host_bytes = (
            client_host.encode("utf-8", "surrogateescape") if client_host is not None else None
        )
        has_body = request.with_body
        facts = Forwarding(
            client_host_bytes
            if upstream.preserve_host and client_host_bytes
            else upstream.host_header.encode(),
            client_host_bytes,
            peer,
            self.scheme,
            rid,
            verified.identity if verified is not None else (),
            verified.claims_header if verified is not None else None,
            found.source if found is not None and not config.forward.token else None,
            has_body and "Content-Length" not in head.headers,
        )
        path = upstream.base_path + decision.target.path
        if is_websocket(head):
            query = decision.target.query
            if facts.drop_token is not None and facts.drop_token.kind == "query":
                query = remove_query_param(query, facts.drop_token.name)
            expires_in = (
                verified.exp + config.token.leeway - self.clock()
                if verified is not None and verified.exp is not None
                else None
            )
            return relay(
                request,
                self.resources.websockets,
                upstream,
                path + ("?" + query if query else ""),
                state.plan.request_headers(head.raw_headers, facts),
                expires_in,
                traffic,
            )
        upstream_head = state.plan.request_head(
            head.method, path, decision.target.query, head.raw_headers, facts
        )
        return exchange(
            request, pool, upstream_head, config.forward.request_id_header, rid, has_body,
            facts.chunked, traffic,
        )  # fmt: skip

    def _access(
        self,
        request: ProxyRequest,
        method: str,
        decided: Decision | Rejection | None,
        rid: str,
        status: int,
        reason: str,
        app: str,
        outcome: str,
        elapsed: float,
        traffic: Traffic,
    ) -> None:
        route = ""
        if isinstance(decided, Decision):
            path = decided.target.path
            route = decided.route.pattern.pattern if decided.route is not None else ""
        elif decided is not None and decided.path is not None:
            path, route = decided.path, decided.route
        else:
            path = request.head.path.partition("?")[0][:2048]
            if outcome == SERVICE_OUTCOME:
                route = path  # one of the service's fixed paths
        self.log.access(
            rid, method, path, route, status, outcome, reason, app,
            request.peer, elapsed, traffic.upstream_seconds, traffic.bytes_in,
            traffic.bytes_out,
        )  # fmt: skip


def _remote(app: App) -> tuple[bool, str, str | None, tuple[str, ...] | None] | None:
    """What an app fetches its keys from: (discovery?, URL, ca_file, issuers), or None."""
    if app.discovery_url:
        return True, app.discovery_url, app.ca_file, app.issuer
    if app.jwks_url:
        return False, app.jwks_url, app.ca_file, None
    return None


def _text(headers: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """Raw headers as aiohttp's (which writes values as UTF-8)."""
    return CIMultiDict(
        (n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in headers
    )


def _body_size(response: web.StreamResponse, method: str) -> int:
    """The body bytes of an answer the proxy made itself (SPEC §7 bytes_out); none for HEAD."""
    if method == "HEAD" or not isinstance(response, web.Response):
        return 0
    return response.content_length or 0


def _answered(response: web.StreamResponse | None, traffic: Traffic) -> int | None:
    """The status that went out, None when none did. A function, not inline in `handle`'s
    `finally`: mypy types a finally block as the try ended normally (`response` set), and
    mypyc compiles that type in, so a cancelled handler (`response` None) raised TypeError
    there and its access line and count were lost."""
    return response.status if response is not None else traffic.status


def _upstream_name(decided: Decision | Rejection | None) -> str:
    """The upstream a request went to, for logs and metrics."""
    if isinstance(decided, Decision) and decided.route is not None and decided.route.upstream:
        return decided.route.upstream
    return "default"


# --- Admin listener ---------------------------------------------------------------------------


def admin_app(
    ready: Callable[[], list[str]],
    metrics: Callable[[], bytes],
    server_header: Callable[[], str | None] = lambda: "token-proxy",
) -> web.Application:
    """/healthz, /readyz and /metrics; nothing else, and nothing proxied."""

    async def server(_: web.Request, response: web.StreamResponse) -> None:
        value = server_header()  # never aiohttp's own, which names its version
        if value is None:
            response.headers.popall("Server", None)
        else:
            response.headers["Server"] = value

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        missing = ready()
        if missing:
            return web.json_response({"status": "not ready", "waiting_for": missing}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(body=metrics(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.on_response_prepare.append(server)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app
