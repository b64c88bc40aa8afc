"""Benchmark token-proxy against HAProxy 2.6 `jwt_verify` on this machine.

    bench/setup                          # apt: haproxy nginx wrk valgrind; the venvs
    .venv/bin/python bench/run.py        # --rounds 3 --seconds 10; writes bench/results/

token-proxy runs as the image ships it, compiled by mypyc (bench/.compiled, which bench/setup
builds); the "interpreted" case runs the same code as plain Python (the editable .venv).

Layout (2 cores): the proxy under test on CPU 0; nginx (the upstream) and wrk (1 thread,
64 connections) on CPU 1. Every case gets the same request, GET /x with a valid token (RS256
for the RS256 cases, HS256 otherwise; the passthroughs ignore it). Every case is
checked first (valid 200, bad signature 401, expired 401, missing 401), then measured in
interleaved rounds (every other one backwards, compared cases side by side); ratios are taken
inside each round and the report quotes medians. Proxy CPU per request comes from /proc
(utime + stime). The cost targets, and an RS256 cache hit against an HS256 one (PAIRS), are
measured once more with both of their cases loaded at the same time on CPU 0, one wrk each:
the machine's drift cancels (extras.paired).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")  # editable install: plain Python
COMPILED = str(ROOT / "bench" / ".compiled" / "bin" / "python")  # the mypyc build
PROXY_CPU, LOAD_CPU = "0", "1"
HS_SECRET = "bench-secret-that-is-long-enough-for-hs256!"
TICK = os.sysconf("SC_CLK_TCK")
# Measured paired as well: (the case without, the case with) what is costed.
PAIRS = {
    "token check": ("passthrough", "HS256 cache"),
    "access log": ("HS256 cache", "HS256 cache + access log"),
    # not a target: whether a cache hit on the longer RS256 token costs more than on HS256's
    "RS256 hit": ("HS256 cache", "RS256 cache"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.close()
        return int(error.code)


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of `pids` so far."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        user += int(fields[11])  # utime
        system += int(fields[12])  # stime
    return user / TICK, system / TICK


def descendants(pid: int) -> list[int]:
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            found.extend(descendants(int(child)))
    return found


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    tokens: dict[str, str | None] = field(default_factory=dict)
    load_token: str | None = None  # sent with every measured request

    def pids(self) -> list[int]:
        return descendants(self.process.pid)

    def stop(self) -> None:
        stop(self.process)


def spawn(cpu: str, command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """`command` pinned to `cpu` (the layout: the proxy alone on one core)."""
    return subprocess.Popen(["taskset", "-c", cpu, *command], **kwargs)


def stop(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM (the proxy drains, nginx quits), then SIGKILL after `timeout`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()


def nginx_command(work: Path, port: int) -> list[str]:
    """The upstream of every bench: nginx answering a fixed 200 "ok" on `port`, keep-alive
    unbounded, its files in `work`."""
    (work / "nginx").mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 0;
        location / {{ return 200 "ok"; }}
    }}
}}
""")
    return ["nginx", "-c", str(conf), "-p", str(work), "-g", "daemon off;"]


