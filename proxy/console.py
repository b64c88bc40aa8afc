"""The dev console (SPEC §12): `/console` on the admin listener, for a developer's own machine.

    console = Console(lambda: proxy.state, lambda: log.recent, clock, enabled)
    console.install(admin_app)   # before the admin runner starts

`GET /console` is one self-contained page (`console.html`, no external asset); behind it, JSON:
`GET /console/api/apps` (the HS* apps it can mint for), `POST /console/api/try` (`explain()`,
the code `inspect` runs, against the running keys), `POST /console/api/mint` (`mint()`), and
`GET /console/api/recent?after=N` (what `Log.access` recorded: no token, no claim value).
Everything answers 404 while `dev_console` is off. It mints tokens, so only loopback `Host`s are
served (DNS rebinding) and POSTs must be same-origin JSON (a form elsewhere cannot post one).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Callable
from importlib import resources
from typing import Any, Final

from aiohttp import web
from yarl import URL

from .app import State
from .config import App, Config
from .decision import Decision
from .errors import CONTRACT
from .explain import explain, place_token
from .jwk import is_loopback
from .mint import MintError, mint
from .telemetry import Recent

# Inline style and script are the page's own; nothing may come from anywhere else.
_POLICY: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_METHOD: Final = re.compile(r"[A-Za-z]{1,16}")


class BadInput(Exception):
    """A console request the page would never send; the message is safe to show."""


class Console:
    """The console's handlers over the running state; `enabled()` is checked per request."""

    def __init__(
        self,
        state: Callable[[], State],
        recent: Callable[[], Recent | None],
        clock: Callable[[], float],
        enabled: Callable[[], bool],
    ) -> None:
        self.state = state
        self.recent = recent
        self.clock = clock
        self.enabled = enabled
        self._page: bytes | None = None

    def install(self, app: web.Application) -> None:
        app.router.add_get("/console", self.page)
        app.router.add_get("/console/api/apps", self.apps)
        app.router.add_post("/console/api/try", self.try_token)
        app.router.add_post("/console/api/mint", self.mint)
        app.router.add_get("/console/api/recent", self.recent_decisions)

    def _guard(self, request: web.Request, post: bool = False) -> None:
        """404 while off; 403 for a non-loopback Host or a cross-origin or non-JSON POST."""
        if not self.enabled():
            raise web.HTTPNotFound()
        try:
            host = URL.build(scheme="http", authority=request.host).host or ""
        except ValueError:
            host = ""
        if not is_loopback(host):
            raise _error(403, "the console answers only on a loopback host name")
        if post:
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"{request.scheme}://{request.host}":
                raise _error(403, "cross-origin requests are refused")
            if request.content_type != "application/json":
                raise _error(415, "send application/json")

    async def page(self, request: web.Request) -> web.Response:
        self._guard(request)
        if self._page is None:
            self._page = resources.files(__package__).joinpath("console.html").read_bytes()
        return web.Response(
            body=self._page,
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": _POLICY, "Cache-Control": "no-store"},
        )

    async def apps(self, request: web.Request) -> web.Response:
        self._guard(request)
        config = self.state().config
        apps = [_describe(app) for app in config.apps if app.secrets]
        others = [app.id for app in config.apps if not app.secrets]
        return _json({"listen": _base_url(config), "apps": apps, "not_mintable": others})

    async def try_token(self, request: web.Request) -> web.Response:
        self._guard(request, post=True)
        try:
            body = await _body(request)
            token = _string(body, "token")
            method = _string(body, "method", "GET")
            path = _string(body, "path", "/")
            if not _METHOD.fullmatch(method):
                raise BadInput("method must be letters, such as GET")
        except BadInput as error:
            return _json({"error": str(error)}, 400)
        state = self.state()
        explanation = await explain(
            state.config, state.verifier, token.strip(), method, path, self.clock()
        )
        result = explanation.summary()
        decided = explanation.decided
        identity: list[dict[str, str]] = []
        if isinstance(decided, Decision):
            result["message"] = "the request would be forwarded upstream"
            verified = decided.verified
            if verified is not None:
                identity = [
                    {"name": n.decode(), "value": v.decode("utf-8", "replace")}
                    for n, v in verified.identity
                ]
                header = state.config.forward.claims_header
                if header is not None and verified.claims_header is not None:
                    identity.append({"name": header, "value": verified.claims_header})
        else:
            result["message"] = CONTRACT[decided.reason].message
        result["identity_headers"] = identity
        return _json(result)

    async def mint(self, request: web.Request) -> web.Response:
        self._guard(request, post=True)
        config = self.state().config
        try:
            body = await _body(request)
            app_id = _string(body, "app")
            claims = body.get("claims", {})
            if not isinstance(claims, dict):
                raise BadInput("claims must be a JSON object")
            ttl = body.get("ttl", 300)
            if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
                raise BadInput("ttl must be a number of seconds")
            path = _string(body, "path", "/")
            app = next((a for a in config.apps if a.id == app_id), None)
            if app is None:
                raise BadInput(f"no app {app_id!r} in the running config")
            if not app.secrets:
                raise BadInput(f"app {app_id} signs with a private key: the console mints HS* only")
            now = self.clock()
            if ttl < 0:  # already expired -ttl seconds ago, after a minute of life
                token = mint(config, app.id, claims, ttl=60, now=now + ttl - 60)
            else:
                token = mint(config, app.id, claims, ttl=ttl, now=now)
        except (BadInput, MintError) as error:
            return _json({"error": str(error)}, 400)
        except (TypeError, ValueError):  # a claim JSON cannot encode (NaN is refused by PyJWT)
            return _json({"error": "claims must be plain JSON values"}, 400)
        return _json({"token": token, "curl": curl_line(config, path, token)})

    async def recent_decisions(self, request: web.Request) -> web.Response:
        self._guard(request)
        after = request.query.get("after", "0")
        if not after.isdigit():
            return _json({"error": "after must be a number"}, 400)
        recent = self.recent()
        cursor, found = recent.since(int(after)) if recent is not None else (0, [])
        return _json({"next": cursor, "decisions": found})


