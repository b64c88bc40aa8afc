"""The `token-proxy` command (SPEC §2): serve, demo, check, mint, inspect, keygen.

    token-proxy check --config config/proxy.yaml      # exit 0 valid, 2 invalid
    token-proxy inspect --path /v1/users/42 -- "$TOKEN"

Exit codes: 0 success; 1 the request would be rejected (`inspect`); 2 bad usage or an invalid
configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config, default_path, load
from .errors import ConfigError
from .metrics import Metrics
from .mint import MintError, claim_value, keygen, mint
from .runtime import STATUS_ENV, Overrides, Runtime, load_with_overrides
from .telemetry import Log


def _workers(value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError("must be a positive number or auto")


def _claim(value: str) -> tuple[str, Any]:
    name, sep, text = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("must be NAME=VALUE")
    return name, claim_value(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-proxy",
        description="A reverse proxy that checks the JSON Web Token of every request.",
    )
    parser.add_argument("--version", action="version", version=f"token-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--config", help="the config file (default: $TOKEN_PROXY_CONFIG, else config/proxy.yaml)"
    )
    serve.add_argument("--listen", metavar="HOST:PORT")
    serve.add_argument("--upstream", metavar="URL")
    serve.add_argument("--workers", type=_workers, default=1, metavar="N|auto")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="the proxy in front of a built-in echo upstream")
    demo.add_argument("--port", type=int, default=8080)
    demo.set_defaults(run=_demo)

    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("--config")
    check.set_defaults(run=_check)

    mint_cmd = commands.add_parser("mint", help="print a signed token for an app")
    mint_cmd.add_argument("--config", required=True)
    mint_cmd.add_argument("--app", required=True, metavar="ID")
    mint_cmd.add_argument("--claim", type=_claim, action="append", default=[], metavar="K=V")
    mint_cmd.add_argument("--ttl", type=float, default=300, metavar="SECONDS")
    mint_cmd.add_argument("--key", metavar="PRIVATE_KEY_FILE")
    mint_cmd.set_defaults(run=_mint)

    inspect = commands.add_parser("inspect", help="explain what the proxy would do with a token")
    inspect.add_argument("--config")
    inspect.add_argument("--method", default="GET")
    inspect.add_argument("--path", default="/")
    inspect.add_argument("--offline", action="store_true", help="fetch no JWKS URL")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("token", metavar="TOKEN", help="the token, or - to read stdin")
    inspect.set_defaults(run=_inspect)

    keygen_cmd = commands.add_parser("keygen", help="make an HS* secret or a private key")
    keygen_cmd.add_argument(
        "--alg", default="HS256", choices=("HS256", "HS384", "HS512", "ES256", "RS256", "EdDSA")
    )
    keygen_cmd.add_argument("--kid")
    keygen_cmd.set_defaults(run=_keygen)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


def _load(path: str | None) -> Config | None:
    """The config, or None after printing every problem on stderr."""
    try:
        return load(path or default_path())
    except ConfigError as error:
        error.report()
        return None


def _serve(args: argparse.Namespace) -> int:
    path = args.config or default_path()
    overrides = Overrides(args.listen, args.upstream, args.log_level)
    if args.workers > 1:
        from .workers import supervise

        return supervise(path, overrides, args.workers)
    status = os.environ.get(STATUS_ENV)
    runtime = Runtime(
        lambda: load_with_overrides(path, overrides),
        path,
        admin=status is None,
        reuse_port=status is not None,
        status_file=status,
    )
    return _run(runtime.run())


def _run(coroutine: Any) -> int:
    try:
        import uvloop
    except ImportError:
        result: int = asyncio.run(coroutine)
    else:
        result = uvloop.run(coroutine)
    return result


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return _run(run_demo(args.port))


def _check(args: argparse.Namespace) -> int:
    path = args.config or default_path()
    config = _load(path)
    if config is None:
        return 2
    print(f"{path}: ok ({len(config.apps)} apps, {len(config.routes)} routes)")
    return 0


def _mint(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    try:
        key = Path(args.key).read_bytes() if args.key else None
        token = mint(
            config, args.app, dict(args.claim), ttl=args.ttl, now=time.time(), private_key=key
        )
    except OSError:
        print(f"token-proxy mint: --key {args.key}: cannot be read", file=sys.stderr)
        return 2
    except MintError as error:
        print(f"token-proxy mint: {error}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    material, public = keygen(args.alg, args.kid)
    print(material.rstrip("\n"))
    if public is not None:
        print(json.dumps(public), file=sys.stderr)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from_stdin = args.token == "-"  # noqa: S105 - "-" means stdin, not a password
    token = sys.stdin.read().strip() if from_stdin else args.token
    config = _load(args.config)
    if config is None:
        return 2
    result = asyncio.run(inspect_token(config, token, args.method, args.path, args.offline))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "name"}))
    else:
        for step in result["steps"]:
            print(f"  {'ok  ' if step['ok'] else 'FAIL'}  {step['step']}: {step['detail']}")
        if result["forwarded"]:
            print(f"forwarded (app {result['app'] or '-'})")
        else:
            print(
                f"rejected: {result['status']} {result['name']} (code {result['code']}), "
                f"reason {result['reason']}, app {result['app'] or '-'}"
            )
    return 0 if result["forwarded"] else 1


async def inspect_token(
    config: Config, token: str, method: str, path: str, offline: bool
) -> dict[str, Any]:
    """Run the proxy's own decision on one token and collect each step."""
    from .app import Resources
    from .explain import explain

    resources = Resources(Metrics(), Log(io.StringIO()))
    steps: list[tuple[str, bool, str]] = []
    if offline:
        for app in config.apps:
            for key in ("jwks_url", "discovery_url"):
                if getattr(app, key):
                    steps.append(("offline", True, f"app {app.id}: {key} not fetched"))
    try:
        state = await resources.prepare(config, fetch=not offline)
        explanation = await explain(config, state.verifier, token, method, path, time.time(), steps)
    finally:
        await resources.close()
    return explanation.summary()