class Bench:
    def __init__(self, work: Path, seconds: int, connections: int) -> None:
        self.work = work
        self.seconds = seconds
        self.connections = connections
        self.servers: list[Server] = []
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_private = key
        (work / "rsa.pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        now = int(time.time())
        claims = {"appId": "bench", "sub": "user-1", "iat": now, "exp": now + 7200}
        expired = {**claims, "iat": now - 7200, "exp": now - 3600}
        self.tokens = {
            "HS256": {
                "valid": jwt.encode(claims, HS_SECRET, algorithm="HS256"),
                "bad": jwt.encode(claims, HS_SECRET + "x", algorithm="HS256"),
                "expired": jwt.encode(expired, HS_SECRET, algorithm="HS256"),
                "missing": None,
            },
            "RS256": {
                "valid": jwt.encode(claims, key, algorithm="RS256"),
                "bad": jwt.encode(
                    claims,
                    rsa.generate_private_key(public_exponent=65537, key_size=2048),
                    algorithm="RS256",
                ),
                "expired": jwt.encode(expired, key, algorithm="RS256"),
                "missing": None,
            },
        }

    # --- servers ---------------------------------------------------------------------------

    def spawn(self, name: str, cpu: str, command: list[str], url: str, **kwargs: Any) -> Server:
        log = (self.work / f"{name}.log").open("wb")
        process = spawn(cpu, command, stdout=log, stderr=log, **kwargs)
        server = Server(name, url, process)
        self.servers.append(server)
        wait_http(url + "/healthz" if name != "nginx" else url)
        return server

    def nginx(self) -> Server:
        port = free_port()
        return self.spawn(
            "nginx", LOAD_CPU, nginx_command(self.work, port), f"http://127.0.0.1:{port}"
        )

    def haproxy(self, alg: str | None, upstream: str) -> Server:
        """HAProxy verifying `alg` on every request (None: no JWT rules, a plain proxy)."""
        port = free_port()
        key = HS_SECRET if alg == "HS256" else str(self.work / "rsa.pub")
        verify = f'var(txn.bearer),jwt_verify(txn.alg,"{key}")'
        rules = f"""
    http-request deny deny_status 401 unless {{ req.hdr(authorization) -m found }}
    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
    http-request deny deny_status 401 unless {{ var(txn.alg) -m str {alg} }}
    http-request deny deny_status 401 unless {{ {verify} -m int 1 }}
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request set-var(txn.now) date()
    http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}"""
        name = f"haproxy-{alg or 'passthrough'}"
        conf = self.work / f"{name}.cfg"
        up = upstream.split("//")[1]
        conf.write_text(f"""
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{port}
    http-request return status 200 if {{ path /healthz }}{rules if alg else ""}
    default_backend be
backend be
    http-reuse always
    server up {up} maxconn 512
""")
        server = self.spawn(
            name, PROXY_CPU, ["haproxy", "-f", str(conf), "-db"], f"http://127.0.0.1:{port}"
        )
        if alg:
            server.tokens = self.tokens[alg]
        # The passthrough gets the same request bytes too.
        server.load_token = self.tokens[alg or "HS256"]["valid"]
        return server

    def proxy_config(
        self,
        name: str,
        port: int,
        upstream: str,
        alg: str | None,
        *,
        cache: bool = True,
        access: bool = False,
        admin: bool = False,
    ) -> Path:
        """A token-proxy config file: one app for `alg` (None: passthrough, `auth: none`)."""
        app: dict[str, Any] = {"id": "bench", "match": {"claim": "appId"}, "algorithms": [alg]}
        if alg == "HS256":
            app.update(secret_encoding="raw", secrets=[HS_SECRET])
        elif alg == "RS256":
            app.update(public_keys=[str(self.work / "rsa.pub")])
        config = {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{free_port()}" if admin else None,
            "log": {"access": access, "level": "warning"},
            "upstream": {"url": upstream},
            "token": {"cache_size": 10000 if cache else 0},
            "apps": [app] if alg else [],
            "routes": [{"path": "/healthz", "auth": "none"}]
            + ([{"path": "/*"}] if alg else [{"path": "/*", "auth": "none"}]),
        }
        path = self.work / f"{name}.yaml"
        path.write_text(json.dumps(config))
        return path

    def token_proxy(
        self,
        name: str,
        upstream: str,
        alg: str | None,
        *,
        cache: bool = True,
        access: bool = False,
        workers: int = 1,
        python: str = COMPILED,
    ) -> Server:
        port = free_port()
        path = self.proxy_config(
            name, port, upstream, alg, cache=cache, access=access, admin=workers > 1
        )
        command = [python, "-m", "proxy", "serve", "--config", str(path)]
        if workers > 1:
            command += ["--workers", str(workers)]
        cpu = PROXY_CPU if workers == 1 else f"{PROXY_CPU},{LOAD_CPU}"
        # cwd: not ROOT, whose proxy/ sources `-m proxy` would import instead of the install
        server = self.spawn(name, cpu, command, f"http://127.0.0.1:{port}", cwd=self.work)
        if alg:
            server.tokens = self.tokens[alg]
        # Passthrough gets the same request bytes too, so that the difference is the check.
        server.load_token = self.tokens[alg or "HS256"]["valid"]
        if workers > 1:
            time.sleep(2)  # both workers up
        return server

    def streaming_upstream(self) -> Server:
        """The 1 GB measurement's upstream (bench/streaming_upstream.py), beside nginx."""
        port = free_port()
        return self.spawn(
            "streaming-upstream",
            LOAD_CPU,
            [PYTHON, str(ROOT / "bench" / "streaming_upstream.py"), str(port)],
            f"http://127.0.0.1:{port}",
        )

    # --- measuring -------------------------------------------------------------------------

    def check(self, server: Server) -> None:
        """valid 200, bad signature 401, expired 401, missing 401 (or 200 without tokens)."""
        if not server.tokens:
            assert status(server.url + "/x", None) == 200, server.name
            return
        expected = {"valid": 200, "bad": 401, "expired": 401, "missing": 401}
        for kind, code in expected.items():
            got = status(server.url + "/x", server.tokens[kind])
            assert got == code, f"{server.name}: {kind} token gave {got}, expected {code}"

    def wrk(self, server: Server, connections: int | None = None) -> dict[str, float]:
        return self.load([server], connections or self.connections)[0]

    def wrk_command(self, server: Server, connections: int) -> list[str]:
        token = server.load_token
        header = ["-H", f"Authorization: Bearer {token}"] if token else []
        return ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}",
                f"-d{self.seconds}s", "--latency", *header, server.url + "/x"]  # fmt: skip

    def load(self, servers: list[Server], connections: int) -> list[dict[str, float]]:
        """One wrk per server, all at the same time, sharing `connections` between them."""
        pids = [server.pids() for server in servers]
        before = [cpu_seconds(each) for each in pids]
        each_connections = connections // len(servers)
        runs = [
            subprocess.Popen(
                self.wrk_command(server, each_connections), stdout=subprocess.PIPE, text=True
            )
            for server in servers
        ]
        outputs = [run.communicate()[0] for run in runs]
        results = []
        for server, run, output, first, each in zip(
            servers, runs, outputs, before, pids, strict=True
        ):
            if run.returncode != 0:
                raise RuntimeError(f"{server.name}: wrk exited with {run.returncode}")
            after = cpu_seconds(each)
            user, system = after[0] - first[0], after[1] - first[1]
            requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
            errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
            if errors:
                raise RuntimeError(f"{server.name}: {errors.group(1)} failed responses")
            results.append({
                "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
                "p50_ms": _latency(output, "50%"),
                "p99_ms": _latency(output, "99%"),
                "cpu_us": (user + system) / requests * 1e6,
                "sys_us": system / requests * 1e6,  # the kernel's share: socket calls and polling
            })  # fmt: skip
        return results

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()


