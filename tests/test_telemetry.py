"""Log lines are valid JSON whatever the request held, and carry the contract's keys."""

from __future__ import annotations

import asyncio
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


async def test_events_flush_after_queued_access_lines() -> None:
    stream = io.StringIO()
    log = Log(stream)  # a running loop: access lines wait for the 50 ms batch
    log.access("r1", "GET", "/", "", 200, "forwarded", "", "", "c", 0.001, 0.0005, 0, 0)
    assert stream.getvalue() == ""  # queued, not yet written
    log.event("info", "reload", result="ok")
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["request", "reload"]
    log.access("r2", "GET", "/", "", 200, "forwarded", "", "", "c", 0.001, 0.0005, 0, 0)
    await asyncio.sleep(0.2)  # the batch timer writes it without any event
    assert json.loads(stream.getvalue().splitlines()[-1])["request_id"] == "r2"
