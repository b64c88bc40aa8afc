"""Tokens: finding one in a request, and verifying it (SPEC §4 steps 3-7 and the cache).

    found = extract_token(view, config.token.sources)     # None, or raises multiple_tokens
    verified = await verifier.verify(found.token, now)    # Verified, or raises Rejection
    verified.app.id, verified.claims, verified.identity

Verification runs in the contract's order: structure, app, key and signature (PyJWT's
algorithm objects, given ready key objects and the app's allowlist), then our own ordered claim
checks — PyJWT's claim checks disagree with the contract (see ARCHITECTURE.md). A verified token
is cached, keyed by the token itself, never past its `exp`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote_plus

from cachetools import Cache

from . import jwk
from .config import TOKEN_SERVICE_APP, App, Config, Source
from .errors import Reason, Rejection
from .keys import MAX_KIDLESS, AppKeys
from .metrics import Metrics
from .model import RequestView

_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-]+")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
# json.loads turns an unpaired \ud800-\udfff escape into a lone surrogate: not Unicode text,
# and no UTF-8 encoder (identity headers, claims_header) takes it.
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")
_TYPES: Final = frozenset({"jwt", "at+jwt", "application/at+jwt"})

Trace = list[tuple[str, bool, str]] | None


def note(trace: Trace, step: str, ok: bool, detail: str) -> None:
    """Record one step for `inspect`; free when not tracing."""
    if trace is not None:
        trace.append((step, ok, detail))


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
    if not query:
        return []
    values = []
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key == name or unquote_plus(key) == name:
            values.append(unquote_plus(value))
    return values


def cookie_values(headers: Any, name: str) -> list[str]:
    """Every value of cookie `name` across all `Cookie` lines (aiohttp reads only the first)."""
    values = []
    for line in headers.getall("Cookie", ()):
        for pair in line.split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key.strip() == name:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                values.append(value)
    return values


# --- Steps 4-7: what the token says, and whether to believe it --------------------------------


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


@dataclass(frozen=True, slots=True)
class _Parsed:
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


def parse(token: str, max_length: int) -> _Parsed:
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
    return _Parsed(header, payload, signing_input, signature, alg)


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


class Refetch:
    """A verification waiting for a JWKS refetch (an unknown kid): `await refetch.verify()`."""

    __slots__ = ("app", "now", "parsed", "token", "trace", "verifier")

    def __init__(
        self, verifier: Verifier, token: str, parsed: _Parsed, app: App, now: float, trace: Trace
    ) -> None:
        self.verifier = verifier
        self.token = token
        self.parsed = parsed
        self.app = app
        self.now = now
        self.trace = trace

    async def verify(self) -> Verified:
        """Refetch (rate-limited, shared with other waiters), then steps 6-7 on what is known."""
        verifier, app, now = self.verifier, self.app, self.now
        jwks = verifier.keys[app.id].jwks
        if jwks is not None:
            await jwks.refetch_for_kid(now)
        key = verifier.check_signature(self.parsed, app, now, self.trace)
        assert key is not None  # noqa: S101 - may_refetch is off: a key or a Rejection
        return verifier.remember(self.token, self.parsed, app, now, key, self.trace)


class Verifier:
    """Verifies tokens for one loaded configuration; owns the verified-token cache."""

    def __init__(
        self,
        config: Config,
        keys: dict[str, AppKeys],
        *,
        metrics: Metrics | None = None,
        service_app: App | None = None,
    ) -> None:
        self.config = config
        self.settings = config.token
        self.keys = keys
        self.metrics = metrics
        self.service_app = service_app
        self.issuer = config.token_service.issuer if config.token_service else None
        self.identity_claims = tuple(
            (header, claim) for header, claim in config.forward.identity_headers
        )
        size = config.token.cache_size if config.token.cache_ttl > 0 else 0
        # token -> (Verified, deadline), the deadline checked here. Full, it evicts the oldest
        # entry, not the least recently used: every entry goes cache_ttl after insertion anyway,
        # so an evicted hot token costs one early re-verification. A hit is one Python call
        # where LRUCache.get() makes four (bench/README.md, "Why the code looks so").
        self.cache: Cache[str, tuple[Verified, float]] | None = (
            Cache(maxsize=size) if size else None
        )

    def clear_cache(self) -> None:
        if self.cache is not None:
            self.cache.clear()

    def cached(self, token: str, now: float, trace: Trace = None) -> Verified | None:
        """Steps 4-7 for a token verified before (None: not in the cache)."""
        cache = self.cache
        if cache is None:
            return None
        try:  # not cache.get(): two more Python calls, and hits are the common case
            entry: tuple[Verified, float] | None = cache[token]
        except KeyError:
            entry = None
        if entry is not None and entry[1] <= now:
            del cache[token]  # an entry lives cache_ttl at most, and never past exp
            entry = None
        if self.metrics:
            self.metrics.cache(entry is not None)
        if entry is None:
            return None
        # No separate exp test: the deadline is at most exp, so a live entry's exp is ahead.
        if trace is not None:
            trace.append(("cache", True, "verified before: steps 4-7 from the cache"))
        return entry[0]

    async def verify(self, token: str, now: float, trace: Trace = None) -> Verified:
        """Steps 4-7, from the cache when the token was verified before."""
        hit = self.cached(token, now, trace)
        return hit if hit is not None else await self.verify_fresh(token, now, trace)

    async def verify_fresh(self, token: str, now: float, trace: Trace = None) -> Verified:
        """Steps 4-7 in full, then into the cache."""
        result = self.verify_now(token, now, trace)
        return await result.verify() if isinstance(result, Refetch) else result

    def verify_now(self, token: str, now: float, trace: Trace = None) -> Verified | Refetch:
        """Steps 4-7 without waiting, then into the cache; a `Refetch` to await when the
        token names a kid the JWKS lacks (a refetch may bring it)."""
        try:
            parsed = parse(token, self.settings.max_length)
        except Rejection as rejection:
            note(trace, "structure", False, rejection.detail)
            raise
        note(trace, "structure", True, f"alg {parsed.alg}, typ and crit fine")
        try:
            app = self.select_app(parsed)
        except Rejection as rejection:
            note(trace, "app", False, rejection.detail)
            raise
        note(trace, "app", True, f"app {app.id}")
        if parsed.alg not in app.algorithms:
            detail = f"{parsed.alg} is not in the app's algorithms ({', '.join(app.algorithms)})"
            note(trace, "algorithm", False, detail)
            raise Rejection(Reason.ALG_NOT_ALLOWED, detail, app=app.id)
        note(trace, "algorithm", True, f"{parsed.alg} is allowed")
        key = self.check_signature(parsed, app, now, trace, may_refetch=True)
        if key is None:
            return Refetch(self, token, parsed, app, now, trace)
        return self.remember(token, parsed, app, now, key, trace)

    def remember(
        self, token: str, parsed: _Parsed, app: App, now: float, key: str, trace: Trace
    ) -> Verified:
        """Step 7 on a verified signature, then into the cache."""
        verified = self.check_claims(parsed.payload, app, now, key, trace)
        if self.cache is not None:
            deadline = now + self.settings.cache_ttl
            if verified.exp is not None:
                deadline = min(deadline, verified.exp)  # never past exp
            self.cache[token] = (verified, deadline)
        return verified

    def select_app(self, parsed: _Parsed) -> App:
        """Step 5: the token service's issuer, else the first matching app, else the catch-all."""
        payload = parsed.payload
        if self.service_app is not None and payload.get("iss") == self.issuer:
            return self.service_app
        fallback = None
        for app in self.config.apps:
            if app.match_claim is None:
                fallback = app
            elif json_equal(payload.get(app.match_claim), app.match_value):
                return app
        if fallback is None:
            raise Rejection(Reason.UNKNOWN_APP, "no app matches the token")
        return fallback

    def check_signature(
        self, parsed: _Parsed, app: App, now: float, trace: Trace, may_refetch: bool = False
    ) -> str | None:
        """Step 6: a key of the app (never one named by the token) verifies the signature;
        None (only when `may_refetch`) when the kid is unknown and a JWKS refetch may bring it."""
        algorithm = jwk.ALGORITHMS[parsed.alg]
        if app.secrets:
            for index, secret in enumerate(app.secrets):
                if algorithm.verify(parsed.signing_input, secret, parsed.signature):
                    note(trace, "signature", True, f"verified with secrets[{index}]")
                    return f"secrets[{index}]"
            note(trace, "signature", False, f"none of {len(app.secrets)} secret(s) verifies it")
            raise Rejection(Reason.BAD_SIGNATURE, "no secret verifies the signature", app=app.id)
        keys = self.keys[app.id]
        jwks = keys.jwks
        if not keys.available(now):
            retry = jwks.retry_after(now) if jwks else 1
            note(trace, "key", False, f"no usable key yet (retry after {retry}s)")
            raise Rejection(
                Reason.KEYS_UNAVAILABLE, "no usable key yet", app=app.id, retry_after=retry
            )
        kid = parsed.header.get("kid")
        candidates = keys.candidates(parsed.alg, kid, now)
        if (
            may_refetch
            and kid is not None
            and jwks
            and not any(key.kid == kid for key in candidates)
        ):
            note(
                trace, "key refetch", True, f"kid {kid!r} not among the keys; refetched {jwks.url}"
            )
            return None
        if not candidates:
            if kid is None and not _too_many_fit(keys, parsed.alg, now):
                # No key fits the algorithm at all: no key verifies (SPEC §4 step 6).
                note(trace, "key", False, f"no key of the app fits {parsed.alg}")
                raise Rejection(Reason.BAD_SIGNATURE, "no key fits the algorithm", app=app.id)
            detail = f"no key has kid {kid!r}" if kid is not None else "more than one key fits"
            note(trace, "key", False, detail)
            raise Rejection(Reason.UNKNOWN_KID, "no key has this kid (or too many fit)", app=app.id)
        note(trace, "key", True, f"{len(candidates)} key(s) to try")
        for key in candidates:
            if algorithm.verify(parsed.signing_input, key.key, parsed.signature):
                name = f"kid {key.kid} from {key.source}" if key.kid else key.source
                note(trace, "signature", True, f"verified with {name}")
                return name
        note(trace, "signature", False, f"none of {len(candidates)} key(s) verifies it")
        raise Rejection(Reason.BAD_SIGNATURE, "no key verifies the signature", app=app.id)

    def check_claims(
        self, claims: dict[str, Any], app: App, now: float, key: str, trace: Trace
    ) -> Verified:
        """Step 7: the claim checks in the contract's order."""

        def fail(reason: Reason, detail: str, step: str = "claims") -> Rejection:
            note(trace, step, False, detail)
            return Rejection(reason, detail, app=app.id)

        for name in ("exp", "nbf", "iat"):
            if name in claims and not _is_time(claims[name]):
                detail = f"{name} is not a finite number within ±2^63"
                raise fail(Reason.MALFORMED, detail, "times")
        if any(_SURROGATE.search(text) for text in strings_in(claims)):
            raise fail(Reason.MALFORMED, "a string claim is not valid Unicode (a lone surrogate)")
        if "iss" in claims and not isinstance(claims["iss"], str):
            raise fail(Reason.MALFORMED, "iss is not a string")
        if "aud" in claims and not _audience_ok(claims["aud"]):
            raise fail(Reason.MALFORMED, "aud is not a string or a list of strings")
        leeway = self.settings.leeway
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        if exp is not None and exp + leeway <= now:
            detail = f"exp is {seconds(now - exp)} in the past (leeway {seconds(leeway)})"
            raise fail(Reason.EXPIRED, detail, "times")
        for name, when in (("nbf", nbf), ("iat", iat)):
            if when is not None and when > now + leeway:
                detail = f"{name} is {seconds(when - now)} in the future (leeway {seconds(leeway)})"
                raise fail(Reason.NOT_YET_VALID, detail, "times")
        if app.max_lifetime is not None and exp is not None:
            lifetime = exp - (iat if iat is not None else now)
            if lifetime > app.max_lifetime:
                detail = f"lives {seconds(lifetime)}, over max_lifetime {seconds(app.max_lifetime)}"
                raise fail(Reason.LIFETIME_TOO_LONG, detail, "times")
        if trace is not None:
            left = f"; expires in {seconds(exp - now)}" if exp is not None else ""
            trace.append(("times", True, f"exp, nbf, iat and lifetime fine{left}"))
        # A discovery app without `issuer` takes its document's, read at check time.
        keys = self.keys.get(app.id)
        issuers = keys.issuers() if keys is not None else app.issuer
        if issuers is not None and claims.get("iss") not in issuers:
            raise fail(Reason.ISSUER, "iss is not an allowed issuer")
        if app.audience is not None and not set(audiences(claims)) & set(app.audience):
            raise fail(Reason.AUDIENCE, "aud names none of the allowed audiences")
        for name in app.required_claims:
            if name not in claims:
                raise fail(Reason.MISSING_CLAIM, f"required claim {name} is absent")
        for name, value in app.claims:
            if name not in claims or not json_equal(claims[name], value):
                raise fail(Reason.CLAIM_MISMATCH, f"claim {name} differs from the config")
        identity = []
        for header, path in self.identity_claims:
            value = app.id if path == "@app" else claim_at(claims, path)
            if value is ABSENT:
                continue
            if isinstance(value, str):
                if _CONTROL.search(value):
                    raise fail(Reason.MALFORMED, f"claim {path} holds a control character")
            elif isinstance(value, list | dict) and any(
                _CONTROL.search(text) for text in strings_in(value)
            ):  # JSON text escapes most of them, not U+007F; the contract refuses them all
                raise fail(Reason.MALFORMED, f"claim {path} holds a control character")
            identity.append((header.encode(), header_text(value).encode()))
        note(trace, "claims", True, "iss, aud, required claims and claim values fine")
        return Verified(
            app=app,
            claims=claims,
            exp=float(exp) if exp is not None else None,
            scopes=_scopes(claims),
            identity=tuple(identity),
            claims_header=_b64_json(claims) if self.config.forward.claims_header else None,
            key=key,
        )