def _latency(output: str, label: str) -> float:
    found = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", output)
    assert found is not None
    value, unit = float(found.group(1)), found.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


async def streaming_rss(proxy: Server, size: int) -> dict[str, float]:
    """RSS growth of a proxy while `size` bytes go up and come down through it."""
    import aiohttp

    pid = proxy.process.pid

    def rss(field: str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    async def body() -> Any:
        chunk = b"u" * (1 << 20)
        for _ in range(size >> 20):
            yield chunk

    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/upload", data=b"warm") as response:
            await response.read()
        baseline = rss("VmRSS")
        started = time.monotonic()
        async with session.post(proxy.url + "/upload", data=body()) as response:
            assert int(await response.text()) == size
        up_seconds = time.monotonic() - started
        started = time.monotonic()
        received = 0
        async with session.get(proxy.url + "/big") as response:
            async for chunk in response.content.iter_chunked(1 << 20):
                received += len(chunk)
        down_seconds = time.monotonic() - started
        assert received == size, received
        return {
            "rss_growth_mb": (rss("VmHWM") - baseline) / 1e6,
            "upload_mb_s": size / up_seconds / 1e6,
            "download_mb_s": size / down_seconds / 1e6,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--only", action="append", help="a case name (repeatable; HAProxy's always run)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    for tool in ("haproxy", "nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing; run bench/setup", file=sys.stderr)
            return 2
    if not Path(COMPILED).exists():
        print("bench: the compiled build is missing; run bench/setup", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="token-proxy-bench-"))
    bench = Bench(work, args.seconds, args.connections)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        nginx = bench.nginx()
        up = nginx.url
        # Cases compared with each other run next to each other, and every other round runs
        # backwards: the machine's speed drifts, and a ratio taken across a few seconds and
        # both ways round drifts least.
        cases: dict[str, Callable[[], Server]] = {
            "haproxy passthrough": lambda: bench.haproxy(None, up),
            "passthrough": lambda: bench.token_proxy("passthrough", up, None),
            "haproxy HS256": lambda: bench.haproxy("HS256", up),
            "HS256 cache": lambda: bench.token_proxy("hs-cache", up, "HS256"),
            "HS256 cache + access log": lambda: bench.token_proxy(
                "hs-log", up, "HS256", access=True
            ),
            "HS256 cache, interpreted": lambda: bench.token_proxy(
                "hs-interpreted", up, "HS256", python=PYTHON
            ),
            "HS256 cache, 2 workers": lambda: bench.token_proxy(
                "hs-workers", up, "HS256", workers=2
            ),
            "HS256 no cache": lambda: bench.token_proxy("hs-nocache", up, "HS256", cache=False),
            "haproxy RS256": lambda: bench.haproxy("RS256", up),
            "RS256 cache": lambda: bench.token_proxy("rs-cache", up, "RS256"),
            "RS256 no cache": lambda: bench.token_proxy("rs-nocache", up, "RS256", cache=False),
        }
        if args.only:
            wanted = set(args.only)
            cases = {k: v for k, v in cases.items() if k in wanted or k.startswith("haproxy")}
        servers = {name: make() for name, make in cases.items()}
        for server in servers.values():
            bench.check(server)
        for name in servers:
            results[name] = []
        for round_index in range(args.rounds):
            order = list(servers.items())
            for name, server in order if round_index % 2 == 0 else reversed(order):
                result = bench.wrk(server)
                results[name].append(result)
                print(
                    f"round {round_index + 1} {name:28} {result['rps']:9.0f} req/s "
                    f"p50 {result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms "
                    f"cpu {result['cpu_us']:.1f} us/req (sys {result['sys_us']:.1f})",
                    flush=True,
                )
        # Each pair again, its two cases loaded at the same time on the one core: no drift
        # between them (sharing the core adds the same switching cost to both).
        paired: dict[str, list[tuple[float, float]]] = {}
        for label, (plain, costed) in PAIRS.items():
            if plain in servers and costed in servers:
                for round_index in range(args.rounds):
                    a, b = bench.load([servers[plain], servers[costed]], bench.connections)
                    paired.setdefault(label, []).append((a["cpu_us"], b["cpu_us"]))
                    print(
                        f"paired round {round_index + 1} {label:12} {a['cpu_us']:.1f} -> "
                        f"{b['cpu_us']:.1f} us/req",
                        flush=True,
                    )
        extras: dict[str, Any] = {"paired": {
            label: {
                "rounds": pairs,
                "cost": statistics.median(b / a - 1 for a, b in pairs),
                "added_us": statistics.median(b - a for a, b in pairs),
            }
            for label, pairs in paired.items()
        }}  # fmt: skip
        if "HS256 cache" in servers:
            direct = Server("nginx-direct", nginx.url, nginx.process)
            one = [bench.wrk(servers["HS256 cache"], connections=1) for _ in range(args.rounds)]
            base = [bench.wrk(direct, connections=1) for _ in range(args.rounds)]
            extras["added_latency_p50_ms"] = statistics.median(
                a["p50_ms"] - b["p50_ms"] for a, b in zip(one, base, strict=True)
            )
        if not args.only or "streaming" in args.only:
            big = bench.streaming_upstream()
            streamer = bench.token_proxy("streaming", big.url, None)
            extras["streaming_1GB"] = asyncio.run(streaming_rss(streamer, 1 << 30))
    finally:
        bench.stop()
    report = summarize(results, extras)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps({"raw": results, **report}, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    plot(report, out / "latest.png")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def summarize(results: dict[str, list[dict[str, float]]], extras: dict[str, Any]) -> dict[str, Any]:
    """Medians per case, and ratios taken inside each round, then their medians."""
    table = {}
    for name, rounds in results.items():
        reference = (
            "haproxy RS256"
            if "RS256" in name
            else "haproxy passthrough"
            if "passthrough" in name
            else "haproxy HS256"
        )
        ratios = [
            r["rps"] / results[reference][i]["rps"]
            for i, r in enumerate(rounds)
            if reference in results
        ]
        table[name] = {
            "rps": statistics.median(r["rps"] for r in rounds),
            "p50_ms": statistics.median(r["p50_ms"] for r in rounds),
            "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
            "cpu_us": statistics.median(r["cpu_us"] for r in rounds),
            "sys_us": statistics.median(r["sys_us"] for r in rounds),
            f"x_{reference.replace(' ', '_')}": statistics.median(ratios) if ratios else None,
        }
    derived: dict[str, Any] = {}

    def ratio(a: str, b: str, key: str = "rps") -> float | None:
        if a not in results or b not in results:
            return None
        return statistics.median(
            x[key] / y[key] for x, y in zip(results[a], results[b], strict=True)
        )

    derived["HS256 cache / haproxy HS256"] = ratio("HS256 cache", "haproxy HS256")
    derived["HS256 cache, interpreted / haproxy HS256"] = ratio(
        "HS256 cache, interpreted", "haproxy HS256"
    )
    derived["passthrough / haproxy passthrough"] = ratio("passthrough", "haproxy passthrough")
    derived["p99 HS256 cache / haproxy HS256"] = ratio("HS256 cache", "haproxy HS256", "p99_ms")
    derived["RS256 cache / haproxy RS256"] = ratio("RS256 cache", "haproxy RS256")
    derived["cache-hit check cost vs passthrough (cpu)"] = (
        None
        if ratio("HS256 cache", "passthrough", "cpu_us") is None
        else ratio("HS256 cache", "passthrough", "cpu_us") - 1  # type: ignore[operator]
    )
    derived["access log cost (cpu)"] = (
        None
        if ratio("HS256 cache + access log", "HS256 cache", "cpu_us") is None
        else ratio("HS256 cache + access log", "HS256 cache", "cpu_us") - 1  # type: ignore[operator]
    )
    derived["2 workers cpu/req vs 1"] = ratio("HS256 cache, 2 workers", "HS256 cache", "cpu_us")
    derived["compiled cpu/req vs interpreted"] = ratio(
        "HS256 cache", "HS256 cache, interpreted", "cpu_us"
    )

    return {"table": table, "derived": derived, "extras": extras}


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(report["table"])
    rps = [report["table"][n]["rps"] for n in names]
    figure, axis = plt.subplots(figsize=(10, 5))
    bars = axis.barh(
        names, rps, color=["#888" if n.startswith("haproxy") else "#36c" for n in names]
    )
    axis.invert_yaxis()
    axis.set_xlabel("requests/s (median of rounds; proxy on 1 core, wrk 1 thread, 64 connections)")
    for bar, value in zip(bars, rps, strict=True):
        axis.text(
            bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:,.0f}", va="center"
        )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
