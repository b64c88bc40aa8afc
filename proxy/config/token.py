"""`token` (where tokens are found, leeway, caches, JWKS timings) and a list of `sources`.

token, problems = read_token(tree.get("token"), reader)
sources = read_sources(section, default, reader)   # records problems in the section
"""

from __future__ import annotations

from typing import Any

from ..errors import Problem
from ..yamlconf import Section
from .reader import TOKEN_CHARS, Reader, timeout
from .schema import Source, TokenSettings, default, names


def read_token(data: Any, reader: Reader) -> tuple[TokenSettings | None, list[Problem]]:
    problems: list[Problem] = []
    section = Section(data, "token", problems, names(TokenSettings))
    sources = read_sources(section, labels(default(TokenSettings, "sources")), reader)

    def number(key: str, minimum: float = 0) -> float | None:
        return section.number(key, default(TokenSettings, key), minimum=minimum)

    def integer(key: str, minimum: int = 0) -> int | None:
        return section.integer(key, default(TokenSettings, key), minimum=minimum)

    values = (
        number("leeway"),
        integer("max_length", minimum=16),
        integer("cache_size"),
        number("cache_ttl"),
        number("jwks_cache_ttl", minimum=1),
        number("jwks_min_refresh"),
        number("jwks_max_stale"),
        section.field("jwks_timeout", timeout, "a number", default(TokenSettings, "jwks_timeout")),
    )
    if None in values or not sources:
        return None, problems
    leeway, max_length, size, ttl, cache_ttl, min_refresh, max_stale, jwks_timeout = values
    settings = TokenSettings(
        tuple(sources),
        float(leeway or 0),
        int(max_length or 0),
        int(size or 0),
        float(ttl or 0),
        float(cache_ttl or 0),
        float(min_refresh or 0),
        float(max_stale or 0),
        float(jwks_timeout or 0),
    )
    return settings, problems


def labels(sources: tuple[Source, ...]) -> tuple[str, ...]:
    """Sources as they are written in YAML: "header:Authorization"."""
    return tuple(source.label for source in sources)


def read_sources(section: Section, fallback: Any, reader: Reader) -> list[Source]:
    """`sources` of token (or of a route): header:NAME, query:NAME, cookie:NAME."""
    raw = section.strings("sources", fallback)
    sources: list[Source] = []
    for index, entry in enumerate(raw or ()):
        kind, _, name = entry.partition(":")
        where = f"sources[{index}]"
        if kind not in ("header", "query", "cookie"):
            section.problem(
                where, f"{reader.that(entry)}: the kind must be header:, query: or cookie:"
            )
        elif not name or (kind == "header" and not TOKEN_CHARS.fullmatch(name)):
            section.problem(where, f"{reader.that(entry)} needs a valid name after {kind}:")
        else:
            source = Source(kind, name.lower() if kind == "header" else name, entry)
            if source in sources:
                section.problem(where, f"{reader.that(entry)} is listed twice")
            sources.append(source)
    if raw is not None and not raw:
        section.problem("sources", "needs at least one source")
    return sources
