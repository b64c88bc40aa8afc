"""Framings a client can choose, shared by the differential (nginx) and strict-parser (h11) tests.

FRAMED: (id, extra headers, body as sent, body the upstream must read)
BAD_FRAMING: extra headers the SPEC answers with 400 (nothing goes upstream)
REJECTED_FIRST: a rejected request whose body is a request (never parsed as one)
"""

from __future__ import annotations

import gzip
import random
import zlib

import pytest


def head(method: str, target: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", "Host: client.example", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(*parts: bytes, last: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in parts) + last


SMUGGLED = b"GET /open/smuggled HTTP/1.1\r\nHost: x\r\nX-Auth-User-Id: 1\r\n\r\n"
RNG = random.Random(17)
BINARY = bytes(RNG.getrandbits(8) for _ in range(70_001)) + b"\r\n\r\n" + SMUGGLED


GZIP_TRAP = gzip.compress(b"A" * 100 + SMUGGLED)
DEFLATE_TRAP = zlib.compress(b"A" * 100 + SMUGGLED)

# (id, extra headers, body as sent on the wire, the body bytes nginx must read)
FRAMED: list[tuple[str, list[str], bytes, bytes]] = [
    ("cl", ["Content-Length: 11"], b"hello world", b"hello world"),
    ("cl-zero", ["Content-Length: 0"], b"", b""),
    ("cl-leading-zeros", ["Content-Length: 005"], b"hello", b"hello"),
    ("cl-binary-70k", [f"Content-Length: {len(BINARY)}"], BINARY, BINARY),
    (
        "chunked",
        ["Transfer-Encoding: chunked"],
        chunked(b"hello", b" world"),
        b"hello world",
    ),
    (
        "chunked-extensions",
        ["Transfer-Encoding: chunked"],
        b'5;name=value\r\nhello\r\n6;a;b="c d"\r\n world\r\n0;last=1\r\n\r\n',
        b"hello world",
    ),
    (
        "chunked-odd-sizes",
        ["Transfer-Encoding: chunked"],
        chunked(b"a", b"bcd", BINARY[:4097], BINARY[:65537], b"\r\n0\r\n\r\n"),
        b"abcd" + BINARY[:4097] + BINARY[:65537] + b"\r\n0\r\n\r\n",
    ),
    (
        "chunked-uppercase-hex",
        ["Transfer-Encoding: chunked"],
        b"A\r\n0123456789\r\n1F\r\n" + b"x" * 31 + b"\r\n000\r\n\r\n",
        b"0123456789" + b"x" * 31,
    ),
    (
        "chunked-leading-zeros",
        ["Transfer-Encoding: chunked"],
        b"0005\r\nhello\r\n0\r\n\r\n",
        b"hello",
    ),
    (
        "chunked-trailers",
        ["Transfer-Encoding: chunked", "Trailer: X-Checksum"],
        chunked(b"hello", last=b"0\r\nX-Checksum: 1\r\nX-Auth-User-Id: 1\r\n\r\n"),
        b"hello",
    ),
    ("chunked-empty", ["Transfer-Encoding: chunked"], b"0\r\n\r\n", b""),
    ("chunked-case", ["Transfer-Encoding: Chunked"], chunked(b"hello"), b"hello"),
    (
        "gzip",
        ["Content-Encoding: gzip", f"Content-Length: {len(GZIP_TRAP)}"],
        GZIP_TRAP,
        GZIP_TRAP,
    ),
    (
        "GZIP",
        ["Content-Encoding: GZIP", f"Content-Length: {len(GZIP_TRAP)}"],
        GZIP_TRAP,
        GZIP_TRAP,
    ),
    (
        "gzip-chunked",
        ["Content-Encoding: gzip", "Transfer-Encoding: chunked"],
        chunked(GZIP_TRAP[:10], GZIP_TRAP[10:]),
        GZIP_TRAP,
    ),
    (
        "deflate",
        ["Content-Encoding: deflate", f"Content-Length: {len(DEFLATE_TRAP)}"],
        DEFLATE_TRAP,
        DEFLATE_TRAP,
    ),
    (
        "br",  # not valid brotli: nothing may try to decode it
        ["Content-Encoding: br", f"Content-Length: {len(BINARY[:999])}"],
        BINARY[:999],
        BINARY[:999],
    ),
    ("identity", ["Content-Encoding: identity", "Content-Length: 5"], b"hello", b"hello"),
    (
        "gzip-twice",
        ["Content-Encoding: gzip, gzip", f"Content-Length: {len(GZIP_TRAP)}"],
        GZIP_TRAP,
        GZIP_TRAP,
    ),
]


BAD_FRAMING = [
    pytest.param(["Content-Length: 5", "Content-Length: 6"], id="cl-conflicting"),
    pytest.param(["Content-Length: 5, 6"], id="cl-list-conflicting"),
    pytest.param(["Content-Length: 5, 5"], id="cl-list"),
    pytest.param(["Content-Length: +5"], id="cl-plus"),
    pytest.param(["Content-Length: 0x5"], id="cl-hex"),
    pytest.param(["Content-Length: -1"], id="cl-negative"),
    pytest.param(["Content-Length: 5a"], id="cl-suffix"),
    pytest.param(["Content-Length: 5 5"], id="cl-two-numbers"),
    pytest.param(["Content-Length: 18446744073709551615"], id="cl-2^64-1"),
    pytest.param(["Content-Length: 18446744073709551621"], id="cl-wraps-to-5"),
    pytest.param(["Content-Length: 9223372036854775808"], id="cl-2^63"),
    pytest.param(["Content-Length :5"], id="cl-space-before-colon"),
    pytest.param(["Transfer-Encoding : chunked"], id="te-space-before-colon"),
    pytest.param(["Transfer-Encoding: xchunked"], id="te-unknown"),
    pytest.param(["Transfer-Encoding: chunked, identity"], id="te-chunked-not-last"),
]


REJECTED_FIRST = [
    pytest.param(
        head("POST", "/api/rejected", f"Content-Length: {len(SMUGGLED)}") + SMUGGLED,
        401,
        id="401-content-length",
    ),
    pytest.param(
        head("POST", "/api/rejected", "Transfer-Encoding: chunked") + chunked(SMUGGLED),
        401,
        id="401-chunked",
    ),
    pytest.param(
        head("POST", "/api/rejected", "Expect: 100-continue", f"Content-Length: {len(SMUGGLED)}")
        + SMUGGLED,
        401,
        id="401-expect-body-anyway",
    ),
    pytest.param(
        head("POST", "/open/../../x", f"Content-Length: {len(SMUGGLED)}") + SMUGGLED,
        400,
        id="400-bad-path",
    ),
    pytest.param(
        head(
            "POST",
            "/api/rejected",
            "Authorization: Bearer x.y.z",
            f"Content-Length: {len(SMUGGLED)}",
        )
        + SMUGGLED,
        401,
        id="401-bad-token",
    ),
]
