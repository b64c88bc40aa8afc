"""Log lines are valid JSON whatever the request held, and carry the contract's keys."""

from __future__ import annotations

import io
import json

from proxy.telemetry import Log


def test_access_line_escapes_request_data() -> None:
    stream = io.StringIO()
    log = Log(stream)
    path = '/a"b\\c/\u00e9/\udcff/\x7f'
    log.access("rid", "GET", path, "/a/*", 200, "forwarded", "", "app-1", "::1", 0.0123, None, 5, 7)
    log.flush()
    line = json.loads(stream.getvalue())
    assert line["path"] == path
    assert line["upstream_ms"] is None
    assert line["duration_ms"] == 12.3
    assert set(line) == {
        "time", "level", "event", "request_id", "method", "path", "route", "status", "outcome",
        "reason", "app", "client", "duration_ms", "upstream_ms", "bytes_in", "bytes_out",
    }  # fmt: skip
    assert line["time"].endswith("Z")


def test_events_flush_after_queued_access_lines() -> None:
    stream = io.StringIO()
    log = Log(stream)
    log.access("r1", "GET", "/", "", 200, "forwarded", "", "", "c", 0.001, 0.0005, 0, 0)
    log.event("info", "reload", result="ok")
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["request", "reload"]
