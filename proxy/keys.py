"""The keys each app verifies with, and remote key sets kept fresh (SPEC §4 step 6, §7 JWKS).

    source = JwksSource(url, ("idp",), settings, fetcher=HttpFetcher(), clock=time.time)
    await source.fetch()                         # at start; later run() refreshes in background
    keys = AppKeys(app, source)
    keys.candidates("RS256", kid="k1", now=now)  # the keys to try, [] when the kid is unknown

A `JwksSource` keeps the last good keys while fetches fail (up to `jwks_max_stale`), shares one
in-flight fetch between all waiters, and refetches for an unknown `kid` at most once per
`jwks_min_refresh`. Keys named inside a token (`jwk`, `jku`, `x5u`, `x5c`) are never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp

from . import jwk
from .config import App, TokenSettings, jwks_url_problem
from .metrics import JWKS_FETCHES, JWKS_KEYS, Metrics
from .telemetry import Log

MAX_DOCUMENT = 1 << 20
MAX_KEYS = 100
MAX_REDIRECTS = 3
# Without a `kid`, at most this many fitting keys are tried (SPEC §4 step 6).
MAX_KIDLESS = 4
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)")


class FetchError(Exception):
    """A JWKS fetch that gave no usable document; the message is safe to log."""


@dataclass(frozen=True, slots=True)
class Fetched:
    body: bytes
    max_age: int | None


Fetcher = Callable[[str, float], Awaitable[Fetched]]


class HttpFetcher:
    """GETs a JWKS URL: at most 3 redirects, each to https, 1 MB decompressed."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, url: str, seconds: float) -> Fetched:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"Accept": "application/json"})
        try:
            async with asyncio.timeout(seconds):
                return await self._get(self._session, url)
        except TimeoutError:
            raise FetchError("timed out") from None
        except aiohttp.ClientError as error:
            raise FetchError(f"network error ({type(error).__name__})") from None
        except OSError as error:
            raise FetchError(f"network error ({type(error).__name__})") from None

    async def _get(self, session: aiohttp.ClientSession, url: str) -> Fetched:
        for _ in range(MAX_REDIRECTS + 1):
            async with session.get(url, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location", "")
                    url = urljoin(url, location)
                    # https only (SPEC §7): the loopback http allowance is for the URL the
                    # operator wrote, never for a Location a server chose.
                    if not location or urlsplit(url).scheme != "https" or jwks_url_problem(url):
                        raise FetchError("redirected to a URL that is not https")
                    continue
                if response.status != 200:
                    raise FetchError(f"status {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_DOCUMENT:
                        raise FetchError("document over 1 MB")
                found = _MAX_AGE.search(response.headers.get("Cache-Control", ""))
                return Fetched(bytes(body), int(found.group(1)) if found else None)
        raise FetchError("more than 3 redirects")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class JwksSource:
    """One JWKS URL: last good keys, background refresh, shared and rate-limited refetches."""

    def __init__(
        self,
        url: str,
        apps: tuple[str, ...],
        settings: TokenSettings,
        *,
        fetcher: Fetcher,
        clock: Callable[[], float],
        metrics: Metrics | None = None,
        log: Log | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.url = url
        self.apps = apps
        self.settings = settings
        self.fetcher = fetcher
        self.clock = clock
        self.metrics = metrics
        self.log = log
        self.on_change = on_change
        self.keys: tuple[jwk.VerifyKey, ...] = ()
        self.good_at: float | None = None
        self.next_at = 0.0
        self.failures = 0
        self.last_kid_fetch = -math.inf
        self._inflight: asyncio.Task[bool] | None = None

    def usable(self, now: float) -> bool:
        """True while the last good keys are younger than `jwks_max_stale`."""
        return (
            bool(self.keys)
            and self.good_at is not None
            and now - self.good_at <= self.settings.jwks_max_stale
        )

    def current(self, now: float) -> tuple[jwk.VerifyKey, ...]:
        return self.keys if self.usable(now) else ()

    def retry_after(self, now: float) -> int:
        """Whole seconds until keys may be there: the next fetch, or the one in flight."""
        if self._inflight is not None:
            return max(1, math.ceil(self.settings.jwks_timeout))
        return max(1, math.ceil(self.next_at - now))

    async def fetch(self) -> bool:
        """Fetch now, or join the fetch in flight; True when the keys are usable after it."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(self._fetched)
        return await asyncio.shield(self._inflight)

    def _fetched(self, task: asyncio.Task[bool]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: _fetch handles its own errors

    async def refetch_for_kid(self, now: float) -> bool:
        """One refetch for an unknown kid, unless one ran within `jwks_min_refresh`."""
        if self._inflight is None:
            if now - self.last_kid_fetch < self.settings.jwks_min_refresh:
                return False
            self.last_kid_fetch = now
        return await self.fetch()

    async def run(self) -> None:
        """Refresh in the background until cancelled."""
        while True:
            await asyncio.sleep(max(0.0, self.next_at - self.clock()))
            await self.fetch()

    async def _fetch(self) -> bool:
        try:
            fetched = await self.fetcher(self.url, self.settings.jwks_timeout)
            keys = self._parse(fetched.body)
        except FetchError as error:
            return self._failed(str(error))
        now = self.clock()
        ttl = (
            min(max(fetched.max_age, 60), 86400)
            if fetched.max_age is not None
            else self.settings.jwks_cache_ttl
        )
        self.next_at = now + ttl
        self.failures = 0
        self.good_at = now
        old = {key.kid for key in self.keys}
        new = {key.kid for key in keys}
        changed = _fingerprint(self.keys) != _fingerprint(keys)
        self.keys = keys
        self._count("ok")
        if changed:
            self.on_change()
            if self.log:
                self.log.event(
                    "info",
                    "jwks_fetch",
                    url=self.url,
                    apps=list(self.apps),
                    result="ok",
                    keys=len(keys),
                    added=sorted(str(k) for k in new - old),
                    removed=sorted(str(k) for k in old - new),
                )
        return True

    def _parse(self, body: bytes) -> tuple[jwk.VerifyKey, ...]:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise FetchError("not JSON") from None
        keys_listed = document.get("keys") if isinstance(document, dict) else None
        if isinstance(keys_listed, list) and len(keys_listed) > MAX_KEYS:
            raise FetchError(f"more than {MAX_KEYS} keys")
        try:
            keys, _ = jwk.parse_jwks(document, "jwks_url")
        except jwk.KeyMaterialError:
            raise FetchError("not a JWKS document") from None
        if not keys:
            raise FetchError("no usable key")
        return tuple(keys)

    def _failed(self, why: str) -> bool:
        now = self.clock()
        self.failures += 1
        backoff = min(2.0 ** (self.failures - 1), max(1.0, self.settings.jwks_min_refresh))
        self.next_at = now + backoff
        self._count("error")
        if self.log:
            self.log.event(
                "warning",
                "jwks_fetch",
                url=self.url,
                apps=list(self.apps),
                result="error",
                error=why,
                stale=self.keys != () and not self.usable(now),
            )
        return self.usable(now)

    def _count(self, result: str) -> None:
        if self.metrics is None:
            return
        usable = len(self.current(self.clock()))
        for app in self.apps:
            self.metrics.count(JWKS_FETCHES, app, result)
            self.metrics.set(JWKS_KEYS, usable, app)


def _fingerprint(keys: tuple[jwk.VerifyKey, ...]) -> set[tuple[str | None, str | None, str]]:
    return {(key.kid, key.alg, jwk.thumbprint(key.key)) for key in keys}


class AppKeys:
    """The keys of one app: its HS secrets, or its file keys plus its JWKS URL's keys."""

    def __init__(self, app: App, jwks: JwksSource | None = None) -> None:
        self.app = app
        self.jwks = jwks

    def available(self, now: float) -> bool:
        """False when no key source gives any usable key (→ 503 keys_unavailable)."""
        return bool(self.app.keys) or (self.jwks is not None and self.jwks.usable(now))

    def candidates(self, alg: str, kid: str | None, now: float) -> list[jwk.VerifyKey]:
        """The keys to try for a token; [] means the kid (or keyless choice) is unknown."""
        keys = self.app.keys + (self.jwks.current(now) if self.jwks else ())
        fitting = [key for key in keys if key.fits(alg)]
        if kid is not None:
            named = [key for key in fitting if key.kid == kid]
            if named:
                return named
            fitting = [key for key in fitting if key.kid is None]
        return fitting if len(fitting) <= MAX_KIDLESS else []


async def close_quietly(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
