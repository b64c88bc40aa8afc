"""Reading a token: where a request carries it, and what shape it has (SPEC §4 steps 3-4).

    found = extract_token(view, config.token.sources)   # None, or raises multiple_tokens
    parsed = parse(found.token, config.token.max_length)  # Parsed, or raises Rejection
    parsed.header, parsed.payload, parsed.alg

Nothing here knows an app or a key: `tokens.Verifier` takes a `Parsed` from here to choose the
app and check the signature, `claims.ClaimChecks` its payload.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from . import jwk
from .config import Source
from .errors import Reason, Rejection
from .model import RequestView, cookie_split, query_split

_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-]+")
_TYPES: Final = frozenset({"jwt", "at+jwt", "application/at+jwt"})

# --- Step 3: where the token is -------------------------------------------------------------


class Found:
    """A token and where it came from (for `forward.token: false`)."""

    __slots__ = ("source", "token")  # a plain class: see model.RequestView

    def __init__(self, token: str, source: Source) -> None:
        self.token: Final = token
        self.source: Final = source


def extract_token(view: RequestView, sources: tuple[Source, ...]) -> Found | None:
    """The one token of a request, None when it has none; raises multiple_tokens/malformed."""
    found: Found | None = None
    more = False  # a second token: multiple_tokens, after every source had its say
    for source in sources:
        values: Sequence[str]
        if source.kind == "header":
            values = view.headers.getall(source.name, ())
            if source.name == "authorization":
                if len(values) > 1:
                    raise Rejection(Reason.MULTIPLE_TOKENS, "more than one Authorization header")
                # "Bearer" in any case, spaces, the token. Whatever else starts with "Bearer"
                # (a tab, a comma, a no-break space, the token itself) is a near miss, never
                # "no token": it would reach the upstream unchecked on an optional route.
                value = values[0] if values else ""
                if value[:6].lower() == "bearer":
                    if value[6:7] != " ":
                        raise Rejection(Reason.MALFORMED, "Bearer not followed by a space")
                    token = value[7:].lstrip(" ")
                    if not token:
                        raise Rejection(Reason.MALFORMED, "Bearer without a token")
                    more = more or found is not None
                    found = Found(token, source)
                continue
        elif source.kind == "query":
            values = query_values(view.target, source.name)
        else:
            values = cookie_values(view.headers, source.name)
        for value in values:
            more = more or found is not None
            found = Found(value, source)
    if more:
        raise Rejection(Reason.MULTIPLE_TOKENS, "the request carries more than one token")
    return found


def query_values(target: str, name: str) -> list[str]:
    """Every value of query parameter `name`, percent-decoded (`+` is a space)."""
    query = target.partition("?")[2]
    return query_split(query, name)[0] if query else []


def cookie_values(headers: Any, name: str) -> list[str]:
    """Every value of cookie `name` across all `Cookie` lines (aiohttp reads only the first)."""
    return [value for line in headers.getall("Cookie", ()) for value in cookie_split(line, name)[0]]


# --- Step 4: the token's structure ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Parsed:
    """A token that passed the structural checks: its JSON halves and what step 6 verifies."""

    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    alg: str


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a member name appears twice")
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def _json_object(segment: str) -> dict[str, Any]:
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, binascii.Error, RecursionError, UnicodeDecodeError):
        raise Rejection(Reason.MALFORMED, "a segment is not base64url JSON") from None
    if not isinstance(value, dict):
        raise Rejection(Reason.MALFORMED, "a header or payload is not a JSON object")
    return value


def parse(token: str, max_length: int) -> Parsed:
    """Step 4: the structural checks, in the contract's order."""
    if len(token) > max_length:
        raise Rejection(Reason.TOO_LONG, f"the token is over {max_length} characters")
    parts = token.split(".")
    if len(parts) != 3 or not all(_SEGMENT.fullmatch(p) for p in parts[:2]):
        raise Rejection(Reason.MALFORMED, "the token is not three base64url segments")
    if parts[2] and not _SEGMENT.fullmatch(parts[2]):
        raise Rejection(Reason.MALFORMED, "the signature is not base64url")
    header = _json_object(parts[0])
    payload = _json_object(parts[1])
    if "kid" in header and not isinstance(header["kid"], str):
        raise Rejection(Reason.MALFORMED, "kid is not a string")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none" or alg not in jwk.JWS_ALGORITHMS:
        raise Rejection(Reason.ALG_NOT_ALLOWED, "alg is missing, none, or not a JWS algorithm")
    if "crit" in header:
        raise Rejection(Reason.CRIT_HEADER, "the token has a crit header")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in _TYPES):
        raise Rejection(Reason.BAD_TYP, "typ is not JWT or at+jwt")
    try:
        signature = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
    except (ValueError, binascii.Error):
        raise Rejection(Reason.MALFORMED, "the signature is not base64url") from None
    signing_input = token[: len(parts[0]) + len(parts[1]) + 1].encode("ascii")
    return Parsed(header, payload, signing_input, signature, alg)
