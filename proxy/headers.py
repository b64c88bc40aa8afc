"""Header rewriting both ways (SPEC §6): pure functions over raw header bytes.

    plan = HeaderPlan(config.forward)                       # once per config
    head = plan.request_head(method, path, query, raw_headers, forwarding)   # bytes for upstream
    head = response_head(status, reason, upstream_raw_headers, ...)  # a whole answer's bytes

Headers go upstream as they came (bytes, order, repeats), less hop-by-hop headers and what the
proxy sets itself; identity headers are always removed (with their `_` variants) and then set
from verified claims only.
"""

from __future__ import annotations

import random
import re
import time
from email.utils import formatdate
from typing import Final

from . import model
from .config import Forward, Source

HOP_BY_HOP: Final = frozenset(name.encode() for name in model.HOP_BY_HOP)
# Removed from every request: IIS- and Symfony-style servers route by them, so they would name
# a path the decision never saw (SPEC §6).
REWRITE_URL: Final = frozenset({b"x-original-url", b"x-rewrite-url"})
_random_bits: Final = random.getrandbits  # the module's generator, reseeded after a fork
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(incoming: str | None) -> str:
    """The incoming request id when it is sane, else 32 random hex characters."""
    if incoming is not None and _REQUEST_ID.fullmatch(incoming):
        return incoming
    # An identifier, not a secret: Mersenne Twister is enough and spares a getrandom(). Three
    # C calls, cheaper than "%032x" % n (bench/README.md, "Why the code looks so").
    return _random_bits(128).to_bytes(16, "big").hex()


# What the proxy does with a header, by name. Worked out once per name and remembered: the
# same names come request after request (the cost: bench/README.md, "Why the code looks so").
_KEEP: Final = 0
_DROP: Final = 1
_FORWARDED_FOR: Final = 2
_LENGTH: Final = 3
_CONNECTION: Final = 4
_DATE: Final = 5
_MEMO_SIZE: Final = 1024  # names are client input: remember this many, then work each out anew

_USUAL: Final = HOP_BY_HOP | {b"close"}  # "Connection: keep-alive" and friends filter nothing more
_NOTHING: Final[frozenset[bytes]] = frozenset()


def _listed(connection: bytes, listed: frozenset[bytes]) -> frozenset[bytes]:
    """`listed` and the header names a `Connection` header lists, beyond the usual hop-by-hop
    ones."""
    # the common "keep-alive" or "close": compared before a lower() copy is made and hashed
    if connection == b"keep-alive" or connection == b"close" or connection.lower() in _USUAL:
        return listed
    return listed | (frozenset(part.strip().lower() for part in connection.split(b",")) - _USUAL)


class Forwarding:
    """Per-request facts the upstream request head needs."""

    __slots__ = (  # a plain class: see model.RequestView
        "chunked", "claims", "client_host", "drop_token", "host", "identity", "peer",
        "request_id", "scheme",
    )  # fmt: skip

    def __init__(
        self,
        host: bytes,  # the Host sent upstream
        client_host: bytes | None,  # the client's Host, for X-Forwarded-Host
        peer: str,
        scheme: str,
        request_id: str,
        identity: tuple[tuple[bytes, bytes], ...],
        claims: str | None,  # claims_header value
        drop_token: Source | None,  # forward.token false: the token's source
        chunked: bool,  # the body is re-chunked upstream
    ) -> None:
        self.host: Final = host
        self.client_host: Final = client_host
        self.peer: Final = peer
        self.scheme: Final = scheme
        self.request_id: Final = request_id
        self.identity: Final = identity
        self.claims: Final = claims
        self.drop_token: Final = drop_token
        self.chunked: Final = chunked


