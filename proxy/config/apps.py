"""`apps`: who may send tokens, how each app's tokens are matched, verified and checked.

apps, problems = read_apps(tree.get("apps", []), service, reader)
"""

from __future__ import annotations

from typing import Any

from .. import jwk
from ..errors import Problem
from ..jwk import jwks_url_problem
from ..yamlconf import Section
from . import checks
from .app_keys import read_keys, read_secrets
from .reader import ID, Reader, claims, one_or_more, positive
from .schema import APP_KEYS, APP_REQUIRED_CLAIMS, MATCH_CLAIM, App, TokenService


def read_apps(
    data: Any, service: TokenService | None, reader: Reader
) -> tuple[list[App], list[Problem]]:
    problems: list[Problem] = []
    if data is None:
        data = []
    if not isinstance(data, list):
        problems.append(Problem("apps", "must be a list of apps"))
        return [], problems
    apps: list[App] = []
    seen = checks.AppsSeen()
    for index, item in enumerate(data):
        path = f"apps[{index}]"
        app, more = read_app(item, path, reader)
        problems += more
        if app is None:
            continue
        conflicts, duplicate = checks.app_conflicts(app, path, apps, seen, service, reader)
        problems += conflicts
        if not duplicate:
            apps.append(app)
    return apps, problems


def read_app(data: Any, path: str, reader: Reader) -> tuple[App | None, list[Problem]]:
    problems: list[Problem] = []
    section = Section(data, path, problems, APP_KEYS)
    app_id = section.string("id")
    if app_id is not None and not ID.fullmatch(app_id):
        section.problem("id", f"{reader.that(app_id)} is not 1-64 characters of A-Z a-z 0-9 . _ -")
    match_claim, match_value = _match(section, app_id)
    algorithms = section.strings("algorithms")
    algs = _algorithms(section, algorithms, reader)
    hs = algs & jwk.HS_MIN_BYTES.keys()
    if hs and algs - hs:
        section.problem(
            "algorithms",
            f"mixes HS* ({', '.join(sorted(hs))}) and asymmetric "
            f"({', '.join(sorted(algs - hs))}) algorithms; use two apps",
        )
    secrets = read_secrets(section, hs) if hs and not algs - hs else ()
    keys_found: tuple[jwk.VerifyKey, ...] = ()
    jwks_url = section.optional_string("jwks_url")
    discovery_url = _discovery_url(section, jwks_url, reader)
    ca_file = reader.ca_file(section)
    if algs and not hs:
        keys_found = read_keys(section, algs, jwks_url, discovery_url, reader)
        if section.raw("secrets"):
            section.problem("secrets", "only HS* apps verify with secrets")
    elif hs:
        for key in ("jwks_url", "discovery_url", "ca_file", "jwks_file", "public_keys"):
            if section.raw(key):
                section.problem(key, "HS* apps verify with secrets only")
    issuer = section.field("issuer", one_or_more, "a string or a list of strings", None)
    audience = section.field("audience", one_or_more, "a string or a list of strings", None)
    required = section.strings("required_claims", APP_REQUIRED_CLAIMS)
    found_claims = section.field("claims", claims, "a mapping of claim to value", {})
    max_lifetime = section.field(
        "max_lifetime", lambda v: None if v is None else positive(v), "a number", None
    )
    if app_id is None or algorithms is None or required is None or found_claims is None:
        return None, problems
    if max_lifetime is not None and "exp" not in required:
        required = (*required, "exp")  # a lifetime needs an end
    app = App(
        id=app_id,
        match_claim=match_claim,
        match_value=match_value,
        algorithms=tuple(dict.fromkeys(a for a in algorithms if a in algs)),
        secrets=secrets,
        keys=keys_found,
        jwks_url=jwks_url,
        issuer=issuer,
        audience=audience,
        required_claims=required,
        claims=tuple(found_claims.items()),
        max_lifetime=max_lifetime,
        discovery_url=discovery_url,
        ca_file=ca_file,
    )
    return app, problems


def _algorithms(section: Section, algorithms: tuple[str, ...] | None, reader: Reader) -> set[str]:
    """The supported algorithms named; `none` and unknown names are problems."""
    algs: set[str] = set()
    for index, alg in enumerate(algorithms or ()):
        if alg.lower() == "none":
            section.problem(f"algorithms[{index}]", f"{reader.that(alg)} is never accepted")
        elif alg not in jwk.SUPPORTED:
            section.problem(
                f"algorithms[{index}]",
                f"{reader.named('unknown algorithm', alg)}: must be one of "
                + ", ".join(sorted(jwk.SUPPORTED)),
            )
        else:
            algs.add(alg)
    if algorithms is not None and not algorithms:
        section.problem("algorithms", "must name at least one algorithm")
    return algs


def _discovery_url(section: Section, jwks_url: str | None, reader: Reader) -> str | None:
    """`discovery_url` (SPEC §11): https (http on loopback), never with `jwks_url`."""
    url = section.optional_string("discovery_url")
    if url is None:
        return None
    if jwks_url is not None:
        section.problem(
            "discovery_url", "cannot be used with jwks_url (the document names the JWKS)"
        )
    problem = jwks_url_problem(url, what="discovery_url")
    if problem:
        section.problem("discovery_url", reader.url_problem(url, problem))
    return url


def _match(section: Section, app_id: str | None) -> tuple[str | None, str | None]:
    data = section.raw("match")
    if data is None:
        return None, None
    match = Section(data, section.at("match"), section.problems, ("claim", "value"))
    return match.string("claim", MATCH_CLAIM), match.string("value", app_id)
