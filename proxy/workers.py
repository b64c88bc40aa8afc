"""`serve --workers N`: N processes on one port under a supervisor (SPEC §7).

    exit_code = supervise("config/proxy.yaml", Overrides(), workers=2)

Each worker is `token-proxy serve --workers 1` with SO_REUSEPORT, no admin listener, its
metrics in its own memory-mapped file (`metrics.py`) and its readiness in a small status file.
The supervisor forwards SIGHUP/SIGTERM/SIGINT, restarts a worker that dies (backing off from
1 s to 30 s), serves the admin listener over all workers, and exits 0 once all have drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from .config import Config
from .errors import ConfigError, complain
from .metrics import METRICS_DIR_ENV, Metrics, render
from .runtime import (
    STATUS_ENV,
    Overrides,
    ignore_late_signals,
    listen_problem,
    load_with_overrides,
)

MAX_BACKOFF = 30.0


class Worker:
    def __init__(self, index: int, status: str) -> None:
        self.index = index
        self.status = status
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.backoff = 1.0
        self.ever_ready = False
        self.watcher: asyncio.Future[None] | None = None

    def waiting_for(self) -> list[str]:
        if self.process is None or self.process.returncode is not None:
            return [f"worker {self.index} is not running"]
        try:
            found = json.loads(Path(self.status).read_text())["waiting_for"]
        except (OSError, ValueError, KeyError, TypeError):
            return [f"worker {self.index} is starting"]
        if not found:
            self.ever_ready = True
        return [f"worker {self.index}: {item}" for item in found]


class Supervisor:
    def __init__(self, path: str, overrides: Overrides, count: int, config: Config) -> None:
        self.path = path
        self.overrides = overrides
        self.config = config
        self.directory = tempfile.mkdtemp(prefix="token-proxy-")
        self.metrics_dir = os.path.join(self.directory, "metrics")
        os.mkdir(self.metrics_dir)
        self.workers = [
            Worker(i, os.path.join(self.directory, f"worker-{i}.json")) for i in range(count)
        ]
        self.draining = False
        self.failed = False
        self.done = asyncio.Event()

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "proxy", "serve", "--config", self.path, "--workers", "1"]
        for flag, value in (
            ("--listen", self.overrides.listen),
            ("--upstream", self.overrides.upstream),
            ("--log-level", self.overrides.log_level),
        ):
            if value is not None:
                args += [flag, value]
        return args

    async def start(self, worker: Worker) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(worker.status)
        env = {**os.environ, STATUS_ENV: worker.status, METRICS_DIR_ENV: self.metrics_dir}
        worker.process = await asyncio.create_subprocess_exec(*self.command(), env=env)
        worker.started = time.monotonic()
        worker.watcher = asyncio.ensure_future(self.watch(worker, worker.process))

    async def watch(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self.draining:
            if all(w.process is None or w.process.returncode is not None for w in self.workers):
                self.done.set()
            return
        if code == 2 and not worker.ever_ready:
            self.failed = True  # a config or listen problem: restarting will not help
            self.stop()
            return
        if time.monotonic() - worker.started > MAX_BACKOFF:
            worker.backoff = 1.0
        await asyncio.sleep(worker.backoff)
        worker.backoff = min(worker.backoff * 2, MAX_BACKOFF)
        if not self.draining:
            await self.start(worker)

    def forward(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    def stop(self) -> None:
        if not self.draining:
            self.draining = True
            self.forward(signal.SIGTERM)
        if all(w.process is None or w.process.returncode is not None for w in self.workers):
            self.done.set()

    def readiness(self) -> list[str]:
        if self.draining:
            return ["draining"]
        return [item for worker in self.workers for item in worker.waiting_for()]

    def metrics(self) -> bytes:
        """Every worker's series summed, the dead ones' counters and histograms included."""
        live = {w.process.pid for w in self.workers if w.process and w.process.returncode is None}
        snapshots = []
        for path in sorted(Path(self.metrics_dir).glob("metrics-*.db")):
            pid = int(path.stem.removeprefix("metrics-"))
            snapshots.append(Metrics.read(str(path), alive=pid in live))
        return render(snapshots)

    async def run(self) -> int:
        from .app import admin_app

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.forward, signal.SIGHUP)
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        runner = None
        admin = self.config.admin_listen
        if admin is not None:
            runner = web.AppRunner(
                admin_app(self.readiness, self.metrics, lambda: self.config.server_header),
                access_log=None,
            )
            await runner.setup()
            try:
                await web.TCPSite(runner, admin.host, admin.port).start()
            except OSError as error:  # like a busy main port: one line, exit 2
                complain(listen_problem(self.path, "admin_listen", admin, error))
                await runner.cleanup()
                shutil.rmtree(self.directory, ignore_errors=True)
                return 2
        for worker in self.workers:
            await self.start(worker)
        await self.done.wait()
        if runner is not None:
            await runner.cleanup()
        ignore_late_signals(loop)
        shutil.rmtree(self.directory, ignore_errors=True)
        return 2 if self.failed else 0


def supervise(path: str, overrides: Overrides, count: int) -> int:
    """Run `count` workers until SIGTERM/SIGINT; 0 once all have drained."""
    try:
        config = load_with_overrides(path, overrides)
    except ConfigError as error:
        return error.report()

    async def main() -> int:
        return await Supervisor(path, overrides, count, config).run()

    return asyncio.run(main())
