"""Soak: token-proxy at saturation for a long while, with reloads, and nothing may drift.

    .venv/bin/python bench/soak.py                      # 10 minutes, 64 connections
    .venv/bin/python bench/soak.py --seconds 180 --json bench/results/soak.json

Layout (2 cores): `token-proxy serve` (a subprocess) alone on CPU 0; nginx (the upstream, a
fixed 200 "ok") and this script's load generator (asyncio, raw sockets) on CPU 1. Every
connection sends a fixed rotation of valid, expired, bad-signature and missing tokens, each
answer is checked (200, or 401 with the code of its kind) and counted when it has arrived, so
the counts are exact. Every `--reload-every` seconds the config file is rewritten (the HS256
secrets swap places, both still accepted, and the upstream pool is replaced) and `SIGHUP` sent.

Checks, printed as one JSON object (exit 1 when one fails):
  - `token_proxy_requests_total` by outcome equals the requests sent by kind, exactly;
  - every reload was counted ok; no wrong answer and no broken connection;
  - RSS after the warm-up stays within ±5 % of its value at the end of the warm-up;
  - the proxy's open file descriptors do not grow (the last minute against the first after
    the warm-up);
  - one access line per request (the proxy's stdout goes to a file in the work directory).

`--tracemalloc DIR` (a diagnosis, not a measurement: tracing slows the proxy several times)
runs the proxy under tracemalloc and writes a snapshot to DIR every `--snapshot-every` seconds
(SIGUSR1, handled by a wrapper around `python -m proxy`, nothing in proxy/); compare two with
`python bench/soak.py --compare DIR/a.snap DIR/b.snap`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import yaml
from run import LOAD_CPU, PROXY_CPU, PYTHON, ROOT, free_port, nginx_command, spawn, stop, wait_http

SECRET = b"soak-secret-that-is-long-enough-for-hs256!!"
OTHER = b"soak-other-secret-also-long-enough-for-hs256"
# The rotation every connection sends: 7 valid, 1 expired, 1 bad signature, 1 missing.
MIX = ("valid",) * 7 + ("expired", "bad", "missing")
# kind -> (status, SDK code in the body or None, the outcome label token-proxy counts)
EXPECTED: dict[str, tuple[int, int | None, str]] = {
    "valid": (200, None, "forwarded"),
    "expired": (401, 40, "TokenExpired"),
    "bad": (401, 38, "TokenInvalid"),
    "missing": (401, 39, "TokenRequired"),
}
_REQUESTS = re.compile(r"^token_proxy_requests_total\{(.*)\} (\S+)$", re.MULTILINE)
# Runs `python -m proxy ...` with tracemalloc on; SIGUSR1 writes a snapshot to argv[1].
# With --collect a full collection runs first and what it freed goes to gc.log.
TRACE_WRAPPER = """
import gc, os, runpy, signal, sys, time, tracemalloc
out = sys.argv.pop(1)
collect = sys.argv.pop(1) == "collect"
tracemalloc.start(12)
def dump(*_):
    now = time.monotonic()
    if collect:
        traced = tracemalloc.get_traced_memory()[0]
        freed = gc.collect()
        with open(os.path.join(out, "gc.log"), "a") as log:
            print(int(now), gc.get_stats(), "objects freed", freed, "traced bytes freed",
                  traced - tracemalloc.get_traced_memory()[0], file=log)
    tracemalloc.take_snapshot().dump(os.path.join(out, "%d.snap" % now))
signal.signal(signal.SIGUSR1, dump)
sys.argv[0] = "proxy"
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
"""
_RELOADS = re.compile(r'^token_proxy_reloads_total\{result="(\w+)"\} (\S+)$', re.MULTILINE)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def requests_total(text: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for labels, value in _REQUESTS.findall(text):
        outcome = re.search(r'outcome="([^"]*)"', labels)
        if outcome is not None:
            counts[outcome.group(1)] += int(float(value))
    return counts


def reloads_total(text: str) -> Counter[str]:
    return Counter({result: int(float(value)) for result, value in _RELOADS.findall(text)})


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- The servers -------------------------------------------------------------------------------


class Servers:
    """nginx and token-proxy in the work directory; stopped whatever happens."""

    def __init__(
        self, work: Path, python: str, trace: Path | None = None, collect: bool = False
    ) -> None:
        self.work = work
        self.python = python
        self.trace = trace
        self.collect = collect
        self.processes: list[subprocess.Popen[bytes]] = []
        self.upstream_port = free_port()
        self.port, self.admin = free_port(), free_port()
        self.config = work / "proxy.yaml"
        self.stdout = work / "proxy.log"

    def nginx(self) -> None:
        command = nginx_command(self.work, self.upstream_port)
        self.processes.append(spawn(LOAD_CPU, command, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{self.upstream_port}/")

    def write_config(self, version: int) -> None:
        """Version 0 and 1 differ in secret order and upstream timeout: both accept SECRET,
        and each reload retires the other's upstream pool."""
        secrets = [base64.b64encode(s).decode() for s in (SECRET, OTHER)]
        if version % 2:
            secrets.reverse()
        data = {
            "listen": f"127.0.0.1:{self.port}",
            "admin_listen": f"127.0.0.1:{self.admin}",
            "upstream": {
                "url": f"http://127.0.0.1:{self.upstream_port}",
                "timeout": 30 + version % 2,
            },
            "apps": [{"id": "soak", "match": {}, "algorithms": ["HS256"], "secrets": secrets}],
            "routes": [{"path": "/*", "auth": "required"}],
        }
        temporary = self.config.with_suffix(".tmp")
        temporary.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(temporary, self.config)  # a reload never reads half a file

    def proxy(self) -> subprocess.Popen[bytes]:
        self.write_config(0)
        command = [self.python, "-m", "proxy", "serve", "--config", str(self.config)]
        if self.trace is not None:
            collect = "collect" if self.collect else "keep"
            command[1:3] = ["-c", TRACE_WRAPPER, str(self.trace), collect]
        with self.stdout.open("wb") as out:
            process = spawn(PROXY_CPU, command, stdout=out, cwd=ROOT)
        self.processes.append(process)
        # tracing makes the imports several times slower
        wait_http(f"http://127.0.0.1:{self.admin}/readyz", 15 if self.trace is None else 120)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop(process, timeout=30)