def curl_line(config: Config, path: str, token: str) -> str:
    """A curl command that sends `token` to the main listener where the route looks for it."""
    target, headers = place_token(config, "GET", path, token)
    parts = ["curl", "-si"]
    for name, value in headers.items():
        if name != "Host":
            parts += ["-H", f"{name}: {value}"]
    parts.append(_base_url(config) + target)
    return " ".join(shlex.quote(part) for part in parts)


def _describe(app: App) -> dict[str, Any]:
    """What the mint form needs: the app's match claim, and the claims it requires that
    `mint` does not add (empty, for the developer to fill in)."""
    claims: dict[str, Any] = {}
    if app.match_claim is not None:
        claims[app.match_claim] = app.match_value
    for name in app.required_claims:
        if name not in ("exp", "iat", "iss", "aud") and name not in claims:
            claims[name] = ""
    return {
        "id": app.id,
        "algorithm": app.algorithms[0],
        "claims": claims,
        "max_lifetime": app.max_lifetime,
    }


def _base_url(config: Config) -> str:
    host = config.listen.host
    if not is_loopback(host):  # 0.0.0.0, ::, a LAN address: the developer's own machine
        host = "::1" if ":" in host else "127.0.0.1"
    scheme = "https" if config.tls else "http"
    return str(URL.build(scheme=scheme, host=host, port=config.listen.port))


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise BadInput("the body must be JSON") from None
    if not isinstance(body, dict):
        raise BadInput("the body must be a JSON object")
    return body


def _string(body: dict[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str) or not value:
        raise BadInput(f"{key} must be a non-empty string")
    return value


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> web.HTTPException:
    kinds: dict[int, type[web.HTTPException]] = {
        403: web.HTTPForbidden,
        415: web.HTTPUnsupportedMediaType,
    }
    return kinds[status](text=json.dumps({"error": message}), content_type="application/json")