class HeaderPlan:
    """Header sets computed once per config."""

    def __init__(self, forward: Forward) -> None:
        names = [name for name, _ in forward.identity_headers]
        if forward.claims_header:
            names.append(forward.claims_header)
        self.identity = frozenset(n.lower().replace("_", "-").encode() for n in names)
        self.claims_header = (forward.claims_header or "").encode()
        self.request_id_name = forward.request_id_header.encode()
        managed = frozenset(
            {*(name.encode() for name in model.PROXY_SET), self.request_id_name.lower()}
        )
        # Every incoming header the proxy drops outright (proxy-* are checked by prefix).
        self.skip = managed | HOP_BY_HOP | self.identity | REWRITE_URL
        # ...also when spelled with `_` for `-`.
        self.underscored = self.identity | REWRITE_URL | {b"x-real-ip"}
        self.kinds: dict[bytes, tuple[int, bytes]] = {}  # name -> (kind, lower-case name)

    def kind(self, name: bytes) -> tuple[int, bytes]:
        """What happens to a request header named `name` (not in `kinds` yet), and the name in
        lower case; remembered."""
        lower = name.lower()
        if lower == b"x-forwarded-for":
            kind = _FORWARDED_FOR
        elif lower == b"content-length":
            kind = _LENGTH
        elif lower == b"connection":
            kind = _CONNECTION
        elif lower in self.skip or lower.startswith(b"proxy-"):
            kind = _DROP
        elif lower.find(b"_") >= 0 and lower.replace(b"_", b"-") in self.underscored:
            kind = _DROP  # CGI-style servers would read X_Auth_User_Id as X-Auth-User-Id
        else:
            kind = _KEEP
        entry = (kind, lower)
        if len(self.kinds) < _MEMO_SIZE:
            self.kinds[name] = entry
        return entry

    def request_head(
        self,
        method: str,
        path: str,
        query: str,
        raw_headers: tuple[tuple[bytes, bytes], ...],
        facts: Forwarding,
    ) -> bytes:
        """The request line and headers sent upstream."""
        lines = [_request_line(method, path, query, facts.drop_token)]
        for name, value in self.request_headers(raw_headers, facts):
            lines.append(name + b": " + value)  # compiled, cheaper than a join per line
        lines.append(b"\r\n")  # the blank line after the last header
        return b"\r\n".join(lines)

    def request_headers(
        self, raw_headers: tuple[tuple[bytes, bytes], ...], facts: Forwarding
    ) -> list[tuple[bytes, bytes]]:
        """The headers sent upstream, in order: the client's, then the ones the proxy sets."""
        drop = facts.drop_token
        drop_header = drop.name.encode() if drop is not None and drop.kind == "header" else None
        drop_cookie = drop.name if drop is not None and drop.kind == "cookie" else None
        kinds = self.kinds
        out: list[tuple[bytes, bytes]] = []
        forwarded_for: list[bytes] = []
        content_length = b""
        listed = _NOTHING
        for header in raw_headers:
            kind, lower = kinds.get(header[0]) or self.kind(header[0])
            if kind != _KEEP:
                if kind == _FORWARDED_FOR:
                    forwarded_for.append(header[1])
                elif kind == _LENGTH:
                    content_length = header[1]
                elif kind == _CONNECTION:
                    listed = _listed(header[1], listed)
                continue
            if lower == drop_header:
                continue
            if drop_cookie is not None and lower == b"cookie":
                value = remove_cookie(header[1], drop_cookie)
                if value:
                    out.append((header[0], value))
                continue
            out.append(header)  # as it came: no new tuple
        if listed:  # names a Connection header lists are hop-by-hop too
            out = [(name, value) for name, value in out if name.lower() not in listed]
        out.append((b"Host", facts.host))
        if facts.chunked:
            out.append((b"Transfer-Encoding", b"chunked"))
        elif content_length:
            out.append((b"Content-Length", content_length))
        peer = facts.peer.encode()
        forwarded_for.append(peer)
        out.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
        out.append((b"X-Real-IP", peer))  # any incoming one was dropped: it is the client's say
        out.append((b"X-Forwarded-Proto", facts.scheme.encode()))
        if facts.client_host is not None:
            out.append((b"X-Forwarded-Host", facts.client_host))
        out.append((self.request_id_name, facts.request_id.encode()))
        out += facts.identity
        if facts.claims is not None:
            out.append((self.claims_header, facts.claims.encode()))
        return out

    def websocket_head(
        self,
        path: str,
        query: str,
        raw_headers: tuple[tuple[bytes, bytes], ...],
        facts: Forwarding,
    ) -> bytes:
        """A WebSocket handshake for the upstream: a plain request's head, without the
        framing of a body it never has (the upstream would read frames as that body), with
        the upgrade asked for again (Connection and Upgrade are hop-by-hop)."""
        lines = [_request_line("GET", path, query, facts.drop_token)]
        for name, value in self.request_headers(raw_headers, facts):
            if name.lower() not in (b"content-length", b"transfer-encoding"):
                lines.append(name + b": " + value)
        lines.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        return b"\r\n".join(lines)


def _request_line(method: str, path: str, query: str, drop: Source | None) -> bytes:
    """The request line for the upstream, less the query token under `forward.token: false`."""
    if drop is not None and drop.kind == "query":
        query = remove_query_param(query, drop.name)
    target = path + ("?" + query if query else "")
    return f"{method} {target} HTTP/1.1".encode("utf-8", "surrogateescape")


def remove_query_param(query: str, name: str) -> str:
    """The query without parameter `name`; the other parameters byte for byte."""
    return "&".join(model.query_split(query, name)[1])


def remove_cookie(line: bytes, name: str) -> bytes:
    """A `Cookie` line without cookie `name`, read as the token reader reads it (UTF-8, as the
    listener decodes header values)."""
    kept = model.cookie_split(line.decode("utf-8", "surrogateescape"), name)[1]
    return "; ".join(kept).encode("utf-8", "surrogateescape")


_response_kinds: Final[dict[bytes, int]] = {}


