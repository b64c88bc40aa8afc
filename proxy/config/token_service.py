"""`token_service` (SPEC §9): the issuer, its signing keys, clients and the grants' apps.

service, problems = read_token_service(tree.get("token_service"), reader)
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .. import jwk
from ..errors import Problem
from ..jwk import jwks_url_problem
from ..yamlconf import Section
from .reader import ID, Reader
from .schema import TOKEN_SERVICE_KEYS, Client, SigningKey, TokenService, default, names


def read_token_service(data: Any, reader: Reader) -> tuple[TokenService | None, list[Problem]]:
    problems: list[Problem] = []
    if data is None:
        return None, problems
    section = Section(data, "token_service", problems, TOKEN_SERVICE_KEYS)
    issuer = _issuer(section, reader)
    signing = _signing_keys(section, reader)
    ttl = section.number("token_ttl", default(TokenService, "token_ttl"), minimum=1)
    audience = section.optional_string("audience")
    copy = section.strings("copy_claims", default(TokenService, "copy_claims"))
    clients = _clients(section, reader)
    bearer = _apps(section, "jwt_bearer", "jwt_bearer_apps")
    exchange = _apps(section, "token_exchange", "token_exchange_apps")
    if issuer is None or ttl is None or copy is None or bearer is None or exchange is None:
        return None, problems
    service = TokenService(
        issuer, tuple(signing), float(ttl), audience, copy, tuple(clients), bearer, exchange
    )
    return service, problems


def _issuer(section: Section, reader: Reader) -> str | None:
    issuer = section.string("issuer")
    if issuer is None:
        return None
    problem = jwks_url_problem(issuer, what="issuer")
    parts = urlsplit(issuer) if problem is None else None
    if parts is None or parts.path not in ("", "/") or parts.query or parts.fragment:
        section.problem(
            "issuer",
            reader.url_problem(issuer, "must be an https URL without a path (http: loopback)"),
        )
    return issuer.rstrip("/")


def _signing_keys(section: Section, reader: Reader) -> list[SigningKey]:
    signing: list[SigningKey] = []
    files = section.strings("signing_keys")
    if files is not None and not files:
        section.problem("signing_keys", "needs at least one private key")
    for index, file in enumerate(files or ()):
        where = f"signing_keys[{index}]"
        data = reader.read_file(section, where, file)
        if data is None:
            continue
        try:
            key = jwk.load_pem_private(data)
        except jwk.KeyMaterialError:
            key = None
        alg = jwk.signing_alg(key) if key is not None else None
        if key is None or alg is None or isinstance(key, Ed25519PrivateKey):  # (for mypy)
            section.problem(
                where, f"{reader.that(file)} is not a PEM private key: EC P-256 or RSA >= 2048"
            )
            continue
        signing.append(SigningKey(key, alg, jwk.thumbprint(key.public_key())))
    return signing


def _apps(section: Section, key: str, field: str) -> tuple[str, ...] | None:
    """`jwt_bearer.apps` or `token_exchange.apps`: the apps whose tokens the grant takes."""
    grant = Section(section.raw(key), section.at(key), section.problems, ("apps",))
    return grant.strings("apps", default(TokenService, field))


def _clients(section: Section, reader: Reader) -> list[Client]:
    data = section.raw("clients", [])
    if not isinstance(data, list):
        section.problem("clients", "must be a list of clients")
        return []
    clients: list[Client] = []
    for index, item in enumerate(data):
        where = section.at(f"clients[{index}]")
        client = Section(item, where, section.problems, names(Client))
        client_id, secret = client.string("id"), client.string("secret")
        org = client.optional_string("org")
        if client_id is not None and not ID.fullmatch(client_id):
            client.problem(
                "id", f"{reader.that(client_id)} is not 1-64 characters of A-Z a-z 0-9 . _ -"
            )
        elif client_id in {c.id for c in clients}:
            client.problem("id", f"{reader.that(client_id)} is used twice")
        if secret is not None and len(secret) < 16:
            client.problem("secret", "must be at least 16 characters")
        if client_id is not None and secret is not None:
            clients.append(Client(client_id, secret, org))
    return clients
