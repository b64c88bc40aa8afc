"""Authorization mode (SPEC §10): a gateway's auth subrequest in, the decision's answer out.

    subrequest = RequestView(method, target, headers, peer)      # as the gateway sent it
    view = asked_request(config.authorize, subrequest)            # or Rejection(bad_path)
    decision = await decide(view, config, verifier, now)          # or Rejection
    headers = allow_headers(decision, config.forward, rid_name, rid)   # the 200's

Framework-free, so any listener can call it with the subrequest's head as received: the
request asked about becomes an ordinary `RequestView` (the method and target the gateway
names, the subrequest's own headers and cookies), the decision is proxy mode's, and a
rejection is answered exactly as in proxy mode. Only the allow answer differs: `200`, no
body, the identity headers §6 would have sent upstream, for the gateway to copy.
"""

from __future__ import annotations

from multidict import CIMultiDict

from .config import Authorize, Forward
from .decision import Decision
from .errors import Reason, Rejection
from .model import Headers, RequestView

_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


def asked_request(settings: Authorize, subrequest: RequestView) -> RequestView:
    """The request a subrequest asks about, or `Rejection(bad_path)` when a configured header
    is absent or repeated (the gateway is not set up as the config says)."""
    values: dict[str, str] = {}
    for header in (settings.method_header, settings.uri_header, settings.host_header):
        if header is not None:
            seen = subrequest.headers.getall(header, [])
            if len(seen) != 1:
                what = "absent" if not seen else "repeated"
                raise Rejection(Reason.BAD_PATH, f"the gateway's {header} header is {what}")
            values[header] = seen[0]
    method = subrequest.method
    if settings.method_header is not None:
        method = values[settings.method_header]
        if not method or not all(byte in _TOKEN_CHARS for byte in method.encode()):
            raise Rejection(Reason.BAD_PATH, f"the gateway's {settings.method_header} is no method")
    if settings.uri_header is not None:
        target = values[settings.uri_header]
    else:
        target = _strip(subrequest.target, settings.strip_prefix)
    headers = subrequest.headers
    if settings.host_header is not None:
        # An absolute-form target is checked against the host asked about, not the gateway's.
        headers = CIMultiDict(headers)
        headers.popall("Host", None)
        headers["Host"] = values[settings.host_header]
    has_body = subrequest.has_body or _has_body(headers)
    return RequestView(method, target, headers, subrequest.peer, subrequest.scheme, has_body)


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
