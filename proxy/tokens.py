"""Verifying a token (SPEC §4 steps 4-7 and the cache): app choice, signature, claims.

    found = extract_token(view, config.token.sources)     # extract.py: None, or a Found
    verified = await verifier.verify(found.token, now)    # Verified, or raises Rejection
    verified.app.id, verified.claims, verified.identity

Verification runs in the contract's order: structure (`extract.parse`), app, key and signature
(PyJWT's algorithm objects, given ready key objects and the app's allowlist), then our own
ordered claim checks (`claims.ClaimChecks`). A verified token is cached, keyed by the token
itself, never past its `exp`.
"""

from __future__ import annotations

from cachetools import Cache

from . import jwk
from .claims import ClaimChecks, Trace, Verified, json_equal, note
from .config import TOKEN_SERVICE_APP, App, Config
from .errors import Reason, Rejection
from .extract import Parsed, parse
from .keys import MAX_KIDLESS, AppKeys
from .metrics import Metrics


class Refetch:
    """A verification waiting for a JWKS refetch (an unknown kid): `await refetch.verify()`."""

    __slots__ = ("app", "now", "parsed", "token", "trace", "verifier")

    def __init__(
        self, verifier: Verifier, token: str, parsed: Parsed, app: App, now: float, trace: Trace
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
        self.claims = ClaimChecks(config, keys)
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
        self, token: str, parsed: Parsed, app: App, now: float, key: str, trace: Trace
    ) -> Verified:
        """Step 7 on a verified signature, then into the cache."""
        verified = self.claims.check(parsed.payload, app, now, key, trace)
        if self.cache is not None:
            deadline = now + self.settings.cache_ttl
            if verified.exp is not None:
                deadline = min(deadline, verified.exp)  # never past exp
            self.cache[token] = (verified, deadline)
        return verified

    def select_app(self, parsed: Parsed) -> App:
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
        self, parsed: Parsed, app: App, now: float, trace: Trace, may_refetch: bool = False
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


def _too_many_fit(keys: AppKeys, alg: str, now: float) -> bool:
    """Whether more keys fit a token without kid than are tried (AppKeys.candidates gives []
    both for that and for none)."""
    pool = keys.app.keys + (keys.jwks.current(now) if keys.jwks else ())
    return sum(1 for key in pool if key.fits(alg)) > MAX_KIDLESS


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
