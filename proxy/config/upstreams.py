"""`upstream` (the default) and `upstreams` (named ones a route may pick).

upstream, problems = read_upstream(tree.get("upstream"), "upstream", "default", reader)
upstreams, problems = read_upstreams(tree.get("upstreams"), reader)
"""

from __future__ import annotations

from typing import Any
from urllib.parse import SplitResult, urlsplit

from ..errors import Problem
from ..jwk import without_userinfo
from ..yamlconf import Section
from .reader import ID, Reader, timeout
from .schema import UPSTREAM_KEYS, Upstream, default

# scheme, host, port, socket path, base path
_Target = tuple[str, str, int, str | None, str]


def read_upstream(
    data: Any, path: str, name: str, reader: Reader, required: bool = False
) -> tuple[Upstream | None, list[Problem]]:
    problems: list[Problem] = []
    if data is None and required:
        problems.append(Problem(path, "is required (the default upstream, with a url)"))
        return None, problems
    section = Section(data, path, problems, UPSTREAM_KEYS)
    url = section.string("url")
    connect_timeout = section.field(
        "connect_timeout", timeout, "a number", default(Upstream, "connect_timeout")
    )
    timeout_ = section.field("timeout", timeout, "a number", default(Upstream, "timeout"))
    max_connections = section.integer(
        "max_connections", default(Upstream, "max_connections"), minimum=1
    )
    preserve_host = section.boolean("preserve_host", default(Upstream, "preserve_host"))
    ca_file = reader.ca_file(section)
    if url is None:
        return None, problems
    target = _target(section, url, reader)
    if target is None or None in (connect_timeout, timeout_, max_connections, preserve_host):
        return None, problems
    scheme, host, port, socket_path, base_path = target
    usual = {"http": 80, "https": 443}.get(scheme)
    shown = f"[{host}]" if ":" in host else host
    upstream = Upstream(
        name=name,
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        socket_path=socket_path,
        base_path=base_path,
        host_header=shown if port == usual or socket_path else f"{shown}:{port}",
        connect_timeout=float(connect_timeout or 0),
        timeout=float(timeout_ or 0),
        max_connections=int(max_connections or 1),
        preserve_host=bool(preserve_host),
        ca_file=ca_file,
    )
    return upstream, problems


def _target(section: Section, url: str, reader: Reader) -> _Target | None:
    if url.startswith("unix:"):
        socket = url[len("unix:") :]
        if not socket:
            section.problem("url", "unix: needs a socket path (unix:/path/to.sock)")
            return None
        return "unix", "localhost", 0, str(reader.path(socket)), ""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # not a URL at all ("http://[::1"), or a bad port
        parts, port = urlsplit(""), -1
    host = parts.hostname
    why = _url_flaw(parts, port) if host else "it has no host (or is not a URL)"
    if why is not None or not host:
        shown = reader.show(without_userinfo(url)) if reader.show(url) else None
        section.problem(
            "url",
            "must be http://HOST[:PORT][/PATH], https://… or unix:/PATH"
            + (f" ({shown}: {why})" if shown else f" ({why})"),
        )
        return None
    base = parts.path.rstrip("/")
    usual = 443 if parts.scheme == "https" else 80
    return parts.scheme, host, port or usual, None, base


def _url_flaw(parts: SplitResult, port: int | None) -> str | None:
    """Why an upstream URL with a host is not one the proxy can send to, or None."""
    if parts.scheme not in ("http", "https"):
        return "the scheme is not http or https"
    if port == -1:
        return "its port is not a number"
    if parts.query or parts.fragment:
        return "it has a query or fragment"
    if parts.username is not None:
        return "it has user:password (never sent upstream)"
    return None


def read_upstreams(data: Any, reader: Reader) -> tuple[dict[str, Upstream], list[Problem]]:
    problems: list[Problem] = []
    if data is None:
        return {}, problems
    if not isinstance(data, dict):
        problems.append(Problem("upstreams", "must be a mapping of name to upstream"))
        return {}, problems
    found: dict[str, Upstream] = {}
    for name, value in data.items():
        if not isinstance(name, str) or not ID.fullmatch(name):
            what = reader.named("the name", name)
            problems.append(
                Problem("upstreams", f"{what} is not a string of [A-Za-z0-9._-]{{1,64}}")
            )
            continue
        upstream, more = read_upstream(value, f"upstreams.{name}", name, reader)
        problems += more
        if upstream is not None:
            found[name] = upstream
    return found, problems
