"""Log lines are valid JSON whatever the request held, and carry the contract's keys."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time

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
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])


def test_access_line_durations_are_milliseconds_with_three_decimals() -> None:
    stream = io.StringIO()
    log = Log(stream)
    for seconds, upstream in ((0.0, 0.0000004), (1.2345678, 0.0000005), (3601.0009999, 0.25)):
        log.access("r", "GET", "/", "", 200, "forwarded", "", "", "c", seconds, upstream, 0, 0)
    durations = [
        re.search(r'"duration_ms":([^,]+),"upstream_ms":([^,]+),', text).groups()  # type: ignore[union-attr]
        for text in stream.getvalue().splitlines()
    ]
    assert durations == [("0.000", "0.000"), ("1234.568", "0.001"), ("3601001.000", "250.000")]


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


# Each process logs 1,600 access lines (~450 KB) in four batches onto the one stdout pipe.
_WORKER = """
import asyncio, os, sys
from proxy.telemetry import Log

async def main() -> None:
    log = Log(sys.stdout)
    for _ in range(4):
        for n in range(400):
            log.access("%032x" % n, "GET", "/p/" + "x" * 100, "/p/*", 200, "forwarded", "",
                       str(os.getpid()), "127.0.0.1", 0.001, 0.0005, 0, 2)
        log.flush()

asyncio.run(main())
"""


def test_workers_sharing_a_slow_stdout_pipe_never_split_a_line() -> None:
    # `serve --workers N` in a container: every worker writes to the same stdout pipe, and
    # the log collector reads it more slowly than lines come. A write larger than the pipe
    # can hold is split, and another worker's write lands in the middle of a line.
    read_end, write_end = os.pipe()
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER], stdout=write_end) for _ in range(2)
    ]
    os.close(write_end)
    data = bytearray()
    deadline = time.monotonic() + 60
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while time.monotonic() < deadline:
            chunk = pipe.read(512)
            if not chunk:
                break
            data += chunk
            time.sleep(0.0002)  # a slow reader keeps the pipe full
    for worker in workers:
        assert worker.wait(timeout=10) == 0
    lines = data.decode().splitlines()
    assert len(lines) == 2 * 1600
    apps = {json.loads(line)["app"] for line in lines}  # raises on a split line
    assert apps == {str(worker.pid) for worker in workers}
