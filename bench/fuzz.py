"""Raw HTTP fuzzing of a running `token-proxy serve` (issue 17, "the harness"): ≥ 1,000,000 inputs.

    .venv/bin/python bench/fuzz.py                         # 1,000,000 inputs, 256 connections
    .venv/bin/python bench/fuzz.py --inputs 20000 --seconds 120

Starts nginx (a fixed `ok` answer that echoes nothing) as the upstream and the proxy as a
subprocess, then sends mutated requests, each on its own connection, half-closed after the
bytes so a request waiting for more body ends at once. The inputs are made by a fast seeded
mutator (no hypothesis: a million inputs must cost minutes, not hours): requests with tokens
in every source (header, query, cookie) and a marker in the path and a header, then byte
flips, dictionary inserts (framing headers, CR/LF/NUL, escapes, long runs), deletions,
duplications, spliced header lines and numbers swapped for boundary values.

A failure is any of: an answer with status 500, the marker or a piece of a token in any
answer, the proxy process gone, or a normal request not answered 200 (checked every 10,000
inputs and at the end). Prints the count, the failures (inputs with tokens blanked) and the
proxy's RSS after warm-up and at the end; exits 1 on any failure or when RSS grew by more than
`--rss-growth-mb`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.nginx import start_nginx

SECRET = b"f" * 40
MARKER = "ZqXMarkerTokenQv"  # in the path and a header: never in an answer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_text(port: int, upstream: str) -> str:
    secret = base64.b64encode(SECRET).decode()
    return f"""
listen: "127.0.0.1:{port}"
admin_listen: null
log: {{level: error, access: false}}
upstream: {{url: "{upstream}"}}
token:
  sources: ["header:Authorization", "query:access_token", "cookie:tok"]
  max_length: 12000
apps:
  - id: app-1
    match: {{claim: appId}}
    algorithms: [HS256]
    secrets: ["{secret}"]
routes:
  - {{path: "/open/*", auth: none}}
  - {{path: "/opt/*", auth: optional}}
  - path: "/v1/users/{{userId}}/*"
    methods: [GET, POST]
    bind: {{userId: path.userId}}
  - {{path: "/*", auth: required}}
