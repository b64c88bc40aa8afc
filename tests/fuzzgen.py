"""What both fuzzers of a running `token-proxy serve` share: its config, secret and tokens, a
marker, the seeded request mutator, the leak check and starting nginx + the proxy.

    served = serve(work)                           # nginx upstream, the proxy as a subprocess
    corpus = Corpus()
    data = corpus.mutate(random.Random(seed))      # a mutated request; the same for one seed
    assert not corpus.leaks(answer)                # no token or marker in what came back
    served.stop()

`tests/test_fuzz.py` runs a bounded sample in CI (hypothesis: its own request grammar and this
mutator), `bench/fuzz.py` a million mutations. nginx answers a fixed `ok` that echoes nothing,
so whatever of a request shows up in an answer came from the proxy.
"""

from __future__ import annotations

import base64
import os
import random
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from tests.nginx import Nginx, start_nginx

ROOT = Path(__file__).resolve().parent.parent
SECRET = b"f" * 40
MARKER = "ZqXMarkerTokenQv"  # in paths and headers: never in an answer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_text(port: int, upstream: str) -> str:
    """Three token sources, `max_length: 12000` (line and header limits 13024), and routes with
    `auth: none`, `optional`, `required` and a `bind`."""
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


def leaked(answer: bytes, secrets: list[str]) -> str | None:
    """The start of the secret (a token, or 24 bytes of one from any offset, or the marker)
    that `answer` carries."""
    for secret in secrets:
        raw = secret.encode()
        for start in range(0, max(1, len(raw) - 24), 24):
            if raw[start : start + 24] in answer:
                return secret[:8] + "…"
    return None


@dataclass
class Served:
    """nginx and `token-proxy serve` in a work directory."""

    port: int
    process: subprocess.Popen[bytes]
    stderr: Path
    upstream: Nginx

    def rss_kb(self) -> int:
        """The proxy's resident set (0 once it is gone)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.upstream.stop()


def serve(work: Path, seconds: float = 20) -> Served:
    """Start nginx and the proxy (`sys.executable -m proxy serve`); wait for its port."""
    (work / "nginx").mkdir(exist_ok=True)
    upstream = start_nginx(work / "nginx", answer="ok", access_log=False)
    port = free_port()
    config = work / "proxy.yaml"
    config.write_text(config_text(port, upstream.url))
    stderr = work / "proxy.stderr"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    served = Served(port, process, stderr, upstream)
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return served
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                served.stop()
                problem = stderr.read_text()[-2000:]
                raise RuntimeError(f"the proxy did not start: {problem}") from None
            time.sleep(0.05)


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
        """A token (or 24 bytes of one) or the marker in an answer."""
        return leaked(answer, self.secrets) is not None

    def blank(self, data: bytes) -> bytes:
        for secret in self.secrets:
            data = data.replace(secret.encode(), b"<TOKEN>")
        return data
