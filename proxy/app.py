"""The shell's state: what the listener serves from, swapped on reload; the admin endpoints.

    resources = Resources(metrics, log)                # per process: pools, JWKS sources
    proxy = Proxy(await resources.prepare(config), resources)
    listener = Listener(proxy, config)                 # listener.py: the proxied requests
    proxy.swap(await resources.prepare(new_config))    # SIGHUP: atomic, in-flight untouched

The framework-free part of a State (verifier, header plan, error bodies) is `state.py`'s;
this adds the JWKS sources and upstream pools a process keeps. The admin listener is aiohttp's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .config import Config, Upstream
from .forward import UpstreamPool
from .headers import HeaderPlan
from .keys import Fetcher, HttpFetcher, JwksSource
from .metrics import Metrics
from .model import Headers
from .state import ErrorBodies, RemoteSpec, compile_core, remote_apps
from .telemetry import Log
from .tokens import Verifier

# The token service's handler (method, path, headers, form body, too large): its answer's
# status, headers and body, and its OAuth error word ("" on success).
ServiceHandler = Callable[
    [str, str, Headers, bytes, bool], Awaitable[tuple[int, list[tuple[str, str]], bytes, str]]
]
# The access-log outcome of a token-service request (not a proxied one: not in requests_total).
SERVICE_OUTCOME: Final = "token_service"
# The logged status of a request whose client left before any answer (nginx's 499), and its
# outcome when it left before the decision was made.
CLIENT_CLOSED: Final = 499
CLIENT_CLOSED_OUTCOME: Final = "client_closed"


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
        self.active: State | None = None

    def _keys_changed(self) -> None:
        if self.active is not None:
            self.active.verifier.clear_cache()

    async def prepare(self, config: Config, fetch: bool = True) -> State:
        """Compile a config into a State; new JWKS / discovery URLs get one fetch first."""
        sources: dict[RemoteSpec, JwksSource] = {}
        by_app: dict[str, JwksSource] = {}
        fresh: list[JwksSource] = []
        for spec, app_ids in remote_apps(config).items():  # one source per shared spec
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
        core = compile_core(config, by_app, self.metrics)
        named: dict[str | None, Upstream] = {}
        if config.mode != "authorize" and config.upstream is not None:  # authorize: no pools
            named[None] = config.upstream
            named.update(config.upstreams)
        upstreams = {name: (up, self._pool(up)) for name, up in named.items()}
        return State(
            config=config,
            verifier=core.verifier,
            plan=core.plan,
            errors=core.errors,
            upstreams=upstreams,
            sources=tuple(sources.values()),
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
        if isinstance(self.fetcher, HttpFetcher):
            await self.fetcher.close()


SERVICE_PATHS: Final = frozenset(
    {"/oauth/token", "/.well-known/jwks.json", "/.well-known/oauth-authorization-server"}
)


class Proxy:
    """What the main listener serves from: the current state, the process's resources."""

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
