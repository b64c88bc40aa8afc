"""Running the proxy: listeners, signals, reload, drain, readiness (SPEC §7).

    overrides = Overrides(listen="127.0.0.1:8080")
    runtime = Runtime(lambda: load_with_overrides(path, overrides), path)
    exit_code = asyncio.run(runtime.run())      # until SIGTERM/SIGINT

`SIGHUP` reloads the file: a valid config is swapped in atomically (new JWKS URLs fetched
first), an invalid one is logged and the old one keeps serving. `SIGTERM`/`SIGINT` drain:
`/readyz` turns 503, the listener closes, in-flight requests finish (up to
`shutdown_timeout`), idle keep-alive connections close, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from . import __version__
from .app import Proxy, Resources, State, admin_app
from .config import Config, Listen, load, server_context
from .console import Console
from .errors import ConfigError, complain
from .jwk import is_loopback
from .listener import Listener
from .metrics import METRICS_DIR_ENV, RELOADS, Metrics
from .telemetry import Log, Recent
from .token_service import TokenService


@dataclass(frozen=True, slots=True)
class Overrides:
    """Command-line flags that override the file."""

    listen: str | None = None
    upstream: str | None = None
    log_level: str | None = None

    def apply(self, tree: dict[str, Any]) -> None:
        if self.listen is not None:
            tree["listen"] = self.listen
        if self.upstream is not None:
            upstream = tree.get("upstream")
            tree["upstream"] = {
                **(upstream if isinstance(upstream, dict) else {}),
                "url": self.upstream,
            }
        if self.log_level is not None:
            log = tree.get("log")
            tree["log"] = {**(log if isinstance(log, dict) else {}), "level": self.log_level}


def load_with_overrides(path: str, overrides: Overrides) -> Config:
    return load(path, adjust=overrides.apply)


STATUS_ENV = "TOKEN_PROXY_WORKER_STATUS"  # set by the supervisor for each worker


def write_status(path: str, waiting_for: list[str]) -> None:
    """A worker's readiness, replaced atomically for the supervisor to read."""
    temporary = f"{path}.tmp"
    Path(temporary).write_text(json.dumps({"waiting_for": waiting_for}))
    os.replace(temporary, path)


def ignore_late_signals(loop: asyncio.AbstractEventLoop) -> None:
    """Drained: a signal arriving now must not turn the exit 0 into a kill."""
    signums = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
    # Blocked meanwhile: remove_signal_handler restores the default action (a kill) for an
    # instant before SIG_IGN replaces it; a signal held here is discarded when unblocked.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        for signum in signums:
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class _LogBridge(logging.Handler):
    """Python logging into our JSON lines; aiohttp's own texts are dropped (they echo requests)."""

    def __init__(self, log: Log) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"logger": record.name}
        if not record.name.startswith("aiohttp"):
            fields["message"] = record.getMessage()[:500]
        if record.exc_info and record.exc_info[0] is not None:
            fields["error"] = record.exc_info[0].__name__
        level = "error" if record.levelno >= logging.ERROR else "warning"
        self.log.event(level, "python_log", **fields)


