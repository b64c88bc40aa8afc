"""The token service (SPEC §8): JWT credentials and token exchange for short-lived tokens.

    service = TokenService(lambda: proxy.state, metrics, clock=time.time)
    proxy.service = service.handle      # answers /oauth/token and /.well-known/* first
    status, headers, body, error = await service.handle(method, path, headers, form_bytes)

`handle` returns the answer (status, headers, JSON body) and its RFC 6749 error word, which the
access log shows as the reason of outcome `token_service` (these requests are not proxied: not
in requests_total).

Credentials and subject tokens are checked by the proxy's own `Verifier` (SPEC §4 steps 4-7),
so what the service accepts is exactly what the proxy would. Issued tokens are signed with the
first `signing_keys` entry and carry its RFC 7638 thumbprint as `kid`; the proxy accepts them
as the implicit app `token-service`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote_plus

import jwt

from . import jwk
from .claims import Verified, audiences
from .config import Client, Config
from .config import TokenService as ServiceConfig
from .errors import OAuthError as OAuthError  # re-exported: raised here
from .errors import Rejection
from .metrics import ISSUED, Metrics
from .model import Headers
from .tokens import Verifier

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a URN
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a URN
SUBJECT_TYPES = frozenset({ACCESS_TOKEN_TYPE, "urn:ietf:params:oauth:token-type:jwt"})
MAX_FORM = 64 * 1024
_DUMMY_SECRET = secrets.token_urlsafe(32)


class _State(Protocol):
    @property
    def config(self) -> Config: ...
    @property
    def verifier(self) -> Verifier: ...


# status, headers, body: an answer the listener writes as it is
Answer = tuple[int, list[tuple[str, str]], bytes]


class Request:
    """What the service reads of a request: method, headers, the form body (at most
    MAX_FORM + 1 bytes; `too_large` when more came)."""

    __slots__ = ("body", "headers", "method", "too_large")

    def __init__(self, method: str, headers: Headers, body: bytes, too_large: bool) -> None:
        self.method = method
        self.headers = headers
        self.body = body
        self.too_large = too_large


@dataclass(frozen=True, slots=True)
class _Grant:
    """One authenticated token request: what every grant type reads."""

    form: dict[str, str]
    state: _State
    service: ServiceConfig
    client: Client
    now: float


def _json(
    body: dict[str, Any], status: int = 200, cache: str = "no-store", **headers: str
) -> Answer:
    return (
        status,
        [("Content-Type", "application/json"), ("Cache-Control", cache), *headers.items()],
        json.dumps(body, separators=(",", ":")).encode(),
    )


class TokenService:
    """The service's three paths, reading the proxy's current state on every request."""

    def __init__(
        self,
        state: Callable[[], _State],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.metrics = metrics
        self.clock = clock

    async def handle(
        self, method: str, path: str, headers: Headers, body: bytes, too_large: bool = False
    ) -> tuple[int, list[tuple[str, str]], bytes, str]:
        """The answer, and the RFC 6749 error word for the access log ("" on success)."""
        state = self.state()
        service = state.config.token_service
        assert service is not None  # noqa: S101 - the proxy only calls with a service
        request = Request(method, headers, body, too_large)
        if path == "/oauth/token":
            if request.method != "POST":
                return *_json(_error("invalid_request", "use POST"), 405, Allow="POST"), (
                    "invalid_request"
                )
            try:
                return *await self.token(request, state, service), ""
            except OAuthError as error:
                extra = {"WWW-Authenticate": 'Basic realm="token"'} if error.status == 401 else {}
                return *_json(_error(error.error, error.description), error.status, **extra), (
                    error.error
                )
        if request.method not in ("GET", "HEAD"):
            return *_json(_error("invalid_request", "use GET"), 405, Allow="GET, HEAD"), (
                "invalid_request"
            )
        if path == "/.well-known/jwks.json":
            return *_json({"keys": published_keys(service)}, cache="max-age=300"), ""
        return *_json(metadata(service), cache="max-age=300"), ""

    async def token(self, request: Request, state: _State, service: ServiceConfig) -> Answer:
        form = _form(request)
        client = _authenticate(request, form, service)
        grant_type = form.get("grant_type")
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is required")
        now = self.clock()
        grant = _Grant(form, state, service, client, now)
        if grant_type == JWT_BEARER:
            claims, expires = await self.jwt_bearer(grant)
            label, extra = "jwt-bearer", {}
        elif grant_type == TOKEN_EXCHANGE:
            claims, expires = await self.exchange(grant)
            label, extra = "token-exchange", {"issued_token_type": ACCESS_TOKEN_TYPE}
        else:
            raise OAuthError("unsupported_grant_type", "this grant type is not supported")
        key = service.signing_keys[0]
        token = jwt.encode(
            claims, key.key, algorithm=key.alg, headers={"kid": key.kid, "typ": "at+jwt"}
        )
        self.metrics.count(ISSUED, label, client.id)
        return _json(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": max(0, math.floor(expires - now)),
                **extra,
            }
        )

    def _issue(self, grant: _Grant, source: Verified, expires: float) -> dict[str, Any]:
        service = grant.service
        claims: dict[str, Any] = {
            "iss": service.issuer,
            "sub": source.claims["sub"],
            "iat": int(grant.now),
            "exp": int(expires),
            "jti": secrets.token_urlsafe(16),
            "client_id": grant.client.id,
        }
        if service.audience:
            claims["aud"] = service.audience
        environment = grant.state.config.environment
        if environment:
            claims["env"] = environment
        for name in service.copy_claims:
            if name in source.claims and name not in claims:
                claims[name] = source.claims[name]
        return claims

    async def _validate(
        self, grant: _Grant, token: str, apps: tuple[str, ...], error: str
    ) -> Verified:
        try:
            verified = await grant.state.verifier.verify(token, grant.now)
        except Rejection as rejection:
            raise OAuthError(error, f"the token is not acceptable ({rejection.reason})") from None
        if verified.app.id not in apps:
            raise OAuthError(error, "tokens of this app are not accepted here")
        if not isinstance(verified.claims.get("sub"), str):
            raise OAuthError(error, "the token has no sub")
        return verified

    async def jwt_bearer(self, grant: _Grant) -> tuple[dict[str, Any], float]:
        service, client = grant.service, grant.client
        assertion = grant.form.get("assertion")
        if not assertion:
            raise OAuthError("invalid_request", "assertion is required")
        credential = await self._validate(
            grant, assertion, service.jwt_bearer_apps, "invalid_grant"
        )
        claims = credential.claims
        endpoint = service.issuer + "/oauth/token"
        if not {service.issuer, service.issuer + "/", endpoint} & set(audiences(claims)):
            raise OAuthError("invalid_grant", "the credential's aud must name this issuer")
        allowed = claims.get("allowed_clients")
        if isinstance(allowed, list):
            if client.id not in allowed:
                raise OAuthError("unauthorized_client", "this client may not use the credential")
        elif "org" in claims:
            if client.org is None or claims["org"] != client.org:
                raise OAuthError(
                    "unauthorized_client", "this client is not of the credential's org"
                )
        else:
            raise OAuthError(
                "unauthorized_client", "the credential names no allowed_clients and no org"
            )
        environment = grant.state.config.environment
        if environment is not None and claims.get("env") != environment:
            raise OAuthError("invalid_grant", f"the credential is not for {environment}")
        expires = grant.now + service.token_ttl
        return self._issue(grant, credential, expires), expires

    async def exchange(self, grant: _Grant) -> tuple[dict[str, Any], float]:
        service = grant.service
        token, kind = grant.form.get("subject_token"), grant.form.get("subject_token_type")
        if not token or kind not in SUBJECT_TYPES:
            raise OAuthError(
                "invalid_request", "subject_token and a supported subject_token_type are required"
            )
        subject = await self._validate(grant, token, service.token_exchange_apps, "invalid_request")
        expires = grant.now + service.token_ttl
        if subject.exp is not None:
            expires = min(expires, subject.exp)
        claims = self._issue(grant, subject, expires)
        actor: dict[str, Any] = {"sub": grant.client.id}
        if isinstance(subject.claims.get("act"), dict):
            actor["act"] = subject.claims["act"]  # RFC 8693 §4.1: earlier actors nest
        claims["act"] = actor
        return claims, expires


def _error(error: str, description: str) -> dict[str, str]:
    return {"error": error, "error_description": description}


def _form(request: Request) -> dict[str, str]:
    """The form parameters; repeated or oversized → invalid_request (RFC 6749 §3.2)."""
    content_type = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    length = request.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_FORM:
        raise OAuthError("invalid_request", "the body is too large")
    body = request.body
    if request.too_large or len(body) > MAX_FORM:
        raise OAuthError("invalid_request", "the body is too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the body is not a valid form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise OAuthError("invalid_request", f"{name} appears more than once")
        form[name] = value
    return form


def _authenticate(request: Request, form: dict[str, str], service: ServiceConfig) -> Client:
    """client_secret_basic or client_secret_post, compared in constant time."""
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    from_form = "client_id" in form or "client_secret" in form
    if scheme.lower() == "basic":
        if from_form and "client_secret" in form:
            raise OAuthError("invalid_request", "use one client authentication method")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise OAuthError("invalid_client", "malformed Basic credentials", 401) from None
        client_id, sep, secret = decoded.partition(":")
        if not sep:
            raise OAuthError("invalid_client", "malformed Basic credentials", 401)
        client_id, secret = unquote_plus(client_id), unquote_plus(secret)
    elif from_form:
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
    else:
        raise OAuthError("invalid_client", "client authentication is required", 401)
    client = next((c for c in service.clients if c.id == client_id), None)
    expected = client.secret if client is not None else _DUMMY_SECRET
    matches = hmac.compare_digest(secret.encode(), expected.encode())
    if client is None or not matches:
        raise OAuthError("invalid_client", "unknown client or wrong secret", 401)
    return client


def published_keys(service: ServiceConfig) -> list[dict[str, str]]:
    """The public JWKs of every signing key, each with its thumbprint as `kid`."""
    return [
        {**jwk.public_jwk(key.key.public_key()), "kid": key.kid, "alg": key.alg, "use": "sig"}
        for key in service.signing_keys
    ]


def metadata(service: ServiceConfig) -> dict[str, Any]:
    """RFC 8414 authorization server metadata."""
    return {
        "issuer": service.issuer,
        "token_endpoint": service.issuer + "/oauth/token",
        "jwks_uri": service.issuer + "/.well-known/jwks.json",
        "grant_types_supported": [JWT_BEARER, TOKEN_EXCHANGE],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "response_types_supported": [],
    }
