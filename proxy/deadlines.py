"""A client connection's two deadlines on one lazy timer (`limits.header_timeout`, `idle_timeout`).

    deadlines = Deadlines(loop, header_timeout, idle_timeout, head_late, idle_late)
    deadlines.head()            # a whole head is due header_timeout from now
    deadlines.head_by = 0.0     # it came
    deadlines.idle()            # the next request is due idle_timeout from now
    deadlines.stop()            # the connection is gone

A call_later and a cancel per deadline cost 10 % of a keep-alive request (uvloop allocates a
TimerHandle and a libuv timer each time). Here setting or clearing a deadline is a float; the
timer, armed for the nearest deadline, wakes and re-arms itself for the one still pending.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def _nothing() -> None:
    pass


class Deadlines:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        header_timeout: float,
        idle_timeout: float,
        head_late: Callable[[], None],
        idle_late: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.head_late = head_late
        self.idle_late = idle_late
        self.head_by = 0.0  # loop time a whole head is due; 0.0: none is
        self.idle_by = 0.0  # loop time the next request is due; 0.0: none is
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    def head(self) -> None:
        self.head_by = self.loop.time() + self.header_timeout
        self._arm(self.head_by)

    def idle(self) -> None:
        self.idle_by = self.loop.time() + self.idle_timeout
        self._arm(self.idle_by)

    def stop(self) -> None:
        """No deadline more; the callbacks (the connection's methods) are let go."""
        self.head_by = self.idle_by = 0.0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.head_late = self.idle_late = _nothing

    def _arm(self, deadline: float) -> None:
        """The timer wakes no later than `deadline`."""
        if self.timer is not None:
            if self.timer_at <= deadline:
                return
            self.timer.cancel()
        self.timer = self.loop.call_at(deadline, self._tick)
        self.timer_at = deadline

    def _tick(self) -> None:
        self.timer = None
        now = self.loop.time()
        if self.head_by and self.head_by <= now:
            self.head_by = 0.0
            self.head_late()
        elif self.idle_by and self.idle_by <= now:
            self.idle_by = 0.0
            self.idle_late()
        for deadline in (self.head_by, self.idle_by):
            if deadline:
                self._arm(deadline)
