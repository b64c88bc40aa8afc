"""Metrics (SPEC §7): every series of the contract, cheap to count, summed across workers.

    metrics = Metrics()                               # once per process; survives reloads
    metrics.request("TokenExpired", "expired", "TR21063826", seconds=0.002)
    metrics.render()                                  # Prometheus text format for /metrics
    render([Metrics.read(path) for path in worker_files])   # the supervisor's /metrics

Values are doubles in one memory map: a `+= 1` on the request path instead of
prometheus-client's locked objects (measured in bench/: a tenth of the proxy's CPU per
request). Under `--workers` each worker's map is a file the supervisor reads; counters and
histograms of dead workers stay in the sum, `in_flight` counts the live ones, `jwks_keys` is
their maximum. prometheus-client still writes the exposition format. Labels take config words
and fixed words only, never request data.
"""

from __future__ import annotations

import json
import mmap
import os
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from . import __version__

BUCKETS: Final[tuple[float, ...]] = (  # seconds; a variable-length tuple stays one object
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip
HISTOGRAM_WIDTH: Final = len(BUCKETS) + 2  # a count per bucket, the +Inf count, the sum
SIZE: Final = 4 << 20  # bytes per process: room for tens of thousands of series
METRICS_DIR_ENV = "TOKEN_PROXY_METRICS_DIR"  # set by the supervisor for its workers


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    help: str
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    merge: str = "sum"  # gauges across workers: sum (live ones) | max (live ones)


REQUESTS = Family(
    "token_proxy_requests", "Requests by outcome", "counter", ("outcome", "reason", "app")
)
DURATION = Family(
    "token_proxy_request_duration_seconds",
    "Time to answer a request, by outcome",
    "histogram",
    ("outcome",),
)
UPSTREAM = Family(
    "token_proxy_upstream_duration_seconds",
    "Time the upstream took to send response headers",
    "histogram",
    ("upstream",),
)
CACHE = Family(
    "token_proxy_token_cache_requests", "Verified-token cache lookups", "counter", ("result",)
)
JWKS_FETCHES = Family("token_proxy_jwks_fetches", "JWKS fetches", "counter", ("app", "result"))
JWKS_KEYS = Family(
    "token_proxy_jwks_keys", "Usable keys from the app's JWKS URL", "gauge", ("app",), "max"
)
RELOADS = Family("token_proxy_reloads", "Configuration reloads", "counter", ("result",))
IN_FLIGHT = Family("token_proxy_in_flight_requests", "Requests being handled", "gauge", ())
BUILD = Family("token_proxy_build_info", "Version of token-proxy", "gauge", ("version",), "max")
ISSUED = Family(
    "token_proxy_tokens_issued",
    "Access tokens issued by the token service",
    "counter",
    ("grant", "client"),
)
FAMILIES = {family.name: family for family in (
    REQUESTS, DURATION, UPSTREAM, CACHE, JWKS_FETCHES, JWKS_KEYS, RELOADS, IN_FLIGHT, BUILD,
    ISSUED,
)}  # fmt: skip


class Snapshot(NamedTuple):
    """One process's series: (family name, labels) -> offset, its values, and whether it lives."""

    series: dict[tuple[str, tuple[str, ...]], int]
    values: Any  # a sequence of floats
    alive: bool


class Metrics:
    """The contract's metrics for one process."""

    def __init__(self, path: str | None = None) -> None:
        if path is None:
            self._map = mmap.mmap(-1, SIZE)
            self._index_file = None
        else:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(descriptor, SIZE)
                self._map = mmap.mmap(descriptor, SIZE)
            finally:
                os.close(descriptor)
            self._index_file = open(path + ".index", "a", encoding="utf-8")  # noqa: SIM115
        self.values = memoryview(self._map).cast("d")
        self.index: dict[tuple[str, tuple[str, ...]], int] = {}
        self._next = 0
        self._requests: dict[tuple[str, str, str], int] = {}
        self._durations: dict[str, int] = {}
        self._upstreams: dict[str, int] = {}
        self._in_flight = self.slot(IN_FLIGHT, ())
        self._live = 0  # requests in flight: stored whole, cheaper than an add in the map
        self.values[self.slot(BUILD, (__version__,))] = 1
        self.cache_hit_slot = self.slot(CACHE, ("hit",))
        self.cache_miss_slot = self.slot(CACHE, ("miss",))
        for result in ("ok", "error"):
            self.slot(RELOADS, (result,))

    def slot(self, family: Family, labels: tuple[str, ...]) -> int:
        """The offset of a series' value(s), allocated on first use."""
        key = (family.name, labels)
        offset = self.index.get(key)
        if offset is None:
            width = HISTOGRAM_WIDTH if family.kind == "histogram" else 1
            if (self._next + width) * 8 > SIZE:
                raise RuntimeError("metrics store is full")  # labels are config words: bounded
            offset = self._next
            self._next += width
            self.index[key] = offset
            if self._index_file is not None:
                self._index_file.write(json.dumps([family.name, list(labels), offset]) + "\n")
                self._index_file.flush()
        return offset

    # --- the request path: a few dictionary lookups and additions --------------------------

    def request(self, outcome: str, reason: str, app: str, seconds: float) -> None:
        """Count one answered request (labels: config words and fixed words only)."""
        values = self.values
        key = (outcome, reason, app)
        slot = self._requests.get(key)
        if slot is None:
            slot = self._requests[key] = self.slot(REQUESTS, key)
        values[slot] += 1
        base = self._durations.get(outcome)
        if base is None:
            base = self._durations[outcome] = self.slot(DURATION, (outcome,))
        values[base + bisect_left(BUCKETS, seconds)] += 1
        values[base + HISTOGRAM_WIDTH - 1] += seconds

    def upstream(self, name: str, seconds: float) -> None:
        base = self._upstreams.get(name)
        if base is None:
            base = self._upstreams[name] = self.slot(UPSTREAM, (name,))
        self.values[base + bisect_left(BUCKETS, seconds)] += 1
        self.values[base + HISTOGRAM_WIDTH - 1] += seconds

    def in_flight(self, change: int) -> None:
        self._live += change
        self.values[self._in_flight] = self._live

    def cache(self, hit: bool) -> None:
        self.values[self.cache_hit_slot if hit else self.cache_miss_slot] += 1

    # --- everything else: rare ---------------------------------------------------------------

    def count(self, family: Family, *labels: str) -> None:
        self.values[self.slot(family, labels)] += 1

    def set(self, family: Family, value: float, *labels: str) -> None:
        self.values[self.slot(family, labels)] = value

    def snapshot(self) -> Snapshot:
        return Snapshot(dict(self.index), self.values, True)

    def render(self) -> bytes:
        return render([self.snapshot()])

    @staticmethod
    def read(path: str, alive: bool) -> Snapshot:
        """Another process's series from its file (a supervisor reading a worker)."""
        index: dict[tuple[str, tuple[str, ...]], int] = {}
        try:
            with open(path + ".index", encoding="utf-8") as lines:
                for line in lines:
                    try:
                        name, labels, offset = json.loads(line)
                    except ValueError:
                        continue  # a line being written
                    index[(name, tuple(labels))] = int(offset)
            with open(path, "rb") as data:
                values = memoryview(data.read()).cast("d")
        except OSError:
            return Snapshot({}, [], alive)
        return Snapshot(index, values, alive)


def render(snapshots: Iterable[Snapshot]) -> bytes:
    """Prometheus text format for the sum of some processes' series."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(list(snapshots)))
    return generate_latest(registry)


class _Collector:
    def __init__(self, snapshots: list[Snapshot]) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        merged: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        for snapshot in self.snapshots:
            for (name, labels), offset in snapshot.series.items():
                family = FAMILIES.get(name)
                if family is None:
                    continue
                width = HISTOGRAM_WIDTH if family.kind == "histogram" else 1
                values = list(snapshot.values[offset : offset + width])
                if family.kind == "gauge" and not snapshot.alive:
                    continue  # a dead worker has nothing in flight and no keys
                current = merged.get((name, labels))
                if current is None:
                    merged[(name, labels)] = values
                elif family.kind == "gauge" and family.merge == "max":
                    current[0] = max(current[0], values[0])
                else:
                    merged[(name, labels)] = [a + b for a, b in zip(current, values, strict=True)]
        for family in FAMILIES.values():
            series = sorted((labels, values) for (name, labels), values in merged.items()
                            if name == family.name)  # fmt: skip
            yield _family(family, series)


def _family(family: Family, series: list[tuple[tuple[str, ...], list[float]]]) -> Metric:
    labels = list(family.labels)
    if family.kind == "counter":
        counter = CounterMetricFamily(family.name, family.help, labels=labels)
        for values_labels, values in series:
            counter.add_metric(list(values_labels), values[0])
        return counter
    if family.kind == "gauge":
        gauge = GaugeMetricFamily(family.name, family.help, labels=labels)
        for values_labels, values in series:
            gauge.add_metric(list(values_labels), values[0])
        return gauge
    histogram = HistogramMetricFamily(family.name, family.help, labels=labels)
    for values_labels, values in series:
        cumulative, buckets = 0.0, []
        for bound, count in zip((*BUCKETS, float("inf")), values[:-1], strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        histogram.add_metric(list(values_labels), buckets, values[-1])
    return histogram
