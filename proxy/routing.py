"""Request paths: normalisation (SPEC §4 step 1) and route patterns (step 2).

    split_target("/v1//users/./42;v=1?q=1", host="api")  -> Target("/v1/users/42;v=1",
                                                               "/v1/users/42", "q=1")
    split_target("/a/..;/admin", host="api")             -> Rejection(bad_path)
    PathPattern.compile("/v1/users/{userId}/*").match("/v1/users/42/threads")
                                                          -> {"userId": "42"}

`Target.path` is what is forwarded (`;` parameters kept), `Target.match` what routes see
(each segment without its `;` parameters, the way Tomcat reads it), so a `;` never lets a
request slip past a stricter route.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from .errors import Reason, Rejection

_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE: Final = re.compile(r"%(.{0,2})", re.DOTALL)
_HEX: Final = re.compile(r"[0-9A-Fa-f]{2}")
_FORBIDDEN_ESCAPES: Final = frozenset({"00", "2F", "5C"})
_BAD_CHARS: Final = re.compile(r"[\x00-\x1f\x7f\\]")
# Paths that are already normal: no escape, no `;`, no dot segment, no empty segment.
_SIMPLE: Final = re.compile(r"(?:/[A-Za-z0-9_~\-][A-Za-z0-9_~.\-]*)*/?")
_ABSOLUTE: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
_DEFAULT_PORTS: Final = {"http": "80", "https": "443"}


class Target:
    """A normalised request target: forwarded path, path routes match, raw query."""

    __slots__ = ("match", "path", "query")  # a plain class: see model.RequestView

    def __init__(self, path: str, match: str, query: str) -> None:
        self.path: Final = path
        self.match: Final = match
        self.query: Final = query


def split_target(target: str, host: str | None) -> Target:
    """Split and normalise a request target, or raise `Rejection(bad_path)`."""
    if not target.startswith("/"):
        target = _origin_form(target, host)
    path, _, query = target.partition("?")
    path = path.partition("#")[0]
    if _SIMPLE.fullmatch(path):
        return Target(path, path, query)
    return _normalise(path, query)


def _origin_form(target: str, host: str | None) -> str:
    """An absolute-form target whose authority equals the Host header, as origin form."""
    found = _ABSOLUTE.fullmatch(target)
    if found is None or host is None:
        raise Rejection(Reason.BAD_PATH, "the request target is not a path")
    scheme, authority, rest = found.groups()
    default = _DEFAULT_PORTS.get(scheme.lower())
    if default is None or _authority(authority, default) != _authority(host, default):
        raise Rejection(Reason.BAD_PATH, "the absolute-form target names another host")
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest


def _authority(value: str, default_port: str) -> tuple[str, str]:
    """(lower-case host, port) with the scheme's default port filled in."""
    value = value.strip()
    if value.startswith("["):
        host, _, port = value[1:].partition("]")
        port = port[1:] if port.startswith(":") else port
    else:
        host, _, port = value.partition(":")
    return host.lower(), port or default_port


def _normalise(path: str, query: str) -> Target:
    if _BAD_CHARS.search(path):
        raise Rejection(Reason.BAD_PATH, "the path holds a backslash or a control character")
    if "%" in path:
        path = _ESCAPE.sub(_canonical_escape, path)
    kept: list[str] = []
    segments = path[1:].split("/")
    last = len(segments) - 1
    trailing = False
    for index, segment in enumerate(segments):
        base = segment.partition(";")[0]
        if base in (".", ".."):
            if segment != base:
                raise Rejection(Reason.BAD_PATH, "a dot segment carries ; parameters")
            if base == "..":
                if not kept:
                    raise Rejection(Reason.BAD_PATH, "the path climbs above /")
                kept.pop()
            trailing = index == last
        elif segment:
            kept.append(segment)
            trailing = False
        else:
            trailing = index == last
    forwarded = "/" + "/".join(kept)
    bases = [base for base in (segment.partition(";")[0] for segment in kept) if base]
    match = "/" + "/".join(bases)
    if trailing and kept:
        forwarded += "/"
    if (trailing or (kept and kept[-1].startswith(";"))) and bases:
        match += "/"
    return Target(forwarded, match, query)


def _canonical_escape(found: re.Match[str]) -> str:
    digits = found.group(1)
    if not _HEX.fullmatch(digits):
        raise Rejection(Reason.BAD_PATH, "the path holds an invalid % escape")
    upper = digits.upper()
    if upper in _FORBIDDEN_ESCAPES:
        raise Rejection(Reason.BAD_PATH, "the path holds an encoded NUL, / or \\")
    char = chr(int(upper, 16))
    return char if char in _UNRESERVED else "%" + upper


_PARAM: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A compiled route pattern: `{name}` one non-empty segment, a last `*` any rest."""

    pattern: str
    params: frozenset[str]
    regex: re.Pattern[str]
    # Case-sensitive patterns without {name}: the literal part (and it plus "/" when the
    # pattern ends in *), matched with string tests that give the regex's answers at a
    # fraction of its cost: this runs for every route tried on every request.
    literal: str | None = None
    prefix: str | None = None
    # What the pattern matches, whatever its parameters are called ("/docs/{}/*"): routes
    # with the same shape are the ones a method may choose between (SPEC §4 step 2).
    shape: str = ""

    @classmethod
    def compile(cls, pattern: str, ignore_case: bool = False) -> PathPattern:
        """Compile `pattern`, or raise ValueError saying what is wrong with it."""
        if not pattern.startswith("/"):
            raise ValueError("a route pattern starts with /")
        if _BAD_CHARS.search(pattern) or any(c in pattern for c in "?#; "):
            raise ValueError("a route pattern holds no ?, #, ;, space, \\ or control character")
        segments = pattern[1:].split("/")
        parts: list[str] = []
        texts: list[str] = []  # the literal segments unescaped
        shape: list[str] = []
        params: list[str] = []
        wildcard = False
        for index, segment in enumerate(segments):
            last = index == len(segments) - 1
            if segment == "*":
                if not last:
                    raise ValueError("* is allowed as the last segment only")
                wildcard = True
                shape.append("/*")
            elif param := _PARAM.fullmatch(segment):
                if param.group(1) in params:
                    raise ValueError(f"path parameter {{{param.group(1)}}} appears twice")
                params.append(param.group(1))
                parts.append(f"/(?P<{param.group(1)}>[^/]+)")
                shape.append("/{}")
            elif any(c in segment for c in "{}*"):
                raise ValueError("{name} and * must be whole segments")
            elif segment in (".", ".."):
                raise ValueError("a route pattern has no . or .. segment")
            elif not segment and not last:
                raise ValueError("a route pattern has no empty segment (//)")
            else:
                try:
                    text = _normalise("/" + segment, "").path if segment else "/"
                except Rejection:
                    raise ValueError("a route pattern holds an invalid % escape") from None
                parts.append(re.escape(text))
                texts.append(text)
                shape.append(text.lower() if ignore_case else text)
        body = "".join(parts) + ("(?:/.*)?" if wildcard else "")
        flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
        literal = None if params or ignore_case else "".join(texts)
        prefix = literal + "/" if literal is not None and wildcard else None
        compiled = re.compile(body, flags)
        return cls(pattern, frozenset(params), compiled, literal, prefix, "".join(shape))

    def match(self, path: str) -> dict[str, str] | None:
        """The path parameters when `path` (a `Target.match`) matches, else None."""
        literal = self.literal
        if literal is not None:
            prefix = self.prefix
            return {} if path == literal or (prefix and path.startswith(prefix)) else None
        found = self.regex.fullmatch(path)
        return found.groupdict() if found is not None else None