"""


def token(**claims: object) -> str:
    now = int(time.time())
    payload: dict[str, object] = {"iat": now, "exp": now + 86400, "appId": "app-1"}
    payload.update(claims)
    return jwt.encode(payload, SECRET, algorithm="HS256")


class Corpus:
    """Seed requests and the mutator; everything seeded, so a run can be repeated."""

    def __init__(self) -> None:
        self.token = token(userId="42", sub="user-42")
        long_token = token(userId="42", pad="p" * 9000)  # over 8190: the long-line limits
        self.secrets = [self.token, long_token, MARKER]
        t = self.token.encode()
        m = MARKER.encode()
        host = b"Host: fuzz.example\r\n"
        self.seeds: list[bytes] = [
            b"GET /v1/users/42/x?access_token=" + t + b" HTTP/1.1\r\n" + host + b"\r\n",
            b"GET /open/"
            + m
            + b" HTTP/1.1\r\n"
            + host
            + b"Authorization: Bearer "
            + t
            + b"\r\n\r\n",
            b"POST /api/items HTTP/1.1\r\n"
            + host
            + b"Authorization: Bearer "
            + t
            + b"\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world",
            b"POST /open/up HTTP/1.1\r\n"
            + host
            + b"Transfer-Encoding: chunked\r\nX-Note: "
            + m
            + b"\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
            b"PUT /opt/x HTTP/1.1\r\n"
            + host
            + b"Cookie: a=1; tok="
            + t
            + b"\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /open/ws HTTP/1.1\r\n" + host + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            b"GET /open/a HTTP/1.0\r\nConnection: keep-alive\r\nX-Note: " + m + b"\r\n\r\n"
            b"GET /open/b HTTP/1.0\r\n\r\n",
            b"GET http://fuzz.example/open/abs?q=" + m + b" HTTP/1.1\r\n" + host + b"\r\n",
            b"OPTIONS /api/x HTTP/1.1\r\n" + host + b"Origin: https://a.example\r\n"
            b"Access-Control-Request-Method: POST\r\n\r\n",
            b"POST /open/gz HTTP/1.1\r\n"
            + host
            + b"Content-Encoding: gzip\r\nContent-Length: 20\r\n"
            b"\r\n\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03KLJ\x06\x00\xc2A$5\x03\x00",
            b"GET /api/x?access_token=" + long_token.encode() + b" HTTP/1.1\r\n" + host + b"\r\n",
            b"GET /api/x HTTP/1.1\r\n"
            + host
            + b"Authorization: Bearer "
            + long_token.encode()
            + b"\r\n\r\n",
            b"DELETE /v1/users/43/x HTTP/1.1\r\n"
            + host
            + b"Authorization: bearer  "
            + t
            + b"\r\nX-Auth-User-Id: 1\r\nX_Auth_User_Id: 1\r\n\r\n",
        ]
        self.words: list[bytes] = [
            b"\r\n",
            b"\n",
            b"\r",
            b" ",
            b"\t",
            b"\x00",
            b"\x7f",
            b"\xff",
            b"\xc0\xaf",
            b":",
            b";",
            b",",
            b"%",
            b"%2f",
            b"%2F",
            b"%5c",
            b"%00",
            b"%2e%2e",
            b"%zz",
            b"..",
            b"/..",
            b"/",
            b"\\",
            b"?",
            b"#",
            b"&",
            b"=",
            b"*",
            b'"',
            b"chunked",
            b"HTTP/1.1",
            b"HTTP/1.0",
            b"HTTP/2.0",
            b"HTTP/0.9",
            b"PRI * HTTP/2.0",
            b"\r\n\r\n",
            b"0\r\n\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: gzip, chunked\r\n",
            b"Content-Length: 0\r\n",
            b"Content-Length: 5\r\n",
            b"Content-Length: 18446744073709551615\r\n",
            b"Content-Length: -1\r\n",
            b"Expect: 100-continue\r\n",
            b"Connection: close\r\n",
            b"Connection: Upgrade\r\n",
            b"Upgrade: h2c\r\n",
            b"X-Auth-User-Id: 1\r\n",
            b"X_Auth_App_Id: admin\r\n",
            b"X-Original-URL: /admin\r\n",
            b"Authorization: Bearer\t",
            b"Bearer ",
            b"Basic ",
            b"Host: other\r\n",
            b"A" * 9000,
            b"/" * 300,
            b"%41" * 100,
            "é".encode(),
        ]
        self.numbers = [
            b"0",
            b"1",
            b"-1",
            b"+5",
            b"0x5",
            b"00005",
            b"4294967296",
            b"9223372036854775807",
            b"9223372036854775808",
            b"18446744073709551615",
            b"99999999999999999999999",
        ]

    def mutate(self, rng: random.Random) -> bytes:
        data = bytearray(rng.choice(self.seeds))
        for _ in range(rng.randint(1, 4)):
            self._one(rng, data)
        if rng.random() < 0.2:  # a second request behind the first
            data += rng.choice(self.seeds)
        return bytes(data)

    def _one(self, rng: random.Random, data: bytearray) -> None:
        size = len(data)
        at = rng.randrange(size + 1)
        op = rng.randrange(9)
        if op == 0 and size:
            data[min(at, size - 1)] = rng.randrange(256)
        elif op in (1, 2):
            data[at:at] = rng.choice(self.words)
        elif op == 3:
            del data[at : at + rng.randint(1, 16)]
        elif op == 4:
            span = bytes(data[at : at + rng.randint(1, 64)])
            data[at:at] = span
        elif op == 5:  # a header line of another seed, or a dictionary one, after the first line
            line = rng.choice([w for w in self.words if w.endswith(b"\r\n")])
            first = data.find(b"\r\n")
            if first >= 0:
                data[first + 2 : first + 2] = line
        elif op == 6:  # a number swapped for a boundary value
            numbers = list(re.finditer(rb"\d+", bytes(data)))
            if numbers:
                found = rng.choice(numbers)
                data[found.start() : found.end()] = rng.choice(self.numbers)
        elif op == 7:  # case changes: header names, `chunked`, `Bearer`
            end = min(size, at + rng.randint(1, 32))
            data[at:end] = bytes(data[at:end]).swapcase()
        else:  # the first line's parts reordered or doubled
            first = data.find(b"\r\n")
            if first > 0:
                parts = bytes(data[:first]).split(b" ")
                rng.shuffle(parts) if rng.random() < 0.5 else parts.insert(1, rng.choice(parts))
                data[:first] = b" ".join(parts)

    def leaks(self, answer: bytes) -> bool:
        """A token (or 24 bytes of one, from any offset) or the marker in an answer."""
        for secret in self.secrets:
            raw = secret.encode()
            for start in range(0, max(1, len(raw) - 24), 24):
                if raw[start : start + 24] in answer:
                    return True
        return False

    def blank(self, data: bytes) -> bytes:
        for secret in self.secrets:
            data = data.replace(secret.encode(), b"<TOKEN>")
        return data


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0


# Behind every input: a request that closes the connection once answered, so the usual end of
# an exchange is the proxy closing (a half-close would end it sooner, but the listener drops a
# half-closed connection's requests unanswered).
END = b"GET /open/end HTTP/1.1\r\nHost: fuzz.example\r\nConnection: close\r\n\r\n"


async def one(port: int, data: bytes, idle: float) -> bytes:
    """Send `data` on a new connection; read until the proxy closes or is `idle` seconds
    silent (a request still waiting for body bytes)."""
    for attempt in range(50):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:  # ports in TIME_WAIT, or the proxy gone (the caller checks that)
            if attempt == 49:
                raise
            await asyncio.sleep(0.1)
    received = b""
    try:
        writer.write(data)
        await writer.drain()
        while True:
            async with asyncio.timeout(idle):
                chunk = await reader.read(65536)
            if not chunk:
                break
            received += chunk
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()
    return received


async def normal_request(port: int, bearer: str) -> int | None:
    answer = await one(
        port,
        b"GET /api/health-check HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Authorization: Bearer {bearer}\r\n\r\n".encode(),
        5,
    )
    found = _STATUS.match(answer)
    return int(found.group(1)) if found else None


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fail(tally: Tally, corpus: Corpus, kind: str, data: bytes) -> None:
    tally.failure_count += 1
    if len(tally.failures) < 20:
        shown = corpus.blank(data)[:300]
        tally.failures.append(f"{kind}: {shown!r}")


async def run(
    port: int,
    process: subprocess.Popen[bytes],
    inputs: int,
    connections: int,
    seconds: float,
    seed: int,
    wait: float,
    progress: bool,
) -> tuple[Tally, int, int]:
    corpus = Corpus()
    tally = Tally()
    deadline = time.monotonic() + seconds
    lock = asyncio.Lock()
    next_index = 0
    warm = min(2000, inputs // 10)
    rss_before = 0

    async def worker(number: int) -> None:
        nonlocal next_index, rss_before
        rng = random.Random(seed * 1000 + number)
        while time.monotonic() < deadline and process.poll() is None:
            index = next_index
            if index >= inputs:
                return
            next_index += 1
            data = corpus.mutate(rng)
            answer = await one(port, data + END, wait)
            tally.sent += 1
            statuses = [int(s) for s in _STATUS.findall(answer)]
            if statuses:
                tally.answered += 1
            for status in statuses:
                tally.statuses[status] = tally.statuses.get(status, 0) + 1
            if 500 in statuses:
                fail(tally, corpus, "500", data)
            if corpus.leaks(answer):
                fail(tally, corpus, "token in answer", data)
            if index == warm:
                rss_before = rss_kb(process.pid)
            if index % 10_000 == 0 and index:
                async with lock:
                    status = await normal_request(port, corpus.token)
                    if status != 200:
                        fail(tally, corpus, f"normal request answered {status}", b"")
                    if progress:
                        print(
                            f"{index} inputs, {tally.failure_count} failures, "
                            f"rss {rss_kb(process.pid) // 1024} MB",
                            file=sys.stderr,
                            flush=True,
                        )

    await asyncio.gather(*(worker(n) for n in range(connections)))
    if process.poll() is not None:
        fail(tally, corpus, f"proxy exited with {process.returncode}", b"")
    elif await normal_request(port, corpus.token) != 200:
        fail(tally, corpus, "normal request failed after the run", b"")
    rss_after = rss_kb(process.pid) if process.poll() is None else 0
    return tally, rss_before, rss_after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3 * 3600, help="stop after this long")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--wait", type=float, default=0.3, help="seconds of silence that end one")
    parser.add_argument("--rss-growth-mb", type=float, default=50)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    (work / "nginx").mkdir()
    upstream = start_nginx(work / "nginx", answer="ok", access_log=False)
    port = free_port()
    config = work / "proxy.yaml"
    config.write_text(config_text(port, upstream.url))
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "proxy.stderr", "wb"),  # noqa: SIM115  (closed with the process)
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        started = time.monotonic()
        tally, before, after = asyncio.run(
            run(
                port,
                process,
                args.inputs,
                args.connections,
                args.seconds,
                args.seed,
                args.wait,
                not args.quiet,
            )
        )
        elapsed = time.monotonic() - started
    finally:
        process.terminate()
        process.wait(10)
        upstream.stop()
    growth = (after - before) / 1024
    print(
        f"inputs: {tally.sent} in {elapsed:.0f} s ({tally.sent / elapsed:.0f}/s), seed {args.seed}"
    )
    print(f"answered: {tally.answered}; statuses: {dict(sorted(tally.statuses.items()))}")
    print(f"failures: {tally.failure_count}")
    for line in tally.failures:
        print(f"  {line}")
    print(
        f"proxy RSS: {before // 1024} MB after warm-up, {after // 1024} MB at the end "
        f"({growth:+.1f} MB)"
    )
    stderr = (work / "proxy.stderr").read_text(errors="replace")
    if "Traceback" in stderr:
        print("proxy stderr has a traceback:\n" + stderr[-2000:])
        return 1
    ok = tally.failure_count == 0 and tally.sent >= args.inputs and growth <= args.rss_growth_mb
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
