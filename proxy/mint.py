"""Minting tokens for an app of a config (`token-proxy mint`, the demo), and key generation.

    token = mint(config, "TR21063826", {"userId": "42"}, ttl=300, now=time.time())
    secret_or_pem, public_jwk = keygen("ES256", kid=None)

Claims: `iat`, `exp` (ttl, or the app's `max_lifetime` when shorter), the app's match claim,
its issuer and audience when it has exactly one, then the extra claims. HS* apps sign with
their first secret; asymmetric apps need the private key.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from . import jwk
from .config import TOKEN_SERVICE_APP, App, Config
from .errors import MintError as MintError  # re-exported: raised here
from .tokens import service_app


def claim_value(text: str) -> Any:
    """A `--claim` value: JSON when it parses, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def find_app(config: Config, app_id: str) -> App:
    implicit = service_app(config)
    apps: list[App] = [*config.apps, *([implicit] if implicit else [])]
    for app in apps:
        if app.id == app_id:
            return app
    raise MintError(f"no app with id {app_id!r} in {config.file}")


def mint(
    config: Config,
    app_id: str,
    extra: dict[str, Any],
    *,
    ttl: float = 300,
    now: float,
    private_key: bytes | None = None,
) -> str:
    """A signed token for `app_id`, as `token-proxy mint` prints it."""
    app = find_app(config, app_id)
    if app.max_lifetime is not None:
        ttl = min(ttl, app.max_lifetime)
    claims: dict[str, Any] = {"iat": int(now), "exp": int(now + ttl)}
    if app.match_claim is not None:
        claims[app.match_claim] = app.match_value
    if app.issuer is not None and len(app.issuer) == 1:
        claims["iss"] = app.issuer[0]
    if app.audience is not None and len(app.audience) == 1:
        claims["aud"] = app.audience[0]
    claims.update(extra)
    if app.secrets:
        return jwt.encode(claims, app.secrets[0], algorithm=app.algorithms[0])
    key = _private_key(config, app, private_key)
    alg = next((a for a in app.algorithms if jwk.key_fits(key, a)), None)
    if alg is None:
        raise MintError(f"the key fits none of app {app.id}'s algorithms")
    public = key.public_key()
    kid = next(
        (k.kid for k in app.keys if k.kid and jwk.thumbprint(k.key) == jwk.thumbprint(public)),
        None,
    )
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


def _private_key(config: Config, app: App, pem: bytes | None) -> Any:
    if pem is None:
        service = config.token_service
        if service is not None and app.id == TOKEN_SERVICE_APP:
            return service.signing_keys[0].key
        raise MintError(f"app {app.id} signs with a private key: give it with --key")
    try:
        return jwk.load_pem_private(pem)
    except jwk.KeyMaterialError as error:
        raise MintError(f"--key {error}") from None


def keygen(alg: str, kid: str | None = None) -> tuple[str, dict[str, str] | None]:
    """HS*: a random base64 secret; else a PEM private key and its public JWK."""
    if alg in jwk.HS_MIN_BYTES:
        return base64.b64encode(secrets.token_bytes(jwk.HS_MIN_BYTES[alg])).decode(), None
    key: Any
    if alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise MintError(f"keygen does not make {alg} keys")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key()
    members = jwk.public_jwk(public)
    return pem, {**members, "kid": kid or jwk.thumbprint(public), "alg": alg, "use": "sig"}
