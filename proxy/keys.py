"""The keys each app verifies with, and remote key sets kept fresh (SPEC §4 step 6, §7, §11).

    source = JwksSource(url, ("idp",), settings, fetcher=HttpFetcher(), clock=time.time)
    await source.fetch()                         # at start; later run() refreshes in background
    keys = AppKeys(app, source)
    keys.candidates("RS256", kid="k1", now=now)  # the keys to try, [] when the kid is unknown
    JwksSource(url, apps, settings, discovery=True, issuers=None, ...)  # url: a discovery document

A `JwksSource` keeps the last good keys while fetches fail (up to `jwks_max_stale`), shares one
in-flight fetch between all waiters, and refetches for an unknown `kid` at most once per
`jwks_min_refresh`. With `discovery=True` its URL names an OpenID Connect / RFC 8414 document
whose `jwks_uri` is the JWKS and whose `issuer` the app may adopt; the document is fetched again
on every scheduled refresh (not for an unknown kid), and document and keys change together.
Keys named inside a token (`jwk`, `jku`, `x5u`, `x5c`) are never used.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp

from . import jwk
from .config import App, TokenSettings, client_context
from .errors import FetchError as FetchError  # re-exported: raised here
from .metrics import JWKS_FETCHES, JWKS_KEYS, Metrics
from .telemetry import Log

MAX_DOCUMENT = 1 << 20
MAX_KEYS = 100
MAX_REDIRECTS = 3
# Without a `kid`, at most this many fitting keys are tried (SPEC §4 step 6).
MAX_KIDLESS = 4
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)")


@dataclass(frozen=True, slots=True)
class Fetched:
    body: bytes
    max_age: int | None


class Fetcher(Protocol):
    """GETs one document: `(url, timeout seconds, extra CA bundle or None)` → `Fetched`."""

    def __call__(
        self, url: str, seconds: float, ca_file: str | None = None
    ) -> Awaitable[Fetched]: ...


@dataclass(frozen=True, slots=True)
class Discovered:
    """What a discovery document gives: the JWKS URL and the issuer."""

    jwks_uri: str
    issuer: str


class HttpFetcher:
    """GETs a JWKS or discovery URL: at most 3 redirects, each to https, 1 MB decompressed."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._contexts: dict[tuple[str, int, int], ssl.SSLContext] = {}

    async def __call__(self, url: str, seconds: float, ca_file: str | None = None) -> Fetched:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"Accept": "application/json"})
        try:
            context = self._context(ca_file)
            async with asyncio.timeout(seconds):
                return await self._get(self._session, url, context)
        except TimeoutError:
            raise FetchError("timed out") from None
        except aiohttp.ClientSSLError as error:
            raise FetchError(f"TLS error ({type(error).__name__})") from None
        except aiohttp.ClientError as error:
            raise FetchError(f"network error ({type(error).__name__})") from None
        except OSError as error:
            raise FetchError(f"network error ({type(error).__name__})") from None

    def _context(self, ca_file: str | None) -> ssl.SSLContext | bool:
        """Verification always on: the system CAs, plus the app's `ca_file` when it has one."""
        if ca_file is None:
            return True
        try:
            # Keyed by the file's state too: a bundle replaced in place counts from its next use.
            stat = os.stat(ca_file)
            key = (ca_file, stat.st_mtime_ns, stat.st_size)
            context = self._contexts.get(key)
            if context is None:
                context = client_context(ca_file)
                stale = [known for known in self._contexts if known[0] == ca_file]
                for known in stale:
                    del self._contexts[known]
                self._contexts[key] = context
        except (OSError, ssl.SSLError):
            raise FetchError("ca_file cannot be read") from None
        return context

    async def _get(
        self, session: aiohttp.ClientSession, url: str, context: ssl.SSLContext | bool
    ) -> Fetched:
        for _ in range(MAX_REDIRECTS + 1):
            async with session.get(url, allow_redirects=False, ssl=context) as response:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location", "")
                    url = urljoin(url, location)
                    # https only (SPEC §7): the loopback http allowance is for the URL the
                    # operator wrote, never for a Location a server chose.
                    if not location or urlsplit(url).scheme != "https" or jwk.jwks_url_problem(url):
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
    """One JWKS (or discovery) URL: last good keys, background refresh, shared refetches."""

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
        discovery: bool = False,
        issuers: tuple[str, ...] | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.url = url  # as configured: the JWKS, or the discovery document
        self.discovery = discovery
        self.issuers = issuers  # the app's `issuer`: the document's must be one of them
        self.ca_file = ca_file
        self.document: Discovered | None = None  # the last good one, kept with its keys
        self.document_due = 0.0  # when the document is fetched again
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

    @property
    def label(self) -> str:
        """How /readyz names this source."""
        return f"{'discovery' if self.discovery else 'jwks'} {self.url}"

    @property
    def jwks_uri(self) -> str | None:
        """The JWKS URL in use: the configured one, or the last good document's."""
        if not self.discovery:
            return self.url
        return self.document.jwks_uri if self.document else None

    @property
    def issuer(self) -> str | None:
        """The last good discovery document's issuer (None without one)."""
        return self.document.issuer if self.document else None

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

    async def fetch(self, document: bool = True) -> bool:
        """Fetch now, or join the fetch in flight; True when the keys are usable after it.

        `document=False` (an unknown kid) fetches only the JWKS, unless no document is known
        or it is due anyway.
        """
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch(document))
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
        return await self.fetch(document=False)

    async def run(self) -> None:
        """Refresh in the background until cancelled."""
        while True:
            await asyncio.sleep(max(0.0, self.next_at - self.clock()))
            await self.fetch()

    async def _fetch(self, refresh_document: bool) -> bool:
        timeout, ca_file = self.settings.jwks_timeout, self.ca_file
        document = self.document
        fetched_document = None
        url = self.url
        try:
            if self.discovery and (
                refresh_document or document is None or self.clock() >= self.document_due
            ):
                fetched_document = await self.fetcher(url, timeout, ca_file)
                document = self._discovered(fetched_document.body)
            if document is not None:
                url = document.jwks_uri
            fetched = await self.fetcher(url, timeout, ca_file)
            keys = self._parse(fetched.body)
        except FetchError as error:
            return self._failed(str(error), url)
        now = self.clock()
        # The shorter of the two documents' max-age, when they give one.
        ages = [f.max_age for f in (fetched, fetched_document) if f and f.max_age is not None]
        ttl = min(max(min(ages), 60), 86400) if ages else self.settings.jwks_cache_ttl
        self.next_at = now + ttl
        if fetched_document is not None:
            self.document_due = now + ttl
        self.failures = 0
        self.good_at = now
        old = {key.kid for key in self.keys}
        new = {key.kid for key in keys}
        changed = _fingerprint(self.keys) != _fingerprint(keys) or self.document != document
        self.keys = keys
        self.document = document  # changes with its keys, never alone
        self._count("ok")
        if changed:
            self.on_change()
            self._log_fetch(
                "info",
                url,
                result="ok",
                keys=len(keys),
                added=sorted(str(k) for k in new - old),
                removed=sorted(str(k) for k in old - new),
            )
        return True

    def _log_fetch(self, level: str, url: str, **fields: Any) -> None:
        """One `jwks_fetch` line: the URL and its apps, then `fields`, then the discovery
        document's URL and issuer when the keys came through one."""
        if not self.log:
            return
        if self.discovery:
            fields.update(discovery_url=self.url, issuer=self.issuer)
        self.log.event(level, "jwks_fetch", url=url, apps=list(self.apps), **fields)

    def _discovered(self, body: bytes) -> Discovered:
        """The JWKS URL and issuer of a discovery document, checked (SPEC §11)."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise FetchError("discovery document is not JSON") from None
        if not isinstance(document, dict):
            raise FetchError("discovery document is not a JSON object")
        issuer, jwks_uri = document.get("issuer"), document.get("jwks_uri")
        if not isinstance(issuer, str) or not issuer:
            raise FetchError("discovery document has no issuer")
        if self.issuers is not None and issuer not in self.issuers:
            # The IdP's own name, not a secret; cut short since the document is foreign.
            raise FetchError(f"discovery issuer {issuer[:200]!r} is not one of the app's issuers")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise FetchError("discovery document has no jwks_uri")
        problem = jwk.jwks_url_problem(jwks_uri, what="jwks_uri")
        if problem:
            raise FetchError(problem)
        return Discovered(jwks_uri, issuer)

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
        return tuple(key for _, key in keys)

    def _failed(self, why: str, url: str) -> bool:
        now = self.clock()
        self.failures += 1
        backoff = min(2.0 ** (self.failures - 1), max(1.0, self.settings.jwks_min_refresh))
        self.next_at = now + backoff
        self._count("error")
        self._log_fetch(
            "warning",
            url,
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

    def issuers(self) -> tuple[str, ...] | None:
        """The allowed `iss` values: the app's `issuer`, else its discovery document's.

        None: iss is not checked. A discovery app without `issuer` and no document yet
        allows none (its file keys may verify, but nothing says which issuer to trust).
        """
        if self.app.issuer is not None or not self.app.discovery_url:
            return self.app.issuer
        issuer = self.jwks.issuer if self.jwks is not None else None
        return (issuer,) if issuer else ()

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
