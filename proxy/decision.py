"""The decision (SPEC §4), in the contract's order: forward this request, or reject it.

    decision = await decide(view, config, verifier, now=clock())   # or raises Rejection
    decision.target.path, decision.route, decision.verified
    decide_now(view, config, verifier, now, reached=reached)   # reached.path, reached.route

`serve` and `inspect` both call `decide()`; `inspect` and the dev console call
`explain.explain()`, which passes a trace list to it.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import unquote

from .claims import ABSENT, Trace, Verified, claim_at, json_equal, note
from .config import Config, Route, Source
from .errors import Reason, Rejection
from .extract import Found, extract_token, query_values
from .model import RequestView
from .routing import Target, split_target
from .tokens import Refetch, Verifier


class Decision:
    """Forward: the normalised target, the route, where the token was, what it proved."""

    __slots__ = ("found", "route", "target", "verified")  # a plain class: see model.RequestView

    def __init__(
        self,
        target: Target,
        route: Route | None,
        found: Found | None = None,
        verified: Verified | None = None,
    ) -> None:
        self.target: Final = target
        self.route: Final = route
        self.found: Final = found
        self.verified: Final = verified

    @property
    def app(self) -> str:
        return self.verified.app.id if self.verified else ""


class Reached:
    """How far a decision got, for the request's access line, whatever its end: the normalised
    path once step 1 passed, the matched route's pattern once step 2 found one. The caller
    owns it: a Rejection carries only the contract's answer."""

    __slots__ = ("path", "route")  # a plain class: see model.RequestView

    def __init__(self) -> None:
        self.path: str | None = None
        self.route = ""


def match_route(
    routes: tuple[Route, ...], method: str, path: str
) -> tuple[Route | None, dict[str, str]]:
    """Step 2: the first route whose pattern matches, if it takes the method; else the first
    later route with the same pattern that does; else 405 method_not_allowed."""
    for index, route in enumerate(routes):
        params = route.pattern.match(path)
        if params is None:
            continue
        if route.methods is None or method in route.methods:
            return route, params
        # Never a later, broader pattern: that would open the path to a weaker route.
        return _same_pattern(routes, index, method, path)
    return None, {}


def _same_pattern(
    routes: tuple[Route, ...], index: int, method: str, path: str
) -> tuple[Route, dict[str, str]]:
    first = routes[index]
    shape = first.pattern.shape
    allowed = set(first.methods or ())
    for route in routes[index + 1 :]:
        if route.pattern.shape != shape:
            continue
        if route.methods is None or method in route.methods:
            params = route.pattern.match(path)  # the same path, under this route's names
            return route, params if params is not None else {}
        allowed |= route.methods
    raise Rejection(
        Reason.METHOD_NOT_ALLOWED,
        f"{method} is not among the methods of {first.pattern.pattern}",
        allow=", ".join(sorted(allowed)),
        route=first.pattern.pattern,
    )


def is_preflight(view: RequestView) -> bool:
    """A CORS preflight: OPTIONS with Origin and Access-Control-Request-Method, and no body
    (an OPTIONS with a body is an ordinary request: its body must not go upstream unchecked)."""
    headers = view.headers
    return (
        view.method == "OPTIONS"
        and not view.has_body
        and "Origin" in headers
        and "Access-Control-Request-Method" in headers
    )


class Pending:
    """A decision waiting for a JWKS refetch: `await pending.resume()` finishes it."""

    __slots__ = ("found", "params", "refetch", "route", "target", "trace", "view")

    def __init__(
        self,
        view: RequestView,
        target: Target,
        route: Route | None,
        params: dict[str, str],
        found: Found,
        refetch: Refetch,
        trace: Trace,
    ) -> None:
        self.view = view
        self.found = found
        self.target = target
        self.route = route
        self.params = params
        self.refetch = refetch
        self.trace = trace

    async def resume(self) -> Decision:
        """Steps 6-8 once the keys are refetched: a Decision, or a Rejection."""
        verified = await self.refetch.verify()
        return _authorized(
            view=self.view,
            target=self.target,
            route=self.route,
            params=self.params,
            found=self.found,
            verified=verified,
            trace=self.trace,
        )


async def decide(
    view: RequestView, config: Config, verifier: Verifier, now: float, trace: Trace = None
) -> Decision:
    """Steps 1-8: a Decision to forward, or a Rejection."""
    decided = decide_now(view, config, verifier, now, trace)
    return await decided.resume() if isinstance(decided, Pending) else decided


