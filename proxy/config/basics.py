"""The small top-level sections: `tls`, `log`, `limits`, `mode` with `authorize`.

tls, problems = read_tls(tree.get("tls"), reader)   # each reader returns its problems
"""

from __future__ import annotations

import ssl
from typing import Any

from ..errors import Problem
from ..yamlconf import Section, as_string, optional
from .reader import TOKEN_CHARS, Reader, server_context, timeout
from .schema import Authorize, Config, Limits, Tls, default, names

LOG_LEVELS = ("debug", "info", "warning", "error")
MODES = ("proxy", "authorize")


def read_tls(data: Any, reader: Reader) -> tuple[Tls | None, list[Problem]]:
    problems: list[Problem] = []
    if data is None:
        return None, problems
    section = Section(data, "tls", problems, names(Tls))
    cert, key = section.string("cert_file"), section.string("key_file")
    if cert is None or key is None:
        return None, problems
    try:
        server_context(str(reader.path(cert)), str(reader.path(key)))
    except (OSError, ssl.SSLError, ValueError):
        section.problem("", "cert_file and key_file must be a readable PEM certificate and key")
        return None, problems
    return Tls(str(reader.path(cert)), str(reader.path(key))), problems


def read_log(data: Any) -> tuple[tuple[str | None, bool | None], list[Problem]]:
    """`log.level` and `log.access` (Config's log_level and access_log)."""
    problems: list[Problem] = []
    section = Section(data, "log", problems, ("level", "access"))
    level = section.choice("level", LOG_LEVELS, default(Config, "log_level"))
    access = section.boolean("access", default(Config, "access_log"))
    return (level, access), problems


def read_authorize(data: Any) -> tuple[Authorize, list[Problem]]:
    """The `authorize` section: absent headers take their defaults, null means "own"."""
    problems: list[Problem] = []
    section = Section(data, "authorize", problems, names(Authorize))
    headers: list[str | None] = []
    for key in ("method_header", "uri_header", "host_header"):
        if not section.has(key):
            headers.append(default(Authorize, key))
            continue
        name = section.field(key, optional(as_string), "a header name or null")
        if name is not None and not TOKEN_CHARS.fullmatch(name):
            section.problem(key, "must be a valid header name or null")
        headers.append(name)
    prefix = section.string("strip_prefix", default(Authorize, "strip_prefix")) or ""
    if prefix and not prefix.startswith("/"):
        section.problem("strip_prefix", "must be empty or start with /")
    return Authorize(headers[0], headers[1], headers[2], prefix), problems


def read_limits(data: Any) -> tuple[Limits, list[Problem]]:
    problems: list[Problem] = []
    section = Section(data, "limits", problems, names(Limits))
    header = section.field("header_timeout", timeout, "a number", default(Limits, "header_timeout"))
    idle = section.field("idle_timeout", timeout, "a number", default(Limits, "idle_timeout"))
    if header is None or idle is None:
        return Limits(), problems  # (not used: a problem stops the load)
    return Limits(float(header), float(idle)), problems