# --- The load -----------------------------------------------------------------------------------


def request_bytes(token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET /v1/things/1 HTTP/1.1\r\nHost: soak\r\n{auth}\r\n".encode()


def make_requests(seconds: float) -> dict[str, bytes]:
    now = int(time.time())
    valid = {"appId": "soak", "sub": "user-1", "iat": now, "exp": now + int(seconds) + 3600}
    expired = {**valid, "iat": now - 7200, "exp": now - 3600}
    return {
        "valid": request_bytes(jwt.encode(valid, SECRET, algorithm="HS256")),
        "expired": request_bytes(jwt.encode(expired, SECRET, algorithm="HS256")),
        "bad": request_bytes(jwt.encode(valid, b"x" * 44, algorithm="HS256")),
        "missing": request_bytes(None),
    }


@dataclass
class Load:
    requests: dict[str, bytes]
    sent: Counter[str] = field(default_factory=Counter)
    wrong: Counter[str] = field(default_factory=Counter)  # kind:status of unexpected answers
    broken: int = 0  # connections that failed mid-request (the count is then not exact)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at + 2)
        return status, await reader.readexactly(int(lower[at + 17 : end]))
    body = b""
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            body += (await reader.readexactly(size + 2))[:size]
            if size == 0:
                return status, body
    return status, body


async def connection(load: Load, host: str, port: int, number: int, stop: asyncio.Event) -> None:
    index = number  # connections start at different places in the rotation
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            load.broken += 1
            await asyncio.sleep(0.1)
            continue
        try:
            while not stop.is_set():
                kind = MIX[index % len(MIX)]
                index += 1
                writer.write(load.requests[kind])
                status, body = await read_answer(reader)
                want, code, _ = EXPECTED[kind]
                if status != want or (code is not None and b'"code":%d' % code not in body):
                    load.wrong[f"{kind}:{status}"] += 1
                load.sent[kind] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            load.broken += 1  # this request may or may not have been counted by the proxy
        finally:
            writer.close()


@dataclass
class Samples:
    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)


async def sample(
    pid: int, samples: Samples, started: float, stop: asyncio.Event, snapshot_every: float | None
) -> None:
    snapshot_at = 0.0
    while not stop.is_set():
        now = time.monotonic() - started
        samples.times.append(now)
        samples.rss.append(rss_kb(pid))
        samples.fds.append(fd_count(pid))
        if snapshot_every is not None and now >= snapshot_at:
            os.kill(pid, signal.SIGUSR1)
            snapshot_at = now + snapshot_every
        await asyncio.sleep(1)


async def reload_every(
    servers: Servers, process: subprocess.Popen[bytes], every: float, stop: asyncio.Event
) -> int:
    sent = 0
    while True:
        try:
            await asyncio.wait_for(stop.wait(), every)
            return sent
        except TimeoutError:
            pass
        sent += 1
        servers.write_config(sent)
        process.send_signal(signal.SIGHUP)


async def drive(
    servers: Servers, process: subprocess.Popen[bytes], args: argparse.Namespace
) -> tuple[Load, Samples, int, float]:
    load = Load(make_requests(args.seconds))
    samples = Samples()
    stop = asyncio.Event()
    started = time.monotonic()
    tasks = [
        asyncio.ensure_future(connection(load, "127.0.0.1", servers.port, n, stop))
        for n in range(args.connections)
    ]
    every = args.snapshot_every if args.tracemalloc is not None else None
    sampler = asyncio.ensure_future(sample(process.pid, samples, started, stop, every))
    reloader = asyncio.ensure_future(reload_every(servers, process, args.reload_every, stop))
    await asyncio.sleep(args.seconds)
    stop.set()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    await sampler
    return load, samples, await reloader, elapsed


# --- The verdict -------------------------------------------------------------------------------


