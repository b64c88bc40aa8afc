"""The plain input of the decision: what the core needs to know about one request.

    view = RequestView("GET", "/v1/users/42?x=1", CIMultiDict({"Authorization": "Bearer ..."}))
    decision = await decide(view, config, verifier, now=time.time())  # trace=[] for inspect

The listener builds it from a parsed request head, `inspect` from the command line; the core
never sees a connection or a parser.
"""

from __future__ import annotations

from typing import Final

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
