"""The plain input of the decision: what the core needs to know about one request.

    view = RequestView("GET", "/v1/users/42?x=1", CIMultiDict({"Authorization": "Bearer ..."}))
    decision = await decide(view, state, now=time.time())

The aiohttp shell builds it from a live request, `inspect` builds it from the command line; the
core never sees aiohttp's request objects.
"""

from __future__ import annotations

from typing import NamedTuple

from multidict import CIMultiDict, CIMultiDictProxy

Headers = CIMultiDict[str] | CIMultiDictProxy[str]


class RequestView(NamedTuple):  # a tuple: made on every request, so it must be cheap
    """Method, raw request target (path and query, as received), headers, TCP peer, scheme."""

    method: str
    target: str
    headers: Headers
    peer: str = ""
    scheme: str = "http"
