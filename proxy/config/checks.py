"""The rules between sections and between items: names that must exist, apps that must not
overlap, settings that only make sense together. Each returns the problems it finds.

    known = Known.of(apps, upstreams, service, forward)
    problems += known_apps("routes[0]", ("ghost-app",), known, reader)  # unknown app "ghost-app"
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import Problem
from ..jwk import is_loopback
from ..yamlconf import join
from .reader import Reader
from .schema import TOKEN_SERVICE_APP, App, Forward, Listen, Route, Source, TokenService, Upstream


@dataclass(frozen=True, slots=True)
class Known:
    """What a route may name: apps, upstreams; and the headers the proxy sets upstream."""

    apps: frozenset[str]
    upstreams: frozenset[str]
    set_headers: frozenset[str]  # identity and claims headers, lower case, "_" as "-"

    @staticmethod
    def of(
        apps: Iterable[App],
        upstreams: Mapping[str, Upstream],
        service: TokenService | None,
        forward: Forward | None,
    ) -> Known:
        ids = {app.id for app in apps} | ({TOKEN_SERVICE_APP} if service else set())
        headers: set[str] = set()
        if forward is not None:
            headers = {name.lower().replace("_", "-") for name, _ in forward.identity_headers}
            if forward.claims_header:
                headers.add(forward.claims_header.lower().replace("_", "-"))
        return Known(frozenset(ids), frozenset(upstreams), frozenset(headers))


def known_apps(where: str, ids: Iterable[str], known: Known, reader: Reader) -> list[Problem]:
    """A route's `apps`: each one configured (or the token service's)."""
    return [
        Problem(join(where, f"apps[{index}]"), reader.named("unknown app", app_id))
        for index, app_id in enumerate(ids)
        if app_id not in known.apps
    ]


def source_headers(
    where: str, sources: Iterable[Source], known: Known, reader: Reader
) -> list[Problem]:
    """A route's token sources: never a header the proxy itself sets upstream."""
    return [
        Problem(
            join(where, f"sources[{index}]"),
            f"{reader.that(source.label)} names a header the proxy sets (identity_headers)",
        )
        for index, source in enumerate(sources)
        if source.kind == "header" and source.name.replace("_", "-") in known.set_headers
    ]


def known_upstream(where: str, name: str | None, known: Known, reader: Reader) -> list[Problem]:
    if name is None or name in known.upstreams:
        return []
    return [Problem(join(where, "upstream"), reader.named("unknown upstream", name))]


@dataclass(slots=True)
class AppsSeen:
    """The apps read so far, for the rules between apps."""

    ids: set[str] = field(default_factory=set)
    matches: dict[tuple[str, str], str] = field(default_factory=dict)  # -> path of the first
    catch_all: str | None = None  # path of the app without `match`


def app_conflicts(
    app: App,
    path: str,
    apps: list[App],
    seen: AppsSeen,
    service: TokenService | None,
    reader: Reader,
) -> tuple[list[Problem], bool]:
    """An app against those before it: a repeated id (True: the app is dropped), a reserved
    id, a second catch-all, the same match, the token service's own issuer."""
    if app.id in seen.ids:
        first = next(i for i, a in enumerate(apps) if a.id == app.id)
        why = f"{reader.that(app.id)} is used by another app (apps[{first}])"
        return [Problem(f"{path}.id", why)], True
    problems: list[Problem] = []
    if service and app.id == TOKEN_SERVICE_APP:
        why = f'"{TOKEN_SERVICE_APP}" is reserved for the token service'
        problems.append(Problem(f"{path}.id", why))
    seen.ids.add(app.id)
    if app.match_claim is None:
        if seen.catch_all is not None:
            why = f"is a second app without match ({seen.catch_all} has none)"
            problems.append(Problem(path, why))
        seen.catch_all = seen.catch_all or path
        return problems, False
    pair = (app.match_claim, app.match_value or "")
    if pair in seen.matches:
        value = reader.show(pair[1])
        what = f"{pair[0]} = {value}" if value else pair[0]
        why = f"{seen.matches[pair]} matches the same claim and value ({what})"
        problems.append(Problem(f"{path}.match", why))
    seen.matches.setdefault(pair, path)
    if service and pair == ("iss", service.issuer):
        problems.append(Problem(f"{path}.match", "matches the token service's own issuer"))
    return problems, False


def authorize_upstreams(mode: str, routes: Any) -> list[Problem]:
    """In mode authorize nothing is forwarded, so no route names an upstream."""
    if mode != "authorize":
        return []
    return [
        Problem(
            f"routes[{index}].upstream", "cannot be used in mode authorize (nothing is forwarded)"
        )
        for index, route in enumerate(routes if isinstance(routes, list) else ())
        if isinstance(route, dict) and route.get("upstream") is not None
    ]


def apps_needed(
    apps: Collection[App], routes: Collection[Route], service: TokenService | None, given: Any
) -> list[Problem]:
    """Some route needs a token (or there are no routes): then some app must take one."""
    needs_token = not routes or any(route.auth != "none" for route in routes)
    if needs_token and not apps and service is None and not given:
        return [Problem("apps", "needs at least one app (some routes need a token)")]
    return []


def grant_apps(apps: Iterable[App], service: TokenService | None, reader: Reader) -> list[Problem]:
    """The token service's grants name configured apps (token exchange: also its own)."""
    if service is None:
        return []
    known = {app.id for app in apps}
    problems: list[Problem] = []
    for key, ids, extra in (
        ("jwt_bearer.apps", service.jwt_bearer_apps, set()),
        ("token_exchange.apps", service.token_exchange_apps, {TOKEN_SERVICE_APP}),
    ):
        for index, app_id in enumerate(ids):
            if app_id not in known | extra:
                where = f"token_service.{key}[{index}]"
                problems.append(Problem(where, reader.named("unknown app", app_id)))
    return problems


def dev_console(enabled: bool, admin: Listen | None) -> list[Problem]:
    """`dev_console`: only with a loopback `admin_listen`, since the console mints tokens for
    every HS* app (and null would serve it nowhere)."""
    if not enabled or (admin is not None and is_loopback(admin.host)):
        return []
    # (the admin_listen value is not echoed: it may have come from ${VAR} substitution)
    return [
        Problem(
            "dev_console",
            "needs a loopback admin_listen (127.0.0.1, ::1 or localhost): the console mints tokens",
        )
    ]