def _response_kind(name: bytes) -> int:
    """What happens to a response header named `name` (not in `_response_kinds` yet);
    remembered."""
    lower = name.lower()
    if lower == b"connection":
        kind = _CONNECTION
    elif lower == b"content-length":
        kind = _LENGTH
    elif lower in HOP_BY_HOP or lower.startswith(b"proxy-"):
        kind = _DROP
    elif lower == b"date":
        kind = _DATE
    else:
        kind = _KEEP
    if len(_response_kinds) < _MEMO_SIZE:
        _response_kinds[name] = kind
    return kind


def _end_to_end(
    raw: list[tuple[bytes, bytes]], whole: bool = False
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """A response's headers less hop-by-hop ones (and Content-Length for a `whole` answer,
    which gets our own); whether it has a Date."""
    kept: list[tuple[bytes, bytes]] = []
    listed = _NOTHING
    dated = False
    kinds = _response_kinds
    for header in raw:
        kind = kinds.get(header[0])
        if kind is None:
            kind = _response_kind(header[0])
        if kind == _DROP or (kind == _LENGTH and whole):
            continue
        if kind == _CONNECTION:
            listed = _listed(header[1], listed)
            continue
        if kind == _DATE:
            dated = True
        kept.append(header)
    if listed:  # names a Connection header lists are hop-by-hop too
        kept = [(name, value) for name, value in kept if name.lower() not in listed]
        dated = dated and b"date" not in listed
    return kept, dated


def response_headers(
    raw: list[tuple[bytes, bytes]], request_id_name: str, rid: str
) -> list[tuple[str, str]]:
    """The upstream's response headers for a streamed answer, as text; repeats kept."""
    headers: list[tuple[str, str]] = []
    for name, value in _end_to_end(raw)[0]:
        try:
            text = value.decode()
        except UnicodeDecodeError:
            text = value.decode("latin-1")
        headers.append((name.decode("latin-1"), text))
    headers.append((request_id_name, rid))
    return headers


# status -> (reason, status line): the upstream's reason is its text, so it is compared, and
# the cache keeps one line a status (an int key hashes for free; a fresh reason string not).
_STATUS_LINES: Final[dict[int, tuple[str, bytes]]] = {}


def _status_line(status: int, reason: str) -> bytes:
    """`HTTP/1.1 <status> <reason>`, from the cache while the upstream's reason is the same."""
    cached = _STATUS_LINES.get(status)
    if cached is not None and cached[0] == reason:
        return cached[1]
    line = b"HTTP/1.1 %d %s" % (status, reason.encode("latin-1"))
    _STATUS_LINES[status] = (reason, line)
    return line


def response_head(
    status: int,
    reason: str,
    raw: list[tuple[bytes, bytes]],
    request_id_name: str,
    rid: str,
    length: int,
    keep_alive: bool,
    old_client: bool,
) -> bytes:
    """The status line and headers of a whole response, in the upstream's bytes and order."""
    kept, dated = _end_to_end(raw, whole=True)
    lines = [_status_line(status, reason)]
    for name, value in kept:
        lines.append(name + b": " + value)  # compiled, cheaper than a join per line
    if not dated:
        lines.append(b"Date: " + http_date())  # RFC 9110 §6.6.1: a proxy adds it
    lines.append(f"Content-Length: {length}\r\n{request_id_name}: {rid}".encode())
    if not keep_alive:
        lines.append(b"Connection: close")
    elif old_client:
        lines.append(b"Connection: keep-alive")
    lines.append(b"\r\n")  # the blank line after the last header
    return b"\r\n".join(lines)


def streamed_head(
    status: int,
    reason: str,
    raw: list[tuple[bytes, bytes]],
    request_id_name: str,
    rid: str,
    keep_alive: bool,
    old_client: bool,
    head_only: bool,
) -> tuple[bytes, bool, bool]:
    """The head of an answer whose body streams: (bytes, chunked by us, ended by close).
    The upstream's Content-Length stays; without one a body goes chunked to an HTTP/1.1
    client and ends with the connection for an HTTP/1.0 one."""
    kept, dated = _end_to_end(raw)
    lines = [_status_line(status, reason)]
    length = False
    for name, value in kept:
        if not length and name.lower() == b"content-length":
            length = True
        lines.append(name + b": " + value)
    if not dated:
        lines.append(b"Date: " + http_date())
    lines.append(f"{request_id_name}: {rid}".encode())
    chunked = delimited = False
    if not (head_only or length or status in (204, 304) or status < 200):
        if old_client:
            delimited = True
            keep_alive = False
        else:
            chunked = True
            lines.append(b"Transfer-Encoding: chunked")
    if not keep_alive:
        lines.append(b"Connection: close")
    elif old_client:
        lines.append(b"Connection: keep-alive")
    lines.append(b"\r\n")
    return b"\r\n".join(lines), chunked, delimited


_date: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The current time as an HTTP date, computed once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True).encode())
    return _date[1]
