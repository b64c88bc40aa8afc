"""What a token's claims say (SPEC §4 step 7), and the JSON value rules the checks share.

    checks = ClaimChecks(config, keys)                      # once per loaded configuration
    verified = checks.check(claims, app, now, key, trace)  # Verified, or raises Rejection
    json_equal(a, b), claim_at(claims, "act.sub"), audiences(claims)

Our own checks, in the contract's order, on a payload whose signature step 6 verified: PyJWT's
claim checks disagree with the contract (see ARCHITECTURE.md). `Trace` and `note()` record the
steps `inspect` shows, here and in `tokens` and `decision`.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from .config import App, Config
from .errors import Reason, Rejection
from .keys import AppKeys

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
# json.loads turns an unpaired \ud800-\udfff escape into a lone surrogate: not Unicode text,
# and no UTF-8 encoder (identity headers, claims_header) takes it.
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")

Trace = list[tuple[str, bool, str]] | None


def note(trace: Trace, step: str, ok: bool, detail: str) -> None:
    """Record one step for `inspect`; free when not tracing."""
    if trace is not None:
        trace.append((step, ok, detail))


@dataclass(frozen=True, slots=True)
class Verified:
    """A token whose signature and claims passed; what forwarding and step 8 need."""

    app: App
    claims: dict[str, Any] = field(repr=False)
    exp: float | None
    scopes: frozenset[str]
    identity: tuple[tuple[bytes, bytes], ...] = field(repr=False)  # identity headers to set
    claims_header: str | None = field(repr=False)  # base64url JSON of all claims, when asked
    key: str  # which key verified (a kid and source, or a secret index) for `inspect`


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TIME_LIMIT: Final = 2**63


def _is_time(value: Any) -> bool:
    """A finite number within ±2^63: what exp, nbf and iat must be (1e999 and 10**400 are
    not: one would never expire, the other overflows float arithmetic)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -_TIME_LIMIT <= value < _TIME_LIMIT
    return isinstance(value, float) and math.isfinite(value)


def seconds(value: float) -> str:
    """A duration for a message in plain seconds: "204721000s", "1.5s" (never "2.04721e+08s")."""
    if abs(value) >= 1e15:  # a time claim may be up to 2^63: plain digits would be unreadable
        return ("-" if value < 0 else "") + "more than 10^15 s"
    if abs(value) >= 100:
        return f"{value:.0f}s"
    return f"{value:.3f}".rstrip("0").rstrip(".") + "s"


def strings_in(value: Any) -> Iterator[str]:
    """Every string in a JSON value, member names included, at any depth (no recursion: a
    payload json.loads accepted may nest deeper than Python's stack)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: `true` is not `1`, `1` is `1.0`."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


ABSENT: Any = object()


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """The claim at a dotted path (`act.sub`), or ABSENT."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return ABSENT
        value = value[part]
    return value


