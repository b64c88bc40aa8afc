"""The error contract (SPEC §5) in one table, the proxy's fixed answers, and every exception
the proxy raises on purpose.

    raise Rejection(Reason.EXPIRED, app="TR21063826")
    entry = CONTRACT[Reason.EXPIRED]        # status 401, code 40, "TokenExpired", ...

Status codes, SDK codes, names, messages and challenges live only here. A `Rejection` carries a
reason word and never any token, secret or key material; `detail` is a human sentence for
`inspect` and logs, built from config words only.

    ConfigError([Problem("apps[1].secrets[0]", "invalid base64")], file="proxy.yaml")

The exception tree (every message is safe to print or log: no token, secret or key):

    ProxyError
    ├── Rejection ............ a request answered with the contract's error for `reason`
    │   └── UpstreamError .... the upstream failed before its response head (502/504)
    ├── OAuthError ........... the token service's RFC 6749 §5.2 error
    ├── ConfigError .......... a configuration that cannot be used (its `problems`)
    ├── KeyMaterialError ..... key material that cannot be used (also a ValueError)
    ├── FetchError ........... a JWKS or discovery fetch gave no usable document
    └── MintError ............ `mint`/`keygen` cannot make the token or key

Each is raised where its name says (`forward`, `token_service`, `config`, `jwk`, `keys`,
`mint`), which re-export it; a request handler needs only `except Rejection`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class Reason(StrEnum):
    """The contract's reason words."""

    MALFORMED = "malformed"
    TOO_LONG = "too_long"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    CRIT_HEADER = "crit_header"
    BAD_TYP = "bad_typ"
    UNKNOWN_APP = "unknown_app"
    UNKNOWN_KID = "unknown_kid"
    BAD_SIGNATURE = "bad_signature"
    NOT_YET_VALID = "not_yet_valid"
    LIFETIME_TOO_LONG = "lifetime_too_long"
    ISSUER = "issuer"
    AUDIENCE = "audience"
    MISSING_CLAIM = "missing_claim"
    CLAIM_MISMATCH = "claim_mismatch"
    MISSING = "missing"
    EXPIRED = "expired"
    APP_NOT_ALLOWED = "app_not_allowed"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    ROUTE_MISSING_CLAIM = "route_missing_claim"
    ROUTE_CLAIM_MISMATCH = "route_claim_mismatch"
    BINDING_MISMATCH = "binding_mismatch"
    MULTIPLE_TOKENS = "multiple_tokens"
    BAD_PATH = "bad_path"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    KEYS_UNAVAILABLE = "keys_unavailable"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class ContractEntry:
    """How one reason is answered: HTTP status, SDK code, name, message, challenge kind."""

    status: int
    code: int
    name: str
    message: str
    # RFC 6750 `error=` of the WWW-Authenticate challenge; "" = bare challenge; None = none.
    challenge: str | None


_INVALID = ContractEntry(401, 38, "TokenInvalid", "The token is invalid.", "invalid_token")
_FORBIDDEN = ContractEntry(
    403, 38, "TokenInvalid", "The token does not allow this request.", "insufficient_scope"
)


def _plain(status: int, name: str, message: str) -> ContractEntry:
    """An answer not about the token: its code is the HTTP status, and no challenge."""
    return ContractEntry(status, status, name, message, None)


