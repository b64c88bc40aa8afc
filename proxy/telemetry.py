"""JSON log lines (SPEC §7): what may be logged, and how.

    log = Log(sys.stdout, "info")
    log.event("info", "reload", result="ok")  # {"time": "...Z", "level": "info", "event": ...}

Log lines never hold a token, a secret or a key: callers pass reason words, ids from the
config, and the normalised path without its query. Keys are fixed words, never request data.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import deque
from json.encoder import encode_basestring_ascii
from typing import Any, Final, TextIO

_LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_string: Final = encode_basestring_ascii  # a JSON string literal, escaped (C)
# Linux's PIPE_BUF: a pipe write of at most this many bytes is never split by another
# process's write, so workers sharing one stdout pipe never interleave inside a line.
_ATOMIC: Final = 4096
# "000" to "999" by index: milliseconds and microseconds without a float format per line
# (a "%.3f" costs as much as the rest of a number: bench/README.md, "Why the code looks so").
_THREE: Final = tuple("%03d" % n for n in range(1000))  # noqa: UP031
# What the dev console keeps of an access line: time, method, path, route, status, outcome,
# reason, app, seconds.
RecentLine = tuple[str, str, str, str, int, str, str, str, float]
_RECENT_NAMES: Final = ("time", "method", "path", "route", "status", "outcome", "reason", "app")


def _milliseconds(seconds: float) -> str:
    """`seconds` in milliseconds with three decimals: 0.0123 -> "12.300"."""
    micros = int(seconds * 1_000_000 + 0.5)  # never negative: a difference of perf_counter()
    return f"{micros // 1000}.{_THREE[micros % 1000]}"


class Log:
    """JSON lines on a stream: `time` (RFC 3339 UTC), `level`, `event`, then fields.

    Access lines are buffered and written at most 50 ms later (one write for many requests:
    a write and flush per request cost more than the rest of the access log); every other
    event flushes at once, after the lines before it. Each write holds whole lines and at
    most 4096 bytes (only a longer line goes alone), so that it is atomic on a pipe.
    Lines are ASCII (JSON escapes the rest), so a character is a byte.
    """

    def __init__(self, stream: TextIO | None = None, level: str = "info") -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.threshold = _LEVELS.get(level, 20)
        self._second = -1
        self._prefix = ""
        self._pending: list[str] = []
        self._size = 0  # bytes of the pending lines, newlines included
        self._timer: asyncio.TimerHandle | None = None
        self.recent: Recent | None = None  # the dev console's recorder; None: nothing kept

    def set_level(self, level: str) -> None:
        self.threshold = _LEVELS.get(level, 20)

    def now(self) -> str:
        """The current time as RFC 3339 UTC with milliseconds."""
        stamp = time.time()
        second = int(stamp)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{_THREE[min(int((stamp - second) * 1000), 999)]}Z"

    def event(self, level: str, event: str, **fields: Any) -> None:
        """Write one line when `level` is at or above the configured level."""
        if _LEVELS[level] < self.threshold:
            return
        line = {"time": self.now(), "level": level, "event": event, **fields}
        self._queue(json.dumps(line, separators=(",", ":"), default=str))
        self.flush()  # at once, after the access lines queued before it

    def access(
        self,
        request_id: str,
        method: str,
        path: str,
        route: str,
        status: int,
        outcome: str,
        reason: str,
        app: str,
        client: str,
        seconds: float,
        upstream_seconds: float | None,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """Queue one access line (`event: request`), written within 50 ms; built as text.

        `request_id` is written as it is: it is 1-128 of `[A-Za-z0-9._:-]` (SPEC §6), which
        JSON needs no escape for.
        """
        # No format specs inside the f-string: mypyc would compile it to a slow str.format().
        upstream = "null" if upstream_seconds is None else _milliseconds(upstream_seconds)
        stamp = self.now()
        if self.recent is not None:  # the dev console is on (SPEC §12)
            self.recent.add((stamp, method, path, route, status, outcome, reason, app, seconds))
        self._queue(
            f'{{"time":"{stamp}","level":"info","event":"request",'
            f'"request_id":"{request_id}","method":{_string(method)},'
            f'"path":{_string(path)},"route":{_string(route)},"status":{status},'
            f'"outcome":"{outcome}","reason":"{reason}","app":{_string(app)},'
            f'"client":{_string(client)},"duration_ms":{_milliseconds(seconds)},'
            f'"upstream_ms":{upstream},"bytes_in":{bytes_in},"bytes_out":{bytes_out}}}'
        )
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(0.05, self.flush)
            except RuntimeError:  # no loop (tests, tools): write at once
                self.flush()

    def _queue(self, line: str) -> None:
        if self._size + len(line) >= _ATOMIC:
            self._write()
        self._pending.append(line)
        self._size += len(line) + 1

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._write()

    def _write(self) -> None:
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        self._size = 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed stdout must not take requests down
            pass


class Recent:
    """The dev console's last requests (SPEC §12), fed by `Log.access`: only the access line's
    own safe fields, never a token or a claim value; per process, bounded.

        recent = log.recent = Recent()
        recent.since(0)  # (next cursor, [{"seq", "time", "method", "path", ...}, ...])
    """

    def __init__(self, size: int = 100) -> None:
        self.seq = 0  # how many were ever added: the cursor pollers pass back
        self._lines: deque[tuple[int, RecentLine]] = deque(maxlen=size)

    def add(self, line: RecentLine) -> None:
        # A tuple only: the dicts are built when the console asks, not per request.
        self.seq += 1
        self._lines.append((self.seq, line))

    def since(self, after: int) -> tuple[int, list[dict[str, Any]]]:
        """The kept requests added after cursor `after`, oldest first, and the next cursor."""
        found = []
        for seq, line in self._lines:
            if seq > after:
                entry: dict[str, Any] = {"seq": seq}
                entry.update(zip(_RECENT_NAMES, line, strict=False))  # all but the seconds
                entry["duration_ms"] = round(line[-1] * 1000, 3)
                found.append(entry)
        return self.seq, found