def make_socket(listen: Listen, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket (SO_REUSEPORT when several workers share the port)."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((listen.host, listen.port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def listen_problem(label: str, key: str, listen: Listen, error: OSError) -> str:
    """The one line `serve` prints when a listener's port cannot be had."""
    return f"{label}: {key}: cannot listen on {listen} ({error.strerror or error})"


@dataclass(slots=True)
class _Serving:
    """What `Runtime._start` opened and `_drain` closes."""

    config: Config  # the one it started with
    resources: Resources
    listener: Listener
    admin_runner: web.AppRunner | None = None


class Runtime:
    """One serving process: the main listener, the admin listener, signals."""

    def __init__(
        self,
        source: Callable[[], Config],
        label: str,
        *,
        log: Log | None = None,
        metrics: Metrics | None = None,
        admin: bool = True,
        reuse_port: bool = False,
        on_ready: Callable[[], None] | None = None,
        status_file: str | None = None,
    ) -> None:
        self.source = source
        self.label = label
        self.log = log or Log()
        directory = os.environ.get(METRICS_DIR_ENV)  # a worker: the supervisor reads the file
        self.metrics = metrics or Metrics(
            os.path.join(directory, f"metrics-{os.getpid()}.db") if directory else None
        )
        self.serve_admin = admin
        self.reuse_port = reuse_port
        self.on_ready = on_ready
        self.status_file = status_file
        self.draining = False
        self.stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.proxy: Proxy | None = None
        self.tls: ssl.SSLContext | None = None
        self._console_listen_ok = False  # the admin listener started on a loopback address

    def console_enabled(self) -> bool:
        """The dev console answers (SPEC §12): on in the config, behind a loopback listener."""
        proxy = self.proxy
        return self._console_listen_ok and proxy is not None and proxy.state.config.dev_console

    def _sync_console(self) -> None:
        """Recent decisions are recorded only while the console is on (nothing kept else)."""
        if not self.console_enabled():
            self.log.recent = None
        elif self.log.recent is None:
            self.log.recent = Recent()

    def readiness(self) -> list[str]:
        """What keeps /readyz from 200: nothing when loaded, keyed and not draining."""
        if self.draining:
            return ["draining"]
        if self.proxy is None:
            return ["config"]
        return self.proxy.state.ready(self.proxy.clock())

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, drain: the process's exit code."""
        try:
            config = self.source()
        except ConfigError as error:
            return error.report()
        serving = await self._start(config)
        if serving is None:
            return 2
        status = self._serve(config)
        await self.stopped.wait()
        await self._drain(serving, status)
        return 0

    async def _start(self, config: Config) -> _Serving | None:
        """The state, the main listener and the admin listener; None (printed why) when a
        port cannot be had."""
        self.log.set_level(config.log_level)
        logging.getLogger().addHandler(_LogBridge(self.log))
        resources = Resources(self.metrics, self.log)
        state = await resources.prepare(config)
        if config.tls:
            self.tls = server_context(config.tls.cert_file, config.tls.key_file)
        proxy = self.proxy = Proxy(state, resources, scheme="https" if config.tls else "http")
        proxy.service = TokenService(lambda: proxy.state, self.metrics, proxy.clock).handle
        listener = Listener(proxy, config)
        try:
            sock = make_socket(config.listen, self.reuse_port)
        except OSError as error:
            complain(listen_problem(self.label, "listen", config.listen, error))
            await resources.close()
            return None
        await listener.serve(sock, self.tls)
        serving = _Serving(config=config, resources=resources, listener=listener)
        if self.serve_admin and config.admin_listen is not None:
            try:
                serving.admin_runner = await self._start_admin(config.admin_listen, proxy)
            except OSError as error:  # like a busy main port: one line, exit 2
                complain(listen_problem(self.label, "admin_listen", config.admin_listen, error))
                await listener.drain(0)
                await resources.close()
                return None
        return serving

    async def _start_admin(self, listen: Listen, proxy: Proxy) -> web.AppRunner:
        """/healthz, /readyz, /metrics and the dev console; OSError when the port is taken."""
        admin = admin_app(
            self.readiness,
            self.metrics.render,
            lambda: proxy.state.config.server_header,
        )
        # The console's listener is fixed at start: a reload may turn the console off, or on
        # again, but never on behind a non-loopback admin listener.
        self._console_listen_ok = is_loopback(listen.host)
        console = Console(
            state=lambda: proxy.state,
            recent=lambda: self.log.recent,
            clock=proxy.clock,
            enabled=self.console_enabled,
        )
        console.install(admin)
        self._sync_console()
        runner = web.AppRunner(admin, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host=listen.host, port=listen.port).start()
        except OSError:
            await runner.cleanup()
            raise
        return runner

    def _serve(self, config: Config) -> asyncio.Future[None] | None:
        """Signals on, the start line logged, ready: the worker's status task, if any."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopped.set)
        notes = {}
        if config.mode == "authorize" and (config.upstream or config.upstreams):
            notes["note"] = "mode authorize forwards nothing: the upstream settings are ignored"
        self.log.event(
            "info",
            "start",
            version=__version__,
            listen=str(config.listen),
            admin=str(config.admin_listen) if config.admin_listen else None,
            upstream=config.upstream.url if config.upstream else None,
            apps=len(config.apps),
            routes=len(config.routes),
            mode=config.mode,
            **notes,
        )
        # Startup objects (config, compiled routes, imported modules) never die: keep them out
        # of the collector's scans, and collect the young generation less often (measured in
        # bench/: about 10% less CPU per request).
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        if self.on_ready:
            self.on_ready()
        return asyncio.ensure_future(self._report_status()) if self.status_file else None

    async def _drain(self, serving: _Serving, status: asyncio.Future[None] | None) -> None:
        """Not ready, in-flight requests finish (up to shutdown_timeout), everything closes."""
        assert self.proxy is not None  # noqa: S101 - set by _start
        self.draining = True
        # (the line says the start config's timeout; the drain waits the current one's)
        self.log.event(
            "info", "shutdown", phase="draining", timeout=serving.config.shutdown_timeout
        )
        if status is not None:
            status.cancel()
            self._write_status()
        await serving.listener.drain(self.proxy.state.config.shutdown_timeout)
        if serving.admin_runner is not None:
            await serving.admin_runner.cleanup()
        await serving.resources.close()
        ignore_late_signals(asyncio.get_running_loop())
        self.log.event("info", "shutdown", phase="done")
        self.log.flush()  # access lines still buffered (the event above may be below the level)

    async def _report_status(self) -> None:
        """A worker's readiness for its supervisor, rewritten when it changes."""
        while True:
            self._write_status()
            await asyncio.sleep(0.5)

    def _write_status(self) -> None:
        readiness = self.readiness()
        if self.status_file and readiness != getattr(self, "_last_status", None):
            self._last_status = readiness
            with contextlib.suppress(OSError):
                write_status(self.status_file, readiness)

    async def reload(self) -> None:
        """Swap in the file's current config, or keep the old one and log why not."""
        async with self._reload_lock:
            proxy = self.proxy
            if proxy is None or self.draining:
                return
            old = proxy.state.config
            try:
                config = self.source()
            except ConfigError as error:
                self.metrics.count(RELOADS, "error")
                self.log.event("error", "reload", result="error", problems=error.lines())
                return
            state: State = await proxy.resources.prepare(config)
            proxy.swap(state)
            self.log.set_level(config.log_level)
            self._sync_console()
            notes = []
            if config.listen != old.listen or config.admin_listen != old.admin_listen:
                notes.append("listen and admin_listen changes need a restart")
            if config.token.max_length != old.token.max_length:
                notes.append("header size limits are fixed at start")
            if config.limits != old.limits:
                notes.append("limits are fixed at start")
            if self.tls is not None and config.tls is not None:
                try:
                    self.tls.load_cert_chain(config.tls.cert_file, config.tls.key_file)
                except (OSError, ssl.SSLError):
                    notes.append("the new TLS certificate could not be loaded")
            self.metrics.count(RELOADS, "ok")
            self.log.event("info", "reload", result="ok", notes=notes)