CONTRACT: Final[dict[Reason, ContractEntry]] = {
    **{
        reason: _INVALID
        for reason in (
            Reason.MALFORMED,
            Reason.TOO_LONG,
            Reason.ALG_NOT_ALLOWED,
            Reason.CRIT_HEADER,
            Reason.BAD_TYP,
            Reason.UNKNOWN_APP,
            Reason.UNKNOWN_KID,
            Reason.BAD_SIGNATURE,
            Reason.NOT_YET_VALID,
            Reason.LIFETIME_TOO_LONG,
            Reason.ISSUER,
            Reason.AUDIENCE,
            Reason.MISSING_CLAIM,
            Reason.CLAIM_MISMATCH,
        )
    },
    Reason.MISSING: ContractEntry(401, 39, "TokenRequired", "A token is required.", ""),
    Reason.EXPIRED: ContractEntry(
        401, 40, "TokenExpired", "The token has expired.", "invalid_token"
    ),
    **{
        reason: _FORBIDDEN
        for reason in (
            Reason.APP_NOT_ALLOWED,
            Reason.INSUFFICIENT_SCOPE,
            Reason.ROUTE_MISSING_CLAIM,
            Reason.ROUTE_CLAIM_MISMATCH,
            Reason.BINDING_MISMATCH,
        )
    },
    Reason.MULTIPLE_TOKENS: ContractEntry(
        400, 38, "TokenInvalid", "The request carries more than one token.", "invalid_request"
    ),
    Reason.BAD_PATH: _plain(400, "BadRequest", "The request path is not acceptable."),
    Reason.METHOD_NOT_ALLOWED: _plain(
        405, "MethodNotAllowed", "The method is not allowed for this path."
    ),
    Reason.KEYS_UNAVAILABLE: _plain(
        503, "KeysUnavailable", "The signing keys are not available yet."
    ),
    Reason.UPSTREAM_UNAVAILABLE: _plain(502, "BadGateway", "The upstream service is unavailable."),
    Reason.UPSTREAM_TIMEOUT: _plain(504, "GatewayTimeout", "The upstream service timed out."),
    Reason.INTERNAL: _plain(500, "InternalError", "The proxy failed to handle the request."),
}


# The proxy's own answers to requests that never parsed (SPEC §6): fixed, never echoing input.
BAD_REQUEST_BODY: Final = (
    b'{"error":{"code":400,"name":"BadRequest","message":"The request could not be parsed."}}'
)
FIXED_BODIES: Final = {
    400: BAD_REQUEST_BODY,
    408: b'{"error":{"code":408,"name":"RequestTimeout",'
    b'"message":"The request did not arrive in time."}}',
    431: b'{"error":{"code":431,"name":"RequestHeaderFieldsTooLarge",'
    b'"message":"A request header is too large."}}',
    505: b'{"error":{"code":505,"name":"HTTPVersionNotSupported",'
    b'"message":"The HTTP version is not supported."}}',
}


class ProxyError(Exception):
    """The root of the tree above: an error the proxy raises on purpose, safe to print."""


class Rejection(ProxyError):
    """The request is answered with the contract's error for `reason` instead of forwarded."""

    def __init__(
        self,
        reason: Reason,
        detail: str = "",
        *,
        app: str = "",
        retry_after: int | None = None,
        allow: str | None = None,
        route: str = "",
    ) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.detail = detail or reason.value
        self.app = app
        self.retry_after = retry_after
        self.allow = allow  # method_not_allowed: the Allow header's value ("GET, POST")
        self.route = route  # method_not_allowed: the pattern whose methods those are


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration, at a key path such as `apps[1].secrets[0]`."""

    path: str
    message: str

    def render(self, file: str) -> str:
        return f"{file}: {self.path}: {self.message}" if self.path else f"{file}: {self.message}"


class ConfigError(ProxyError):
    """A configuration that cannot be used; `problems` lists every one found."""

    def __init__(self, problems: list[Problem], file: str) -> None:
        super().__init__(f"{len(problems)} problem(s) in {file}")
        self.problems = problems
        self.file = file

    def lines(self) -> list[str]:
        return [problem.render(self.file) for problem in self.problems]

    def report(self) -> int:
        """Print every problem on stderr; the exit status for a config that cannot be used."""
        complain(*self.lines())
        return 2


def complain(*lines: str) -> None:
    """Lines on stderr in one write: the workers of `--workers N` share it, and print's
    separate write of the newline let their lines interleave."""
    sys.stderr.write("".join(f"{line}\n" for line in lines))
    sys.stderr.flush()


class UpstreamError(Rejection):
    """The upstream failed before its response headers; `reason` says how."""


class OAuthError(ProxyError):
    """An RFC 6749 §5.2 error: `error` code, a description safe to show, the status."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


class KeyMaterialError(ProxyError, ValueError):
    """Key material that cannot be used; the message never holds the material."""


class FetchError(ProxyError):
    """A JWKS fetch that gave no usable document; the message is safe to log."""


class MintError(ProxyError):
    """Why no token can be minted; safe to print."""
