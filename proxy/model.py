"""The plain input of the decision: what the core needs to know about one request.

    view = RequestView("GET", "/v1/users/42?x=1", CIMultiDict({"Authorization": "Bearer ..."}))
    decision = await decide(view, config, verifier, now=time.time())  # trace=[] for inspect
    values, others = query_split("a=1&access_token=...", "access_token")  # or cookie_split

The listener builds it from a parsed request head, `inspect` from the command line; the core
never sees a connection or a parser.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote_plus

from multidict import CIMultiDict, CIMultiDictProxy

Headers = CIMultiDict[str] | CIMultiDictProxy[str]

# The headers the proxy manages, in lower case: `headers.HeaderPlan` drops them from what goes
# upstream, and the config refuses them as identity header names.
HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)
# Set (or answered) by the proxy itself on every forwarded request, beside the request-id header.
PROXY_SET: Final = frozenset(
    {
        "host",
        "expect",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    }
)
# ...and the request's own content and credentials: never a claim's header.
MANAGED_HEADERS: Final = HOP_BY_HOP | PROXY_SET | {"content-type", "cookie", "authorization"}


class RequestView:
    """Method, raw request target (path and query, as received), headers, TCP peer, scheme,
    and whether a body comes (Content-Length > 0 or chunked: then OPTIONS is no preflight)."""

    # The request path's records are plain classes, not named tuples or dataclasses: compiled
    # (mypyc), those are much slower to make (bench/README.md, "Why the code looks so").
    __slots__ = ("has_body", "headers", "method", "peer", "scheme", "target")

    def __init__(
        self,
        method: str,
        target: str,
        headers: Headers,
        peer: str = "",
        scheme: str = "http",
        has_body: bool = False,
    ) -> None:
        self.method: Final = method
        self.target: Final = target
        self.headers: Final = headers
        self.peer: Final = peer
        self.scheme: Final = scheme
        self.has_body: Final = has_body


# Where a token is read (query_values, cookie_values) and where `forward.token: false` removes
# it (headers.py) must agree on which pairs hold it, so both are to split here. Written twice
# they drifted (`query:a+b` read as sent, removal matched only the decoded name: forwarded).
_OWS: Final = " \t\n\r\x0b\x0c"  # what bytes.strip() strips: the other cookies as they came


def query_split(query: str, name: str) -> tuple[list[str], list[str]]:
    """Query parameter `name`: its values, percent-decoded (`+` is a space), and the other
    pairs as they came. The name matches as sent or percent-decoded."""
    values: list[str] = []
    kept: list[str] = []
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key == name or unquote_plus(key) == name:
            values.append(unquote_plus(value))
        else:
            kept.append(pair)
    return values, kept


def cookie_split(line: str, name: str) -> tuple[list[str], list[str]]:
    """Cookie `name` in one `Cookie` line: its values (surrounding quotes off), and the other
    cookies, trimmed. A bare `name` without `=` has no value, and is not kept either."""
    values: list[str] = []
    kept: list[str] = []
    for part in line.split(";"):
        key, sep, value = part.partition("=")
        if key.strip() != name:
            if part := part.strip(_OWS):
                kept.append(part)
        elif sep:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            values.append(value)
    return values, kept
