"""Header rewriting both ways (SPEC §6): pure functions over raw header bytes.

    plan = HeaderPlan(config.forward)                       # once per config
    head = plan.request_head(method, path, query, raw_headers, forwarding)   # bytes for upstream
    headers = response_headers(upstream_raw_headers)        # for the client

Headers go upstream as they came (bytes, order, repeats), less hop-by-hop headers and what the
proxy sets itself; identity headers are always removed (with their `_` variants) and then set
from verified claims only.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote_plus

from multidict import CIMultiDict

from .config import Forward, Source

RawHeaders = Iterable[tuple[bytes, bytes]]
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(incoming: str | None) -> str:
    """The incoming request id when it is sane, else 32 random hex characters."""
    if incoming is not None and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return secrets.token_hex(16)


def _hop_by_hop(name: bytes, listed: frozenset[bytes]) -> bool:
    return name in HOP_BY_HOP or name.startswith(b"proxy-") or name in listed


def _connection_listed(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names a `Connection` header lists (they are hop-by-hop too)."""
    listed: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed.update(part.strip().lower() for part in value.split(b","))
    return frozenset(listed)


@dataclass(frozen=True, slots=True)
class Forwarding:
    """Per-request facts the upstream request head needs."""

    host: bytes  # the Host sent upstream
    client_host: bytes | None  # the client's Host, for X-Forwarded-Host
    peer: str
    scheme: str
    request_id: str
    identity: tuple[tuple[str, str], ...]
    claims: str | None  # claims_header value
    drop_token: Source | None  # forward.token false: the token's source
    chunked: bool  # the body is re-chunked upstream


class HeaderPlan:
    """Header sets computed once per config."""

    def __init__(self, forward: Forward) -> None:
        names = [name for name, _ in forward.identity_headers]
        if forward.claims_header:
            names.append(forward.claims_header)
        self.identity = frozenset(n.lower().replace("_", "-").encode() for n in names)
        self.claims_header = (forward.claims_header or "").encode()
        self.request_id_name = forward.request_id_header.encode()
        self.managed = frozenset(
            {
                b"host",
                b"expect",
                b"content-length",
                b"x-forwarded-for",
                b"x-forwarded-proto",
                b"x-forwarded-host",
                forward.request_id_header.lower().encode(),
            }
        )

    def request_head(
        self,
        method: str,
        path: str,
        query: str,
        raw_headers: tuple[tuple[bytes, bytes], ...],
        facts: Forwarding,
    ) -> bytes:
        """The request line and headers sent upstream."""
        drop = facts.drop_token
        if drop is not None and drop.kind == "query":
            query = remove_query_param(query, drop.name)
        target = path + ("?" + query if query else "")
        lines = [f"{method} {target} HTTP/1.1\r\n".encode("utf-8", "surrogateescape")]
        for name, value in self.request_headers(raw_headers, facts):
            lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def request_headers(
        self, raw_headers: tuple[tuple[bytes, bytes], ...], facts: Forwarding
    ) -> list[tuple[bytes, bytes]]:
        """The headers sent upstream, in order: the client's, then the ones the proxy sets."""
        listed = _connection_listed(raw_headers)
        drop = facts.drop_token
        drop_header = drop.name.encode() if drop is not None and drop.kind == "header" else None
        drop_cookie = drop.name if drop is not None and drop.kind == "cookie" else None
        out: list[tuple[bytes, bytes]] = []
        forwarded_for: list[bytes] = []
        content_length = b""
        for name, value in raw_headers:
            lower = name.lower()
            if lower in self.managed or _hop_by_hop(lower, listed):
                if lower == b"x-forwarded-for":
                    forwarded_for.append(value)
                elif lower == b"content-length":
                    content_length = value
                continue
            if lower in self.identity or (
                b"_" in lower and lower.replace(b"_", b"-") in self.identity
            ):
                continue
            if lower == drop_header:
                continue
            if drop_cookie is not None and lower == b"cookie":
                value = remove_cookie(value, drop_cookie)
                if not value:
                    continue
            out.append((name, value))
        out.append((b"Host", facts.host))
        if facts.chunked:
            out.append((b"Transfer-Encoding", b"chunked"))
        elif content_length:
            out.append((b"Content-Length", content_length))
        forwarded_for.append(facts.peer.encode())
        out.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
        out.append((b"X-Forwarded-Proto", facts.scheme.encode()))
        if facts.client_host is not None:
            out.append((b"X-Forwarded-Host", facts.client_host))
        out.append((self.request_id_name, facts.request_id.encode()))
        out.extend((header.encode(), text.encode()) for header, text in facts.identity)
        if facts.claims is not None:
            out.append((self.claims_header, facts.claims.encode()))
        return out


def remove_query_param(query: str, name: str) -> str:
    """The query without parameter `name`; the other parameters byte for byte."""
    kept = [p for p in query.split("&") if unquote_plus(p.partition("=")[0]) != name]
    return "&".join(kept)


def remove_cookie(line: bytes, name: str) -> bytes:
    """A `Cookie` line without cookie `name`."""
    wanted = name.encode("latin-1", "replace")
    kept = [p.strip() for p in line.split(b";") if p.strip().partition(b"=")[0].strip() != wanted]
    return b"; ".join(p for p in kept if p)


def response_headers(
    raw: list[tuple[bytes, bytes]], request_id_name: str, rid: str
) -> CIMultiDict[str]:
    """The upstream's response headers for the client: all but hop-by-hop, repeats kept."""
    listed = _connection_listed(raw)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in raw:
        lower = name.lower()
        if _hop_by_hop(lower, listed):
            continue
        headers.add(_text(name), _text(value))
    headers[request_id_name] = rid
    return headers


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")
