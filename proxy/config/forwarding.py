"""`forward` (what goes upstream besides the request: the token, identity headers) and
`errors` (how rejections read).

    forward, problems = read_forward(tree.get("forward"), token, reader)
    errors, problems = read_errors(tree.get("errors"))
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import Problem
from ..model import MANAGED_HEADERS
from ..yamlconf import Section
from .reader import TOKEN_CHARS, Reader
from .schema import Errors, Forward, TokenSettings, default, names

_REALM = re.compile(r"[\x20-\x7e]*")


def read_forward(
    data: Any, token: TokenSettings | None, reader: Reader
) -> tuple[Forward | None, list[Problem]]:
    problems: list[Problem] = []
    section = Section(data, "forward", problems, names(Forward))
    send_token = section.boolean("token", default(Forward, "token"))
    headers = section.raw("identity_headers", dict(default(Forward, "identity_headers")))
    if headers is None:
        headers = {}
    if not isinstance(headers, dict):
        section.problem("identity_headers", "must be a mapping of header to claim")
        headers = {}
    claims_header = section.optional_string("claims_header")
    request_id = section.string("request_id_header", default(Forward, "request_id_header"))
    names_given = [(f"identity_headers.{name}", name) for name in headers]
    if claims_header is not None:
        names_given.append(("claims_header", claims_header))
    if request_id is not None:
        names_given.append(("request_id_header", request_id))
    token_headers = {s.name for s in token.sources if s.kind == "header"} if token else set()
    _header_names(section, names_given, token_headers, reader)
    identity: list[tuple[str, str]] = []
    for name, claim in headers.items():
        if not isinstance(claim, str) or not claim or claim.startswith(".") or ".." in claim:
            section.problem(
                f"identity_headers.{name}",
                f"must be a claim name or @app, not {reader.that(claim)}",
            )
        elif isinstance(name, str):
            identity.append((name, claim))
    if send_token is None or request_id is None:
        return None, problems
    return Forward(bool(send_token), tuple(identity), claims_header, request_id), problems


def _header_names(
    section: Section, given: list[tuple[str, Any]], token_headers: set[str], reader: Reader
) -> None:
    """Each header the proxy sets: a valid name, not one it manages, not given twice."""
    seen: set[str] = set()
    for key, name in given:
        if not isinstance(name, str) or not TOKEN_CHARS.fullmatch(name):
            section.problem(key, f"{reader.that(name)} is not a valid header name")
            continue
        folded = name.lower().replace("_", "-")
        if folded in MANAGED_HEADERS or folded in token_headers or folded.startswith("proxy-"):
            section.problem(key, f"{reader.that(name)} is a header the proxy manages")
        elif folded in seen:
            section.problem(key, f"{reader.that(name)} names a header twice (case and _ ignored)")
        seen.add(folded)


def read_errors(data: Any) -> tuple[Errors | None, list[Problem]]:
    problems: list[Problem] = []
    section = Section(data, "errors", problems, names(Errors))
    realm = section.string("realm", default(Errors, "realm"))
    if realm is not None and (not _REALM.fullmatch(realm) or '"' in realm or "\\" in realm):
        section.problem("realm", "must be printable ASCII without quotes or backslashes")
        realm = None
    expose = section.boolean("expose_reason", default(Errors, "expose_reason"))
    if realm is None or expose is None:
        return None, problems
    return Errors(realm, expose), problems
