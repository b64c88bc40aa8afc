"""Metrics (SPEC §7) and JSON log lines: what may be counted and logged, and how.

    metrics = Metrics()                       # once per process; survives reloads
    metrics.request("TokenExpired", "expired", "TR21063826", seconds=0.002)
    log = Log(sys.stdout, "info")
    log.event("info", "reload", result="ok")  # {"time": "...Z", "level": "info", "event": ...}

Labels take config words and fixed words only, never request data. Log lines never hold a
token, a secret or a key: callers pass reason words, ids from the config, and the normalised
path without its query.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from . import __version__

disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series: noise

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Every metric of the contract, with label children cached for the hot path."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "token_proxy_requests", "Requests by outcome", ["outcome", "reason", "app"], registry=r
        )
        self.request_duration = Histogram(
            "token_proxy_request_duration_seconds",
            "Time from request to response headers, by outcome",
            ["outcome"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "token_proxy_upstream_duration_seconds",
            "Time the upstream took to send response headers",
            ["upstream"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.token_cache = Counter(
            "token_proxy_token_cache_requests",
            "Verified-token cache lookups",
            ["result"],
            registry=r,
        )
        self.jwks_fetches = Counter(
            "token_proxy_jwks_fetches", "JWKS fetches", ["app", "result"], registry=r
        )
        self.jwks_keys = Gauge(
            "token_proxy_jwks_keys",
            "Usable keys from the app's JWKS URL",
            ["app"],
            registry=r,
            multiprocess_mode="max",
        )
        self.reloads = Counter(
            "token_proxy_reloads", "Configuration reloads", ["result"], registry=r
        )
        self.in_flight = Gauge(
            "token_proxy_in_flight_requests",
            "Requests being handled",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.build_info = Gauge(
            "token_proxy_build_info",
            "Version of token-proxy",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.tokens_issued = Counter(
            "token_proxy_tokens_issued",
            "Access tokens issued by the token service",
            ["grant", "client"],
            registry=r,
        )
        self.build_info.labels(__version__).set(1)
        self._requests: dict[tuple[str, str, str], Any] = {}
        self._durations: dict[str, Any] = {}
        self._upstreams: dict[str, Any] = {}
        self.cache_hit = self.token_cache.labels("hit")
        self.cache_miss = self.token_cache.labels("miss")
        for result in ("ok", "error"):
            self.reloads.labels(result)
        for result in ("hit", "miss"):
            self.token_cache.labels(result)

    def request(self, outcome: str, reason: str, app: str, seconds: float) -> None:
        """Count one answered request (labels: config words and fixed words only)."""
        key = (outcome, reason, app)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(outcome, reason, app)
        child.inc()
        duration = self._durations.get(outcome)
        if duration is None:
            duration = self._durations[outcome] = self.request_duration.labels(outcome)
        duration.observe(seconds)

    def upstream(self, name: str, seconds: float) -> None:
        child = self._upstreams.get(name)
        if child is None:
            child = self._upstreams[name] = self.upstream_duration.labels(name)
        child.observe(seconds)


class Log:
    """JSON lines on a stream: `time` (RFC 3339 UTC), `level`, `event`, then fields."""

    def __init__(self, stream: TextIO | None = None, level: str = "info") -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.threshold = _LEVELS.get(level, 20)
        self._second = -1
        self._prefix = ""

    def set_level(self, level: str) -> None:
        self.threshold = _LEVELS.get(level, 20)

    def enabled(self, level: str) -> bool:
        return _LEVELS[level] >= self.threshold

    def now(self) -> str:
        """The current time as RFC 3339 UTC with milliseconds."""
        stamp = time.time()
        second = int(stamp)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((stamp - second) * 1000):03d}Z"

    def event(self, level: str, event: str, **fields: Any) -> None:
        """Write one line when `level` is at or above the configured level."""
        if _LEVELS[level] < self.threshold:
            return
        self.write({"time": self.now(), "level": level, "event": event, **fields})

    def write(self, line: dict[str, Any]) -> None:
        try:
            self.stream.write(json.dumps(line, separators=(",", ":"), default=str) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed stdout must not take requests down
            pass