def within(values: list[int], baseline: float, fraction: float) -> bool:
    return all(abs(value - baseline) <= baseline * fraction for value in values)


def verdict(
    args: argparse.Namespace,
    load: Load,
    samples: Samples,
    reloads_sent: int,
    elapsed: float,
    before: str,
    after: str,
    access_lines: int,
) -> dict[str, Any]:
    counted = requests_total(after)
    counted.subtract(requests_total(before))
    counted = +counted  # drop zeros
    expected = Counter({EXPECTED[kind][2]: n for kind, n in load.sent.items()})
    reloads = reloads_total(after)
    reloads.subtract(reloads_total(before))
    warm = [i for i, t in enumerate(samples.times) if t >= args.warmup]
    rss_after = [samples.rss[i] for i in warm]
    fds_after = [samples.fds[i] for i in warm]
    baseline = rss_after[0] if rss_after else 0
    window = max(1, min(60, len(fds_after) // 3))
    fd_first = statistics.median(fds_after[:window]) if fds_after else 0
    fd_last = statistics.median(fds_after[-window:]) if fds_after else 0
    total = sum(load.sent.values())
    checks = {
        "requests_total_equals_mix": counted == expected,
        "every_answer_right": not load.wrong,
        "no_broken_connection": load.broken == 0,
        "every_reload_ok": reloads["ok"] == reloads_sent and reloads["error"] == 0,
        "rss_within_5_percent": bool(rss_after) and within(rss_after, baseline, 0.05),
        "no_fd_growth": bool(fds_after) and fd_last <= fd_first + 2,
        "one_access_line_per_request": access_lines == total,
    }
    return {
        "ok": all(checks.values()),
        "checks": checks,
        "seconds": round(elapsed, 1),
        "connections": args.connections,
        "requests": dict(load.sent),
        "total": total,
        "requests_per_second": round(total / elapsed),
        "requests_total": dict(counted),
        "wrong_answers": dict(load.wrong),
        "broken_connections": load.broken,
        "reloads": {"sent": reloads_sent, **dict(reloads)},
        "rss_kb": {
            "warmup_seconds": args.warmup,
            "start": samples.rss[0] if samples.rss else None,
            "after_warmup": baseline,
            "min": min(rss_after, default=None),
            "max": max(rss_after, default=None),
            "last": rss_after[-1] if rss_after else None,
        },
        "fds": {
            "after_warmup_median": fd_first,
            "last_median": fd_last,
            "min": min(fds_after, default=None),
            "max": max(fds_after, default=None),
        },
        "access_lines": access_lines,
    }


def count_access_lines(path: Path) -> int:
    lines = 0
    with path.open("rb") as stream:
        for line in stream:
            if b'"event":"request"' in line:
                lines += 1
    return lines


def compare(old: Path, new: Path, top: int = 25) -> None:
    """What grew between two snapshots, by the traceback of its allocation."""
    import tracemalloc

    first = tracemalloc.Snapshot.load(str(old))
    second = tracemalloc.Snapshot.load(str(new))
    drop = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = second.filter_traces(drop).compare_to(first.filter_traces(drop), "traceback")
    total = sum(stat.size_diff for stat in stats)
    print(f"{new.name} against {old.name}: {total / 1024:+.1f} KiB traced")
    for stat in stats[:top]:
        print(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks")
        for line in stat.traceback.format(limit=6):
            print("    " + line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--reload-every", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=None, help="default: a fifth, <= 60 s")
    parser.add_argument("--python", default=PYTHON, help="the Python that runs token-proxy")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--tracemalloc", type=Path, help="snapshots of the proxy go here")
    parser.add_argument("--snapshot-every", type=float, default=60)
    parser.add_argument("--collect", action="store_true", help="gc.collect() before each")
    parser.add_argument("--compare", type=Path, nargs=2, help="two snapshots: what grew")
    args = parser.parse_args()
    if args.compare is not None:
        compare(*args.compare)
        return 0
    if args.warmup is None:
        args.warmup = min(60.0, args.seconds / 5)
    for tool in ("nginx", "taskset"):
        if shutil.which(tool) is None:
            print(f"soak: {tool} is not installed (bench/setup)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="token-proxy-soak-"))
    if args.tracemalloc is not None:
        args.tracemalloc = args.tracemalloc.resolve()
        args.tracemalloc.mkdir(parents=True, exist_ok=True)
    servers = Servers(work, args.python, args.tracemalloc, args.collect)
    try:
        servers.nginx()
        process = servers.proxy()
        os.sched_setaffinity(0, {int(LOAD_CPU)})  # the load shares CPU 1 with nginx
        metrics = f"http://127.0.0.1:{servers.admin}/metrics"
        before = fetch(metrics)
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        load, samples, reloads_sent, elapsed = runner(drive(servers, process, args))
        time.sleep(1)  # the last access lines (written within 50 ms) and reload
        after = fetch(metrics)
        servers.stop()
        summary = verdict(
            args, load, samples, reloads_sent, elapsed, before, after,
            count_access_lines(servers.stdout),
        )  # fmt: skip
    finally:
        servers.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
