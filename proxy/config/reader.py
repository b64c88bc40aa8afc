"""What every section reader shares: where the file is, which values a message may show, and
the value parsers `Section.field` takes (each raises ValueError with the message).

    reader = Reader("config/proxy.yaml", hidden=substituted_strings(tree))
    reader.named("unknown app", "ghost-app")      # 'unknown app "ghost-app"'
    reader.read_file(section, "jwks_file", path)  # bytes, or None after a problem
"""

from __future__ import annotations

import base64
import binascii
import re
import ssl
from pathlib import Path
from typing import Any

from ..jwk import without_userinfo
from ..yamlconf import Section, as_number, as_string, quoted
from .schema import Listen

ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
TOKEN_CHARS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,254}[\x21-\x7e])?")


class Reader:
    """The file being read and the strings `${VAR}` substitution produced (never shown)."""

    def __init__(self, file: str, hidden: frozenset[str]) -> None:
        self.file = file
        self.base = Path(file).resolve().parent
        self.hidden = frozenset(h for h in hidden if h)  # substituted: never in a message

    def url_problem(self, url: str, problem: str) -> str:
        """A URL rule's message with the URL (without its userinfo) when it may be shown."""
        shown = self.show(without_userinfo(url)) if self.show(url) else None
        return f"{problem}, not {shown}" if shown else problem

    def show(self, value: object) -> str | None:
        """`"value"` for a message, or None when it must not be shown: it is, or is part of,
        a string from `${VAR}` substitution."""
        text = quoted(value)
        if text is None or any(str(value) in h or h in str(value) for h in self.hidden):
            return None
        return text

    def that(self, value: object) -> str:
        """`"value"` as the subject of a message, or "the value" when it must not be shown."""
        return self.show(value) or "the value"

    def named(self, what: str, value: object) -> str:
        """`what "value"`, or just `what` when the value must not be shown."""
        text = self.show(value)
        return f"{what} {text}" if text else what

    def path(self, value: str) -> Path:
        return self.base / value

    def read_file(self, section: Section, key: str, value: str) -> bytes | None:
        try:
            return self.path(value).read_bytes()
        except (OSError, ValueError) as error:  # ValueError: a NUL in the path
            why = (
                "no such file"
                if isinstance(error, FileNotFoundError)
                else "permission denied"
                if isinstance(error, PermissionError)
                else "unreadable"
            )
            section.problem(key, f"{self.named('file', value)} cannot be read ({why})")
            return None

    def ca_file(self, section: Section) -> str | None:
        """`ca_file`, an extra PEM CA bundle, as a resolved path; None after a problem."""
        value = section.optional_string("ca_file")
        if value is None:
            return None
        try:
            client_context(str(self.path(value)))
        except (OSError, ssl.SSLError, ValueError):
            section.problem("ca_file", f"{self.that(value)} is not a readable PEM CA bundle")
            return None
        return str(self.path(value))


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The listener's TLS context (raises OSError, ssl.SSLError or ValueError when unusable)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """A TLS client context trusting the system's CAs and, when given, the bundle `ca_file`."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(ca_file)
    return context


def listen(value: Any) -> Listen:
    text = as_string(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        shown = quoted(value)
        raise ValueError("must be HOST:PORT" + (f", not {shown}" if shown else ""))
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return Listen(host or "0.0.0.0", int(port))  # noqa: S104 - the documented default


def b64decode(value: str) -> bytes:
    text = value.strip()
    alt = b"-_" if ("-" in text or "_" in text) else None
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, altchars=alt, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64") from None


def one_or_more(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (str(value),)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(str(v) for v in value)
    raise ValueError("must be a string or a non-empty list of strings")


def claims(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("must be a mapping of claim to value")
    return {str(k): plain(v) for k, v in value.items()}


def plain(value: Any) -> Any:
    """A YAML value as the JSON value it stands for (Substituted strings become plain str)."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def positive(value: Any) -> float:
    number = as_number(value)
    if number <= 0:
        raise ValueError("must be a positive number of seconds")
    return number


def server_header(value: Any) -> str | None:
    if value is None:
        return None
    text = as_string(value)
    if not _HEADER_VALUE.fullmatch(text):
        raise ValueError("must be 1-256 printable ASCII characters (a header value) or null")
    return text


def timeout(value: Any) -> float:
    """A timeout: a positive number of seconds (zero would mean "never" or "at once")."""
    number = as_number(value, minimum=-float("inf"))
    if number <= 0:
        raise ValueError("must be a positive number of seconds")
    return number
