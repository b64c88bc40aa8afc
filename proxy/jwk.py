"""Key material: JWS algorithms, PEM and JWK parsing into ready key objects, thumbprints,
and the URLs remote keys may be fetched from.

    key = load_pem_public(pem_bytes, source="public_keys[0]")  # raises KeyMaterialError
    keys, skipped = parse_jwks(document, source="jwks_url")    # [(index, VerifyKey)], [reasons]
    key.fits("RS256")                                          # RSA key, RS/PS algorithms
    private = load_pem_private(pem_bytes)                      # RSA, EC or Ed25519
    jwks_url_problem("http://idp.example/jwks")                # "jwks_url must be https (...)"

Parsing happens once per load or fetch; the request path only sees `VerifyKey` objects. All
JOSE crypto and JWK decoding is PyJWT's and cryptography's. Error messages name what is wrong,
never the key material: a library's explanation ("Coords should be 66 bytes for curve P-521")
is passed on only when it quotes no member of the JWK.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.exceptions import PyJWTError

from .errors import KeyMaterialError as KeyMaterialError  # re-exported: raised here

# Smallest HMAC key per algorithm: the hash size (RFC 7518 §3.2).
HS_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
SUPPORTED = frozenset(HS_MIN_BYTES) | ASYMMETRIC
# Every JWS algorithm registered with IANA: anything else in `alg` is not a JWS algorithm.
JWS_ALGORITHMS = SUPPORTED | {"ES256K", "Ed25519", "Ed448"}
ALGORITHMS: dict[str, Algorithm] = {
    name: alg for name, alg in get_default_algorithms().items() if name in SUPPORTED
}
MIN_RSA_BITS = 2048
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_JWK_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A public key ready for PyJWT, with the JWK attributes selection needs."""

    key: PublicKey = field(repr=False)
    kid: str | None
    alg: str | None  # the JWK's `alg`, when it names one
    source: str  # where it came from, for `inspect` and logs: "public_keys[0]", "jwks_url"

    def fits(self, alg: str) -> bool:
        """True when this key can verify `alg` (and the JWK's own `alg` allows it)."""
        if self.alg is not None and self.alg != alg:
            return False
        return key_fits(self.key, alg)


def key_fits(key: Any, alg: str) -> bool:
    """True when the key's type and curve are the ones `alg` uses."""
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey)
    if alg in _CURVES:
        return (
            isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey)
            and key.curve.name == _CURVES[alg]
        )
    if alg == "EdDSA":
        return isinstance(
            key,
            ed25519.Ed25519PublicKey
            | ed448.Ed448PublicKey
            | ed25519.Ed25519PrivateKey
            | ed448.Ed448PrivateKey,
        )
    return False


def check_public(key: Any) -> PublicKey:
    """The key as a public key of a supported type, RSA at least 2048 bits."""
    if not isinstance(key, PublicKey):
        raise KeyMaterialError("is not an RSA, EC or Ed25519/Ed448 public key")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise KeyMaterialError(f"is an RSA key of {key.key_size} bits, under {MIN_RSA_BITS}")
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in _JWK_CURVES:
        raise KeyMaterialError(f"is an EC key on {key.curve.name}, a curve no JWS algorithm uses")
    return key


def load_pem_public(data: bytes, source: str) -> VerifyKey:
    """A PEM public key or X.509 certificate as a `VerifyKey` without a `kid`."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyMaterialError("is not a PEM public key or certificate") from None
    except Exception:  # cryptography raises UnsupportedAlgorithm for exotic keys
        raise KeyMaterialError("is not a PEM public key or certificate") from None
    return VerifyKey(check_public(key), None, None, source)


def load_pem_private(data: bytes) -> PrivateKey:
    """An unencrypted PEM private key: RSA, EC or Ed25519."""
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyMaterialError("is not an unencrypted PEM private key") from None
    except Exception:  # cryptography raises UnsupportedAlgorithm for exotic keys
        raise KeyMaterialError("is not an unencrypted PEM private key") from None
    if not isinstance(key, PrivateKey):
        raise KeyMaterialError("is not an RSA, EC or Ed25519 private key")
    return key


def signing_alg(key: PrivateKey) -> str | None:
    """The algorithm a token service signs with this key: ES256 (P-256), RS256 (RSA >= 2048)."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= MIN_RSA_BITS:
        return "RS256"
    return None


