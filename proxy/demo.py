"""`token-proxy demo`: the proxy in front of a built-in echo upstream, on a fresh install.

    asyncio.run(run_demo(port=8080))   # prints ready curl lines, serves until Ctrl-C

A generated HS256 app (`demo-app`), a route that binds `userId` to the path, an echo upstream
that answers with what it received (so the identity headers are visible), and the dev console
(SPEC §12) on the admin listener.
"""

from __future__ import annotations

import asyncio
import shlex
import socket
import sys
import time
from typing import TextIO

from aiohttp import web

from .config import Config, load
from .metrics import Metrics
from .mint import keygen, mint
from .runtime import Runtime
from .telemetry import Log

DEMO_CONFIG = """
listen: "127.0.0.1:{port}"
admin_listen: "127.0.0.1:{admin}"
dev_console: true
upstream: {{url: "http://127.0.0.1:{upstream}"}}
apps:
  - id: demo-app
    match: {{claim: appId}}
    algorithms: [HS256]
    secrets: ["${{DEMO_SECRET}}"]
    required_claims: [exp, userId]
routes:
  - path: /healthz
    auth: none
  - path: /v1/users/{{userId}}/*
    bind: {{userId: path.userId}}
  - path: /*
"""


async def echo(request: web.Request) -> web.Response:
    """The demo upstream: what reached it, as JSON."""
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": dict(request.headers),
            "body_bytes": len(body),
        }
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def curl_lines(port: int, config: Config, now: float) -> list[str]:
    """The ready-to-run curl lines the demo prints, each after a comment saying what it shows."""
    base = f"http://127.0.0.1:{port}/v1/users"
    valid = mint(config, "demo-app", {"userId": "42"}, ttl=3600, now=now)
    expired = mint(config, "demo-app", {"userId": "42"}, ttl=60, now=now - 3600)

    def call(token: str | None, user: str) -> str:
        auth = f"-H {shlex.quote('Authorization: Bearer ' + token)} " if token else ""
        return f"curl -si {auth}{base}/{user}/threads"

    return [
        "# a valid token for user 42: 200 from the echo upstream, with X-Auth-User-Id: 42",
        call(valid, "42"),
        "# an expired token: 401, code 40 TokenExpired",
        call(expired, "42"),
        "# no token: 401, code 39 TokenRequired",
        call(None, "42"),
        "# user 42's token on user 7's path: 403, code 38 binding_mismatch",
        call(valid, "7"),
    ]


async def run_demo(port: int = 8080, out: TextIO | None = None) -> int:
    """Serve the demo until SIGINT/SIGTERM."""
    out = out or sys.stdout
    upstream_port = _free_port()
    echo_app = web.Application()
    echo_app.router.add_route("*", "/{tail:.*}", echo)
    echo_runner = web.AppRunner(echo_app, access_log=None)
    await echo_runner.setup()
    await web.TCPSite(echo_runner, "127.0.0.1", upstream_port).start()
    secret, _ = keygen("HS256")
    text = DEMO_CONFIG.format(port=port, admin=port + 1, upstream=upstream_port)
    config = load("<demo>", env={"DEMO_SECRET": secret}, text=text)

    def ready() -> None:
        print(
            f"token-proxy demo: proxy on http://127.0.0.1:{port}, admin on "
            f"http://127.0.0.1:{port + 1}, echo upstream on 127.0.0.1:{upstream_port}",
            file=out,
        )
        print("app demo-app (HS256), route /v1/users/{userId}/* binds userId to the path", file=out)
        print(f"dev console: http://127.0.0.1:{port + 1}/console\n", file=out)
        for line in curl_lines(port, config, time.time()):
            print(line, file=out)
        print("\nCtrl-C stops the demo.", file=out, flush=True)

    log = Log(sys.stderr, config.log_level)
    runtime = Runtime(lambda: config, "<demo>", log=log, metrics=Metrics(), on_ready=ready)
    try:
        return await runtime.run()
    finally:
        await echo_runner.cleanup()


def main(port: int) -> int:
    return asyncio.run(run_demo(port))
