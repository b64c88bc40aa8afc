"""Instructions per request under callgrind: where token-proxy's CPU goes, repeatably.

    .venv/bin/python bench/callgrind.py [--requests 3000] [--only NAME]... [--python PATH]
                                        [--keep DIR]

token-proxy runs interpreted (.venv) and as the image ships it, compiled by mypyc
(bench/.compiled, which bench/setup builds).

Wall-clock numbers on a shared 2-core machine move by 10-20% between runs; instruction counts
do not. Each variant runs under `valgrind --tool=callgrind` against nginx on loopback; a
client sends 200 warm-up requests, the counters are zeroed, then N requests over 8 keep-alive
connections (one request in flight per connection), the counters are dumped and divided by N.
Needs valgrind (apt) and nginx; the numbers go to stdout and bench/results/callgrind.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from run import COMPILED, PYTHON, ROOT, Bench, free_port, wait_http

CONNECTIONS = 8
WARM_UP = 200
# What a browser or SDK sends besides Host and the token, for the "browser headers" variant.
BROWSER = (
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    "Accept: application/json\r\nAccept-Language: en-US,en;q=0.5\r\n"
    "Accept-Encoding: gzip, deflate, br\r\nContent-Type: application/json\r\n"
    "Origin: https://app.example\r\nReferer: https://app.example/page\r\n"
    "Connection: keep-alive\r\nCookie: session=1; theme=dark\r\nX-Trace: 7f3a\r\n"
)


async def load(port: int, count: int, token: str | None, extra: str = "") -> None:
    """`count` GETs over CONNECTIONS keep-alive connections; every answer must be 200."""

    async def one_connection(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        request = f"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}{extra}\r\n".encode()
        for _ in range(n):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
        writer.close()

    await asyncio.gather(*(one_connection(count // CONNECTIONS) for _ in range(CONNECTIONS)))


def measure(
    work: Path, name: str, command: list[str], port: int, token: str | None, n: int, extra: str
) -> int:
    out = work / f"{name.replace(' ', '_')}.%p.out"
    process = subprocess.Popen(  # cwd: not ROOT, whose proxy/ sources would shadow the install
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180  # python starts slowly under valgrind
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name}: exited with {process.returncode}")
            try:
                wait_http(f"http://127.0.0.1:{port}/healthz", seconds=2)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
        asyncio.run(load(port, WARM_UP, token, extra))
        subprocess.run(
            ["callgrind_control", "-z", str(process.pid)], check=True, capture_output=True
        )
        asyncio.run(load(port, n, token, extra))
        subprocess.run(
            ["callgrind_control", "--dump=measured", str(process.pid)],
            check=True,
            capture_output=True,
        )
    finally:
        process.terminate()
        process.wait(timeout=120)
    dumps = sorted(work.glob(f"{name.replace(' ', '_')}.{process.pid}.out.*"))
    total = 0
    for dump in dumps:  # the dump taken after the measured requests
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("summary:"):
                total = int(line.split()[1])
    return total // n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--only", action="append", help="a variant name (repeatable)")
    parser.add_argument(
        "--python", default=PYTHON, help="another interpreter (a venv with the project installed)"
    )
    parser.add_argument(
        "--keep", type=Path, help="keep the callgrind files here (for callgrind_annotate)"
    )
    args = parser.parse_args()
    suffix = ""
    if args.python != PYTHON:  # results named after the interpreter's version
        version = subprocess.run(
            [args.python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        suffix = f", Python {version}"
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if shutil.which(tool) is None:
            print(f"callgrind: {tool} is missing (apt-get install valgrind nginx)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="token-proxy-callgrind-"))
    bench = Bench(work, seconds=1, connections=1)
    results: dict[str, int] = {}
    try:
        upstream = bench.nginx().url

        def proxy(port: int, access: bool, auth: bool, alg: str = "HS256") -> list[str]:
            checked = alg if auth else None
            path = bench.proxy_config(f"proxy-{port}", port, upstream, checked, access=access)
            return ["-m", "proxy", "serve", "--config", str(path)]

        no_uvloop = ["-c", "import sys; sys.modules['uvloop'] = None; "
                     "from proxy.cli import main; sys.exit(main())"]  # fmt: skip
        variants: dict[str, Callable[[int], list[str]]] = {
            "token-proxy passthrough": lambda port: proxy(port, access=False, auth=False),
            # the same request bytes as the HS256 cases: what the token check alone costs
            "token-proxy passthrough, token sent along": lambda port: proxy(
                port, access=False, auth=False),
            "token-proxy HS256, cache hit": lambda port: proxy(port, access=False, auth=True),
            "token-proxy HS256, cache hit, access log": lambda port: proxy(
                port, access=True, auth=True),
            "token-proxy HS256, cache hit, browser headers": lambda port: proxy(
                port, access=False, auth=True),
            # a longer token (RS256: 342 signature characters against 43), also a cache hit
            "token-proxy RS256, cache hit": lambda port: proxy(
                port, access=False, auth=True, alg="RS256"),
            # the product's CLI with uvloop made unimportable: its asyncio fallback
            "token-proxy HS256, cache hit, asyncio loop": lambda port: [
                *no_uvloop, *proxy(port, access=False, auth=True)[2:]],
        }  # fmt: skip
        compiled = {  # the same code as the image ships it
            f"{name}, compiled": variants[name]
            for name in (
                "token-proxy passthrough",
                "token-proxy passthrough, token sent along",
                "token-proxy HS256, cache hit",
                "token-proxy HS256, cache hit, access log",
                "token-proxy HS256, cache hit, browser headers",
                "token-proxy RS256, cache hit",
            )
        }
        if args.python == PYTHON and Path(COMPILED).exists():
            variants.update(compiled)
        wanted = set(args.only or variants)
        for name, arguments in variants.items():
            if name not in wanted:
                continue
            port = free_port()
            command = [COMPILED if name in compiled else args.python, *arguments(port)]

            sends_token = "HS256" in name or "RS256" in name or "token sent" in name
            token = bench.tokens["RS256" if "RS256" in name else "HS256"]["valid"]
            extra = BROWSER if "browser headers" in name else ""
            started = time.monotonic()
            name += suffix
            results[name] = measure(
                work, name, command, port, token if sends_token else None, args.requests, extra
            )
            print(
                f"{name:45} {results[name]:>9,} instructions/request "
                f"({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    finally:
        bench.stop()
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for dump in work.glob("*.out.*"):
                shutil.move(dump, args.keep / dump.name)
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "bench" / "results" / "callgrind.json"
    earlier = json.loads(out.read_text()) if out.exists() else {}  # --only updates those
    out.write_text(json.dumps({**earlier, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
