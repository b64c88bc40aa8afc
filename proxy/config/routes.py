"""`routes`: which requests need a token, from which apps, with which claims (SPEC §5).

routes, problems = read_routes(tree.get("routes", []), known, reader)
"""

from __future__ import annotations

from typing import Any

from ..errors import Problem
from ..routing import PathPattern
from ..yamlconf import Section, Substituted, join
from . import checks
from .reader import TOKEN_CHARS, Reader, plain
from .schema import ROUTE_KEYS, Binding, Route, default
from .token import read_sources


def read_routes(
    data: Any, ignore_case: bool, known: checks.Known, reader: Reader
) -> tuple[list[Route], list[Problem]]:
    problems: list[Problem] = []
    if data is None:
        data = []
    if not isinstance(data, list):
        problems.append(Problem("routes", "must be a list of routes"))
        return [], problems
    routes: list[Route] = []
    for index, item in enumerate(data):
        section = Section(item, f"routes[{index}]", problems, ROUTE_KEYS)
        route = _route(section, index, ignore_case, known, reader)
        if route is not None:
            routes.append(route)
    return routes, problems


def _route(
    section: Section, index: int, ignore_case: bool, known: checks.Known, reader: Reader
) -> Route | None:
    pattern = _pattern(section, ignore_case)
    methods = section.strings("methods", None)
    for m_index, method in enumerate(methods or ()):
        if not TOKEN_CHARS.fullmatch(method):
            section.problem(f"methods[{m_index}]", f"{reader.that(method)} is not an HTTP method")
    auth = section.choice("auth", ("none", "optional", "required"), default(Route, "auth"))
    allowed = section.strings("apps", None)
    section.problems += checks.known_apps(section.path, allowed or (), known, reader)
    scopes = section.strings("scopes", ())
    required = section.strings("required_claims", ())
    bind = _bind(section, pattern, reader)
    claims = _claims(section)
    sources = read_sources(section, None, reader) if section.raw("sources") is not None else None
    section.problems += checks.source_headers(section.path, sources or (), known, reader)
    upstream = section.optional_string("upstream")
    section.problems += checks.known_upstream(section.path, upstream, known, reader)
    if pattern is None or auth is None or scopes is None or required is None:
        return None
    return Route(
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


def _pattern(section: Section, ignore_case: bool) -> PathPattern | None:
    text = section.string("path")
    if text is None:
        return None
    try:
        return PathPattern.compile(text, ignore_case)
    except ValueError as error:
        # the message may quote the pattern: never a value from ${VAR} substitution
        substituted = isinstance(section.raw("path"), Substituted)
        section.problem("path", "is not a valid route pattern" if substituted else str(error))
        return None


def _claims(section: Section) -> tuple[tuple[str, tuple[Any, ...]], ...]:
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
        values = tuple(map(plain, value)) if isinstance(value, list) else (plain(value),)
        if not values:
            section.problem(join("claims", claim), "needs at least one value")
            continue
        rules.append((str(claim), values))
    return tuple(rules)


def _bind(section: Section, pattern: PathPattern | None, reader: Reader) -> tuple[Binding, ...]:
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
                key, f"must be path.NAME, query.NAME or header.NAME, not {reader.that(source)}"
            )
        elif kind == "header" and not TOKEN_CHARS.fullmatch(name):
            section.problem(key, f"{reader.that(source)} names an invalid header")
        elif kind == "path" and pattern is not None and name not in pattern.params:
            section.problem(
                key,
                f"{reader.named('names the path parameter', name)}, which "
                f"{reader.named('the pattern', pattern.pattern)} does not have",
            )
        else:
            bindings.append(Binding(str(claim), kind, name))
    return tuple(bindings)