def header_text(value: Any) -> str:
    """A claim as an identity header value: strings as is, everything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def audiences(claims: dict[str, Any]) -> list[str]:
    """A token's `aud` as a list: one string, a list of them, or none (RFC 7519 §4.1.3)."""
    aud = claims.get("aud")
    return [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []


def _audience_ok(aud: Any) -> bool:
    return isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return frozenset(found)


def _b64_json(claims: dict[str, Any]) -> str:
    text = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(text).rstrip(b"=").decode()


class ClaimChecks:
    """Step 7 for one loaded configuration: what the claims must hold, and what to forward."""

    def __init__(self, config: Config, keys: dict[str, AppKeys]) -> None:
        self.keys = keys
        self.leeway = config.token.leeway
        self.identity_claims = tuple(
            (header, claim) for header, claim in config.forward.identity_headers
        )
        self.claims_header = config.forward.claims_header

    def check(
        self, claims: dict[str, Any], app: App, now: float, key: str, trace: Trace
    ) -> Verified:
        """Step 7: the claim checks in the contract's order (each step raises its Reason)."""
        _check_types(claims, app, trace)
        self._check_times(claims, app, now, trace)
        self._check_values(claims, app, trace)
        identity = self._identity(claims, app, trace)
        note(trace, "claims", True, "iss, aud, required claims and claim values fine")
        exp = claims.get("exp")
        return Verified(
            app=app,
            claims=claims,
            exp=float(exp) if exp is not None else None,
            scopes=_scopes(claims),
            identity=identity,
            claims_header=_b64_json(claims) if self.claims_header else None,
            key=key,
        )

    def _check_times(self, claims: dict[str, Any], app: App, now: float, trace: Trace) -> None:
        """exp, then nbf and iat, against now and the leeway; then the app's max_lifetime."""
        leeway = self.leeway
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        if exp is not None and exp + leeway <= now:
            detail = f"exp is {seconds(now - exp)} in the past (leeway {seconds(leeway)})"
            raise _fail(trace, app, Reason.EXPIRED, detail, "times")
        for name, when in (("nbf", nbf), ("iat", iat)):
            if when is not None and when > now + leeway:
                detail = f"{name} is {seconds(when - now)} in the future (leeway {seconds(leeway)})"
                raise _fail(trace, app, Reason.NOT_YET_VALID, detail, "times")
        if app.max_lifetime is not None and exp is not None:
            lifetime = exp - (iat if iat is not None else now)
            if lifetime > app.max_lifetime:
                detail = f"lives {seconds(lifetime)}, over max_lifetime {seconds(app.max_lifetime)}"
                raise _fail(trace, app, Reason.LIFETIME_TOO_LONG, detail, "times")
        if trace is not None:
            left = f"; expires in {seconds(exp - now)}" if exp is not None else ""
            trace.append(("times", True, f"exp, nbf, iat and lifetime fine{left}"))

    def _check_values(self, claims: dict[str, Any], app: App, trace: Trace) -> None:
        """iss, aud, the app's required claims, then its claim values."""
        # A discovery app without `issuer` takes its document's, read at check time.
        keys = self.keys.get(app.id)
        issuers = keys.issuers() if keys is not None else app.issuer
        if issuers is not None and claims.get("iss") not in issuers:
            raise _fail(trace, app, Reason.ISSUER, "iss is not an allowed issuer")
        if app.audience is not None and not set(audiences(claims)) & set(app.audience):
            raise _fail(trace, app, Reason.AUDIENCE, "aud names none of the allowed audiences")
        for name in app.required_claims:
            if name not in claims:
                raise _fail(trace, app, Reason.MISSING_CLAIM, f"required claim {name} is absent")
        for name, value in app.claims:
            if name not in claims or not json_equal(claims[name], value):
                detail = f"claim {name} differs from the config"
                raise _fail(trace, app, Reason.CLAIM_MISMATCH, detail)

    def _identity(
        self, claims: dict[str, Any], app: App, trace: Trace
    ) -> tuple[tuple[bytes, bytes], ...]:
        """The identity headers to set; malformed when a value holds a control character."""
        identity = []
        for header, path in self.identity_claims:
            value = app.id if path == "@app" else claim_at(claims, path)
            if value is ABSENT:
                continue
            if isinstance(value, str):
                if _CONTROL.search(value):
                    detail = f"claim {path} holds a control character"
                    raise _fail(trace, app, Reason.MALFORMED, detail)
            elif isinstance(value, list | dict) and any(
                _CONTROL.search(text) for text in strings_in(value)
            ):  # JSON text escapes most of them, not U+007F; the contract refuses them all
                raise _fail(trace, app, Reason.MALFORMED, f"claim {path} holds a control character")
            identity.append((header.encode(), header_text(value).encode()))
        return tuple(identity)


def _check_types(claims: dict[str, Any], app: App, trace: Trace) -> None:
    """What the later checks compare must have the right type: exp, nbf and iat are times,
    every string is Unicode, iss a string, aud a string or a list of them."""
    for name in ("exp", "nbf", "iat"):
        if name in claims and not _is_time(claims[name]):
            detail = f"{name} is not a finite number within ±2^63"
            raise _fail(trace, app, Reason.MALFORMED, detail, "times")
    if any(_SURROGATE.search(text) for text in strings_in(claims)):
        detail = "a string claim is not valid Unicode (a lone surrogate)"
        raise _fail(trace, app, Reason.MALFORMED, detail)
    if "iss" in claims and not isinstance(claims["iss"], str):
        raise _fail(trace, app, Reason.MALFORMED, "iss is not a string")
    if "aud" in claims and not _audience_ok(claims["aud"]):
        raise _fail(trace, app, Reason.MALFORMED, "aud is not a string or a list of strings")


def _fail(trace: Trace, app: App, reason: Reason, detail: str, step: str = "claims") -> Rejection:
    """A step-7 rejection, noted for `inspect` under `step`."""
    note(trace, step, False, detail)
    return Rejection(reason, detail, app=app.id)