def decide_now(
    view: RequestView,
    config: Config,
    verifier: Verifier,
    now: float,
    trace: Trace = None,
    reached: Reached | None = None,
) -> Decision | Pending:
    """Steps 1-8 without waiting: a Decision, a Rejection, or `Pending` when the token names
    a kid its JWKS lacks (the listener then awaits `Pending.resume()`). `reached` is filled
    in as steps 1 and 2 pass."""
    if reached is None:
        reached = Reached()
    try:
        target = split_target(view.target, view.headers.get("Host"))
    except Rejection as rejection:
        note(trace, "path", False, rejection.detail)
        raise
    reached.path = target.path
    if trace is not None:  # (guarded: the details are strings built for `inspect` only)
        trace.append(("path", True, f"normalised to {target.path}"))
    try:
        route, params = match_route(config.routes, view.method, target.match)
    except Rejection as rejection:
        note(trace, "route", False, f"{rejection.route} takes only {rejection.allow}")
        reached.route = rejection.route
        raise
    if route is not None:
        reached.route = route.pattern.pattern
    if trace is not None:
        trace.append(("route", True, route.pattern.pattern if route else "none: token required"))
    if route is not None and route.auth == "none":
        return Decision(target, route)
    if view.method == "OPTIONS" and config.preflight == "pass" and is_preflight(view):
        note(trace, "preflight", True, "CORS preflight passes without a token")
        return Decision(target, route)
    sources = token_sources(route, config)
    found = extract_token(view, sources)
    if found is None:
        if route is not None and route.auth == "optional":
            note(trace, "token", True, "none; the route's auth is optional")
            return Decision(target, route)
        note(trace, "token", False, "none found")
        raise Rejection(Reason.MISSING, "no token in " + ", ".join(s.label for s in sources))
    if trace is not None:
        trace.append(("token", True, "found in " + found.source.label))
    verified = verifier.cached(found.token, now, trace) or verifier.verify_now(
        found.token, now, trace
    )
    if isinstance(verified, Refetch):
        return Pending(view, target, route, params, found, verified, trace)
    return _authorized(view, target, route, params, found, verified, trace)


def _authorized(
    view: RequestView,
    target: Target,
    route: Route | None,
    params: dict[str, str],
    found: Found,
    verified: Verified,
    trace: Trace,
) -> Decision:
    if route is not None:
        authorize(route, params, verified, view, target, trace)
    return Decision(target, route, found, verified)


def authorize(
    route: Route,
    params: dict[str, str],
    verified: Verified,
    view: RequestView,
    target: Target,
    trace: Trace = None,
) -> None:
    """Step 8: the route's own checks, all 403; run on every request, cached token or not."""
    app = verified.app.id
    claims = verified.claims
    if route.apps is not None and app not in route.apps:
        note(trace, "route apps", False, f"app {app} is not in the route's apps")
        raise Rejection(Reason.APP_NOT_ALLOWED, "the app is not allowed here", app=app)
    if not route.scopes <= verified.scopes:
        note(trace, "scopes", False, "missing " + " ".join(sorted(route.scopes - verified.scopes)))
        raise Rejection(Reason.INSUFFICIENT_SCOPE, "a required scope is missing", app=app)
    for name in route.required_claims:
        if name not in claims:
            note(trace, "route claims", False, f"claim {name} is absent")
            raise Rejection(Reason.ROUTE_MISSING_CLAIM, f"claim {name} is absent", app=app)
    for binding in route.bind:
        if binding.claim not in claims:
            continue
        expected = _claim_text(claims[binding.claim])
        actual = _request_value(binding.kind, binding.name, params, view, target)
        if expected is None or actual is None or expected != actual:
            note(
                trace, f"bind {binding.claim}", False, f"differs from {binding.kind}.{binding.name}"
            )
            raise Rejection(
                Reason.BINDING_MISMATCH,
                f"claim {binding.claim} does not match {binding.kind}.{binding.name}",
                app=app,
            )
        if trace is not None:
            trace.append((f"bind {binding.claim}", True, f"equals {binding.kind}.{binding.name}"))
    for name, allowed in route.claims:
        value = claims[name] if name in claims else claim_at(claims, name)
        if value is ABSENT or not _claim_allowed(value, allowed):
            detail = f"{name} is absent" if value is ABSENT else f"{name} matches no listed value"
            note(trace, f"claim {name}", False, detail)
            raise Rejection(Reason.ROUTE_CLAIM_MISMATCH, f"claim {detail}", app=app)
        if trace is not None:
            trace.append((f"claim {name}", True, f"{name} matches a listed value"))
    if trace is not None:
        trace.append(("route checks", True, "apps, scopes, claims and bindings fine"))


def _claim_allowed(value: Any, allowed: tuple[Any, ...]) -> bool:
    """A route claim rule: the claim equals one of the values, or is a list with an element
    that does (roles, groups); compared as JSON values, so 1 is not true and "1" is not 1."""
    if any(json_equal(value, candidate) for candidate in allowed):
        return True
    return isinstance(value, list) and any(
        json_equal(element, candidate) for element in value for candidate in allowed
    )


def _claim_text(value: Any) -> str | None:
    """A claim as binding text: a string as is, an integer in decimal, nothing else."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _request_value(
    kind: str, name: str, params: dict[str, str], view: RequestView, target: Target
) -> str | None:
    """The one request value a claim is bound to; None when absent or repeated."""
    if kind == "path":
        raw = params.get(name)
        return None if raw is None else unquote(raw, errors="surrogateescape")
    if kind == "query":
        values = query_values("?" + target.query, name)
    else:
        values = view.headers.getall(name, [])
    return values[0] if len(values) == 1 else None


def token_sources(route: Route | None, config: Config) -> tuple[Source, ...]:
    """Step 3: where a request's token may be: the route's sources, else token.sources."""
    if route is not None and route.sources is not None:
        return route.sources
    return config.token.sources
