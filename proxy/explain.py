"""Explaining one token (`token-proxy inspect`, the dev console): `decide()` with a trace.

    explanation = await explain(config, verifier, token, "GET", "/v1/users/42", now=time.time())
    explanation.summary()   # {"forwarded": False, "status": 401, "reason": "expired", ...}

The token goes where the route would look for it (`place_token`); nothing here serves or
forwards, so `inspect` runs without a listener or an upstream pool (tests/test_layers.py).
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote

from multidict import CIMultiDict

from .config import Config, Source
from .decision import Decision, decide, match_route, token_sources
from .errors import CONTRACT, Rejection
from .model import RequestView
from .routing import split_target
from .tokens import Verifier


class Explanation:
    """What `decide()` did with one token: each step, and the Decision or the Rejection."""

    __slots__ = ("decided", "steps")

    def __init__(self, steps: list[tuple[str, bool, str]], decided: Decision | Rejection) -> None:
        self.steps: Final = steps
        self.decided: Final = decided

    def summary(self) -> dict[str, Any]:
        """`inspect --json`'s object (plus `name`): forwarded, status, code, reason, app, steps."""
        decided = self.decided
        result: dict[str, Any] = {"forwarded": True, "status": None, "code": None, "reason": None}
        if isinstance(decided, Decision):
            result["app"] = decided.app or None
        else:
            outcome = CONTRACT[decided.reason]
            result.update(
                forwarded=False,
                status=outcome.status,
                code=outcome.code,
                name=outcome.name,
                reason=decided.reason.value,
                app=decided.app or None,
            )
        result["steps"] = [{"step": s, "ok": ok, "detail": d} for s, ok, d in self.steps]
        return result


def inspect_source(config: Config, method: str, target: str) -> Source:
    """Where `explain` puts the token: the first source of the route the request would take
    (token.sources when none matches, or when the path or method is rejected before step 3)."""
    try:
        route, _ = match_route(config.routes, method, split_target(target, "localhost").match)
    except Rejection:
        route = None  # the decision rejects the request before it looks for a token
    return token_sources(route, config)[0]


def place_token(config: Config, method: str, path: str, token: str) -> tuple[str, CIMultiDict[str]]:
    """A request target and headers carrying `token` where the route would look for it."""
    headers: CIMultiDict[str] = CIMultiDict(Host="localhost")
    target = path if path.startswith("/") else "/" + path
    source = inspect_source(config, method, target)
    if source.kind == "header":
        if source.name == "authorization":
            headers["Authorization"] = "Bearer " + token
        else:
            headers[source.name] = token
    elif source.kind == "query":
        target += ("&" if "?" in target else "?") + f"{quote(source.name)}={quote(token)}"
    else:
        headers["Cookie"] = f"{source.name}={token}"
    return target, headers


async def explain(
    config: Config,
    verifier: Verifier,
    token: str,
    method: str,
    path: str,
    now: float,
    steps: list[tuple[str, bool, str]] | None = None,
) -> Explanation:
    """Run `decide()` with a trace on a request to `method path` that carries `token`."""
    steps = [] if steps is None else steps
    method = method.upper()
    target, headers = place_token(config, method, path, token)
    view = RequestView(method, target, headers, "127.0.0.1")
    try:
        decided: Decision | Rejection = await decide(view, config, verifier, now, steps)
    except Rejection as rejection:
        if not steps or steps[-1][1]:  # every check notes its own failure; this is a fallback
            steps.append(("decision", False, rejection.detail))
        decided = rejection
    return Explanation(steps, decided)