def _too_many_fit(keys: AppKeys, alg: str, now: float) -> bool:
    """Whether more keys fit a token without kid than are tried (AppKeys.candidates gives []
    both for that and for none)."""
    pool = keys.app.keys + (keys.jwks.current(now) if keys.jwks else ())
    return sum(1 for key in pool if key.fits(alg)) > MAX_KIDLESS


def _b64_json(claims: dict[str, Any]) -> str:
    text = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(text).rstrip(b"=").decode()


def service_app(config: Config) -> App | None:
    """The implicit app `token-service` (SPEC §4 step 5), when the token service is on."""
    service = config.token_service
    if service is None:
        return None
    keys = tuple(
        jwk.VerifyKey(k.key.public_key(), k.kid, k.alg, "token_service.signing_keys")
        for k in service.signing_keys
    )
    return App(
        id=TOKEN_SERVICE_APP,
        match_claim="iss",
        match_value=service.issuer,
        algorithms=tuple(dict.fromkeys(k.alg for k in service.signing_keys)),
        secrets=(),
        keys=keys,
        jwks_url=None,
        issuer=(service.issuer,),
        audience=(service.audience,) if service.audience else None,
        required_claims=("exp", "sub"),
        claims=(("env", config.environment),) if config.environment else (),
        max_lifetime=None,
    )
