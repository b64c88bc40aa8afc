"""The configuration file (SPEC §3): frozen objects, validated and compiled once.

    config = load("config/proxy.yaml")          # raises ConfigError listing every problem
    config.apps[0].secrets                      # decoded bytes, never in a repr
    config.routes[0].pattern.match("/v1/x")     # compiled once

`load()` reads the whole file, collects every problem with its key path, reads every key file,
and names the offending value where it cannot be a secret (`unknown app "ghost-app"`): never a
value of `secrets` or `clients[].secret`, never one that came from `${VAR}` substitution.

The package: `schema.py` (the dataclasses, each default on its field), one reader per section
(`basics`, `upstreams`, `token`, `forwarding`, `apps` with `app_keys`, `routes`,
`token_service`), each returning its problems, and the rules between sections in `checks.py`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, Problem
from ..yamlconf import Section, load_yaml, substitute, substituted_strings
from . import checks
from .apps import read_apps
from .basics import MODES, read_authorize, read_limits, read_log, read_tls
from .forwarding import read_errors, read_forward
from .reader import Reader, client_context, listen, server_context, server_header
from .routes import read_routes
from .schema import (
    DEFAULT_IDENTITY,
    TOKEN_SERVICE_APP,
    TOP_KEYS,
    App,
    Authorize,
    Binding,
    Client,
    Config,
    Errors,
    Forward,
    Limits,
    Listen,
    Route,
    SigningKey,
    Source,
    Tls,
    TokenService,
    TokenSettings,
    Upstream,
    default,
)
from .token import read_token
from .token_service import read_token_service
from .upstreams import read_upstream, read_upstreams

__all__ = [
    "DEFAULT_IDENTITY",
    "TOKEN_SERVICE_APP",
    "App",
    "Authorize",
    "Binding",
    "Client",
    "Config",
    "Errors",
    "Forward",
    "Limits",
    "Listen",
    "Route",
    "SigningKey",
    "Source",
    "Tls",
    "TokenService",
    "TokenSettings",
    "Upstream",
    "client_context",
    "default_path",
    "load",
    "server_context",
]


def default_path() -> str:
    """The config file `serve` reads without --config."""
    return os.environ.get("TOKEN_PROXY_CONFIG") or "config/proxy.yaml"


def load(
    file: str,
    env: Mapping[str, str] | None = None,
    text: str | None = None,
    adjust: Callable[[dict[str, Any]], None] | None = None,
) -> Config:
    """Read, validate and compile a config file, or raise ConfigError with every problem.

    `adjust` edits the substituted YAML tree first (command-line flags override the file).
    """
    problems: list[Problem] = []
    if text is None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([Problem("", "no such file")], file) from None
        except (OSError, UnicodeDecodeError) as error:
            reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else "unreadable"
            raise ConfigError([Problem("", f"cannot be read ({reason})")], file) from None
    tree = load_yaml(text, problems)
    if problems:
        raise ConfigError(problems, file)
    if not isinstance(tree, dict):
        raise ConfigError([Problem("", "must be a YAML mapping of settings")], file)
    tree = substitute(tree, os.environ if env is None else env, problems)
    if adjust is not None:
        adjust(tree)
    config = _build(tree, Reader(file, substituted_strings(tree)), problems)
    if problems or config is None:
        raise ConfigError(problems, file)
    return config


def _build(tree: dict[str, Any], reader: Reader, problems: list[Problem]) -> Config | None:
    """Every section in file order (so problems are listed in it), then the Config."""
    root = Section(tree, "", problems, TOP_KEYS)
    settings: dict[str, Any] = {"file": reader.file}
    _server(root, reader, settings)
    _policy(root, reader, settings)
    required = ("listen", "log_level", "token", "forward", "errors")
    if problems or any(settings[key] is None for key in required):
        return None
    return Config(**settings)


def _found(problems: list[Problem], read: tuple[Any, list[Problem]]) -> Any:
    """A section reader's value, its problems added to `problems`."""
    value, more = read
    problems += more
    return value


def _server(root: Section, reader: Reader, settings: dict[str, Any]) -> None:
    """The listeners, logging and mode: how the proxy runs."""
    problems = root.problems
    # Defaults are values as read, not text: a missing `listen` must still be a Listen.
    settings["listen"] = root.field("listen", listen, "HOST:PORT", default(Config, "listen"))
    settings["admin_listen"] = root.field(
        "admin_listen",
        lambda v: None if v is None else listen(v),
        "HOST:PORT or null",
        default(Config, "admin_listen"),
    )
    settings["tls"] = _found(problems, read_tls(root.raw("tls"), reader))
    settings["environment"] = root.optional_string("environment")
    settings["shutdown_timeout"] = float(
        root.number("shutdown_timeout", default(Config, "shutdown_timeout")) or 0
    )
    level, access = _found(problems, read_log(root.raw("log")))
    settings["log_level"], settings["access_log"] = level, bool(access)
    ignore_case = root.boolean("case_insensitive_paths", default(Config, "case_insensitive_paths"))
    settings["case_insensitive_paths"] = bool(ignore_case)
    mode = root.choice("mode", MODES, default(Config, "mode")) or default(Config, "mode")
    settings["mode"] = mode
    settings["authorize"] = _found(problems, read_authorize(root.raw("authorize")))
    problems += checks.authorize_upstreams(mode, root.raw("routes"))
    upstream = None  # mode authorize needs none (one given is checked, then ignored)
    if mode != "authorize" or root.raw("upstream") is not None:
        read = read_upstream(root.raw("upstream"), "upstream", "default", reader, required=True)
        upstream = _found(problems, read)
    settings["upstream"] = upstream
    settings["upstreams"] = _found(problems, read_upstreams(root.raw("upstreams"), reader))


def _policy(root: Section, reader: Reader, settings: dict[str, Any]) -> None:
    """Tokens, apps and routes: what the proxy lets through; then the later top-level keys."""
    problems = root.problems
    token = _found(problems, read_token(root.raw("token"), reader))
    forward = _found(problems, read_forward(root.raw("forward"), token, reader))
    errors = _found(problems, read_errors(root.raw("errors")))
    service = _found(problems, read_token_service(root.raw("token_service"), reader))
    apps = _found(problems, read_apps(root.raw("apps", []), service, reader))
    known = checks.Known.of(apps, settings["upstreams"], service, forward)
    ignore_case = settings["case_insensitive_paths"]
    routes = _found(problems, read_routes(root.raw("routes", []), ignore_case, known, reader))
    preflight = root.choice("preflight", ("pass", "check"), default(Config, "preflight"))
    problems += checks.apps_needed(apps, routes, service, root.raw("apps"))
    problems += checks.grant_apps(apps, service, reader)
    settings["limits"] = _found(problems, read_limits(root.raw("limits")))
    settings["server_header"] = root.field(
        "server_header", server_header, "a string or null", default(Config, "server_header")
    )
    dev_console = bool(root.boolean("dev_console", default(Config, "dev_console")))
    problems += checks.dev_console(dev_console, settings["admin_listen"])
    settings.update(
        token=token,
        forward=forward,
        errors=errors,
        token_service=service,
        apps=tuple(apps),
        routes=tuple(routes),
        preflight=preflight or default(Config, "preflight"),
        dev_console=dev_console,
    )