_FAMILIES = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}


def from_jwk(jwk: Any, source: str, private_ok: bool = False) -> VerifyKey:
    """One JWK (a dict) as a `VerifyKey`; a private JWK is refused unless `private_ok`."""
    if not isinstance(jwk, dict):
        raise KeyMaterialError("is not a JSON object")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise KeyMaterialError("has a kid that is not a string")
    alg = jwk.get("alg")
    if alg is not None and alg not in ASYMMETRIC:
        raise KeyMaterialError("has an alg that is not an asymmetric JWS algorithm")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise KeyMaterialError("has a use other than sig")
    family = _FAMILIES.get(jwk.get("kty"))  # type: ignore[arg-type]
    if family is None:
        raise KeyMaterialError("has a kty other than RSA, EC or OKP")
    if "d" in jwk and not private_ok:
        raise KeyMaterialError("holds a private key (publish the public key only)")
    try:
        key = ALGORITHMS[family].from_jwk(jwk)
    except (PyJWTError, ValueError, TypeError, KeyError) as error:
        raise KeyMaterialError("is not a valid JWK" + _explained(error, jwk)) from None
    if hasattr(key, "public_key"):
        key = key.public_key()
    checked = check_public(key)
    if alg is not None and not key_fits(checked, alg):
        raise KeyMaterialError("has an alg that does not fit its key type")
    return VerifyKey(checked, kid, alg, source)


def _explained(error: Exception, jwk: dict[Any, Any]) -> str:
    """` (the library's reason)`, or "" when it could quote the key: it names a member's value,
    is long, or is not plain text."""
    text = str(error).strip()
    # The names of things (kty, crv, alg) may appear in it; key material may not.
    named = ("kty", "crv", "alg", "use")
    values = [str(v) for k, v in jwk.items() if k not in named and isinstance(v, str | int)]
    if (
        isinstance(error, KeyError | TypeError)
        or not text
        or len(text) > 100
        or not text.isascii()
        or not text.isprintable()
        or any(value in text for value in values if len(value) > 3)
    ):
        return ""
    return f" ({text})"


def describe(key: Any) -> str:
    """The kind of a key for a message: "an RSA key", "an EC P-384 key", "an Ed25519 key"."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"an RSA key ({key.key_size} bits)"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"an EC {_JWK_CURVES.get(key.curve.name, key.curve.name)} key"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    if isinstance(key, ed448.Ed448PublicKey | ed448.Ed448PrivateKey):
        return "an Ed448 key"
    return "a key"


def parse_jwks(document: Any, source: str) -> tuple[list[tuple[int, VerifyKey]], list[str]]:
    """The usable keys of a JWKS document with their index in `keys`, and one line per key
    skipped (index and why)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeyMaterialError("is not a JWKS document (an object with a keys list)")
    keys: list[tuple[int, VerifyKey]] = []
    skipped: list[str] = []
    for index, jwk in enumerate(document["keys"]):
        try:
            keys.append((index, from_jwk(jwk, source)))
        except KeyMaterialError as error:
            skipped.append(f"keys[{index}] {error}")
    return keys, skipped


def public_jwk(key: PublicKey) -> dict[str, str]:
    """The public JWK members of a key (RFC 7517), without `kid`."""
    family = (
        "RS256"
        if isinstance(key, rsa.RSAPublicKey)
        else "ES256"
        if isinstance(key, ec.EllipticCurvePublicKey)
        else "EdDSA"
    )
    jwk: dict[str, Any] = ALGORITHMS[family].to_jwk(key, as_dict=True)  # key_ops: a list
    return {k: str(v) for k, v in jwk.items() if k in ("kty", "n", "e", "crv", "x", "y")}


def thumbprint(key: PublicKey) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public key, base64url without padding."""
    members = public_jwk(key)
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(canonical).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# --- Where remote keys may come from ----------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def jwks_url_problem(url: str, what: str = "jwks_url") -> str | None:
    """Why `url` may not be fetched (https only, http for loopback), or None."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL at all ("https://[x")
        parts = urlsplit("")
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return None
    return f"{what} must be https (http only for 127.0.0.0/8, ::1, localhost)"


def without_userinfo(url: str) -> str:
    """A URL as a message may show it: `user:password@` removed."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1", url)
