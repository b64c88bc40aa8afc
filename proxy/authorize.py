"""Authorization mode (SPEC §10): a gateway's auth subrequest in, the decision's answer out.

    view = asked_request(config.authorize, method, target, raw_headers, peer)  # or bad_path
    decision = await decide(view, config, verifier, now)                       # or Rejection
    headers = allow_headers(decision, config.forward, rid_name, rid)           # the 200's

Framework-free, so any listener can call it with the subrequest's head as received: the
request asked about becomes an ordinary `RequestView` (the method and target the gateway
names, the subrequest's own headers and cookies), the decision is proxy mode's, and a
rejection is answered exactly as in proxy mode. Only the allow answer differs: `200`, no
body, the identity headers §6 would have sent upstream, for the gateway to copy.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict

from .config import Authorize, Forward
from .decision import Decision
from .errors import Reason, Rejection
from .model import Headers, RequestView

RawHeaders = Iterable[tuple[bytes, bytes]]
_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


def asked_request(
    settings: Authorize,
    method: str,
    target: str,
    raw_headers: RawHeaders,
    peer: str = "",
    scheme: str = "http",
    has_body: bool = False,
) -> RequestView:
    """The request a subrequest asks about, or `Rejection(bad_path)` when a configured header
    is absent or repeated (the gateway is not set up as the config says)."""
    wanted = {
        name.lower().encode(): name
        for name in (settings.method_header, settings.uri_header, settings.host_header)
        if name is not None
    }
    found: dict[bytes, list[str]] = {}
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in raw_headers:
        text = value.decode("utf-8", "surrogateescape")  # as aiohttp reads header values
        lower = name.lower()
        if lower in wanted:
            found.setdefault(lower, []).append(text)
        headers.add(name.decode("latin-1"), text)
    values: dict[str, str] = {}
    for lower, header in wanted.items():
        seen = found.get(lower, [])
        if len(seen) != 1:
            what = "absent" if not seen else "repeated"
            raise Rejection(Reason.BAD_PATH, f"the gateway's {header} header is {what}")
        values[header] = seen[0]
    if settings.method_header is not None:
        method = values[settings.method_header]
        if not method or not all(byte in _TOKEN_CHARS for byte in method.encode()):
            raise Rejection(Reason.BAD_PATH, f"the gateway's {settings.method_header} is no method")
    if settings.uri_header is not None:
        target = values[settings.uri_header]
    else:
        target = _strip(target, settings.strip_prefix)
    if settings.host_header is not None:
        # An absolute-form target is checked against the host asked about, not the gateway's.
        headers.popall("Host", None)
        headers["Host"] = values[settings.host_header]
    return RequestView(method, target, headers, peer, scheme, has_body or _has_body(headers))


def _strip(target: str, prefix: str) -> str:
    """The subrequest's own target less the gateway's prefix (Envoy's `path_prefix`)."""
    if not target.startswith(prefix):
        raise Rejection(Reason.BAD_PATH, "the target does not start with authorize.strip_prefix")
    rest = target[len(prefix) :]
    if rest.startswith("/"):
        return rest
    if prefix.endswith("/") or not rest or rest.startswith("?"):
        return "/" + rest
    # "/authx/y" under the prefix "/auth" is no path below it
    raise Rejection(Reason.BAD_PATH, "the target does not start with authorize.strip_prefix")


def _has_body(headers: Headers) -> bool:
    """Whether the request asked about has a body, as far as the headers passed on tell (then
    an OPTIONS is no CORS preflight)."""
    lengths = headers.getall("Content-Length", [])
    return "Transfer-Encoding" in headers or any(value.strip("0 ") for value in lengths)


def allow_headers(
    decision: Decision, forward: Forward, rid_name: str, rid: str
) -> list[tuple[bytes, bytes]]:
    """The allow answer's headers: the request id, then the identity headers and
    `claims_header` exactly as §6 sets them upstream (none when absent)."""
    headers = [(rid_name.encode(), rid.encode())]
    verified = decision.verified
    if verified is not None:
        headers += verified.identity
        if forward.claims_header and verified.claims_header is not None:
            headers.append((forward.claims_header.encode(), verified.claims_header.encode()))
    return headers
