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
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fuzzgen import Corpus, serve

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
    served = serve(work)
    try:
        started = time.monotonic()
        tally, before, after = asyncio.run(
            run(
                served.port,
                served.process,
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
        served.stop()
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
    stderr = served.stderr.read_text(errors="replace")
    if "Traceback" in stderr:
        print("proxy stderr has a traceback:\n" + stderr[-2000:])
        return 1
    ok = tally.failure_count == 0 and tally.sent >= args.inputs and growth <= args.rss_growth_mb
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
