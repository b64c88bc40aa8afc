"""Differential framing tests (SPEC §5, §6): a real nginx, which nobody here wrote, upstream.

    nginx = the session's nginx; mark = nginx.mark()
    answers = await exchange(proxy, raw_request_bytes)       # raw socket, every framing
    seen = await nginx.lines_since(mark, expect=1)          # nginx's own access log
    assert [line.request for line in seen] == ["POST /open/x HTTP/1.1"]
    assert nginx.body(seen[0]) == body                      # the bytes nginx read, on disk

nginx logs the raw request line, `$content_length`, `$request_length` and, through
`client_body_in_file_only`, keeps every request body it read in a file: the test compares those
bytes with what the client sent. So one request in, one request out is checked by a parser
that is not ours: an extra line in the log is a request the decision never saw, a changed body
is a decoded or mis-framed one. nginx answers `seen <target>` (an inner server behind
`proxy_pass`, which is what makes nginx read the body), so the answers' order is checked too.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import ProxyFactory, RunningProxy
from tests.framings import BAD_FRAMING, FRAMED, REJECTED_FIRST, SMUGGLED, chunked, head
from tests.nginx import NGINX, Nginx, Seen, start_nginx

pytestmark = pytest.mark.slow  # ~0.3 s a test, waiting for nginx's log; ~30 s in all


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    if NGINX is None:
        pytest.skip("nginx is not installed (.ci/run installs Debian's nginx package)")
    server = start_nginx(tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


ROUTES = [
    {"path": "/open/*", "auth": "none"},
    {"path": "/*", "auth": "required"},
]


@pytest.fixture
async def front(proxy_for: ProxyFactory, nginx: Nginx) -> RunningProxy:
    """The proxy in front of nginx: `/open/*` needs no token, everything else one."""
    return await proxy_for({"upstream": {"url": nginx.url}, "routes": ROUTES})


# --- A raw client: bytes out, answers parsed by hand (nothing a client library would fix) ---


@dataclass
class Answer:
    status: int
    version: str
    headers: dict[str, list[str]]
    body: bytes
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class Client:
    """One raw connection to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.method_queue: list[str] = []

    @classmethod
    async def open(cls, proxy: RunningProxy) -> Client:
        host, port = proxy.url.split("//", 1)[1].split(":")
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, wait: float = 5.0) -> Answer | None:
        """The next answer (a 1xx interim one included), or None when the proxy closed."""
        try:
            async with asyncio.timeout(wait):
                return await self._answer()
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        except TimeoutError:
            raise AssertionError(f"no answer within {wait} s, and the connection is open") from None

    async def _answer(self) -> Answer:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, status_text = lines[0].split(" ", 2)[:2]
        status = int(status_text)
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        body = b""
        if 100 <= status < 200 or status in (204, 304):
            pass
        elif "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while await self.reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers
                    break
                body += await self.reader.readexactly(size)
                await self.reader.readexactly(2)
        elif "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"][0]))
        else:
            body = await self.reader.read()  # close-delimited
        return Answer(status, version, headers, body, head)

    async def final(self, wait: float = 5.0) -> Answer | None:
        """The next final answer, skipping 1xx interim ones."""
        while True:
            answer = await self.answer(wait)
            if answer is None or answer.status >= 200 or answer.status == 101:
                return answer

    async def answers(self, count: int, wait: float = 5.0) -> list[Answer]:
        """Up to `count` final answers, fewer when the proxy closes first."""
        found: list[Answer] = []
        while len(found) < count:
            answer = await self.final(wait)
            if answer is None:
                break
            found.append(answer)
        return found

    async def closed(self, wait: float = 3.0) -> bool:
        """True when the proxy closes the connection (EOF or reset) within `wait`."""
        try:
            async with asyncio.timeout(wait):
                while await self.reader.read(65536):
                    pass
            return True
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.writer.close()


async def exchange(proxy: RunningProxy, data: bytes, count: int) -> list[Answer]:
    client = await Client.open(proxy)
    try:
        await client.send(data)
        return await client.answers(count)
    finally:
        client.close()


def _seen_by_nginx(answer: Answer, target: str) -> bool:
    return answer.status == 200 and answer.body == f"seen {target}\n".encode()


def _assert_no_stranger(seen: list[Seen], allowed: set[str]) -> None:
    """Every request nginx parsed is one the client sent and the decision let through."""
    strangers = [line.request for line in seen if line.request not in allowed]
    assert not strangers, f"nginx parsed requests nobody decided on: {strangers}"


# --- Bodies that must arrive byte for byte --------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "wire", "expected"),
    [pytest.param(e, w, x, id=i) for i, e, w, x in FRAMED],
)
@pytest.mark.parametrize("auth", ["none", "token"])
async def test_body_reaches_nginx_byte_for_byte(
    front: RunningProxy,
    nginx: Nginx,
    extra: list[str],
    wire: bytes,
    expected: bytes,
    auth: str,
) -> None:
    """One request in, one out, same body (SPEC §6): whatever the framing or encoding."""
    target = "/open/framed?q=1" if auth == "none" else "/api/framed?q=1"
    token = [f"Authorization: Bearer {front.token(userId='42')}"] if auth == "token" else []
    mark = nginx.mark()
    request = head("POST", target, *token, *extra) + wire
    # the same request twice on one connection: the second proves the first was framed right
    answers = await exchange(front, request + request, 2)
    assert [a.status for a in answers] == [200, 200]
    assert all(_seen_by_nginx(a, target) for a in answers)
    seen = await nginx.lines_since(mark, expect=2)
    assert [line.request for line in seen] == [f"POST {target} HTTP/1.1"] * 2
    for line in seen:
        assert line["status"] == "200"
        body = nginx.body(line)
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(expected).hexdigest()
        assert int(line["content_length"] or len(expected)) == len(expected)
        encoding = next((h.split(": ", 1)[1] for h in extra if h.startswith("Content-Enc")), "")
        assert line["content_encoding"] == encoding  # passed on as it came, never undone
        assert line["user_id"] == ("42" if auth == "token" else "")  # trailers never forwarded


# --- Lengths and codings the SPEC answers with 400: nothing reaches nginx ---------------------


@pytest.mark.parametrize("extra", BAD_FRAMING)
async def test_ambiguous_length_is_400_and_reaches_nothing(
    front: RunningProxy, nginx: Nginx, extra: list[str]
) -> None:
    """SPEC §6: a Content-Length that is not a plain decimal below 2^63 → 400; a framing two
    parsers could read differently is refused before anything goes upstream. The next request
    on the connection (its body, here) is never parsed as a request either."""
    mark = nginx.mark()
    answers = await exchange(
        front,
        head("POST", "/open/ambiguous", *extra) + b"hello" + SMUGGLED,
        2,
    )
    assert [a.status for a in answers][:1] in ([400], [501])
    assert len(answers) == 1  # the connection is closed: nothing after it is read as a request
    assert b"smuggled" not in answers[0].body
    assert await nginx.lines_since(mark, expect=0, settle=0.3) == []


async def test_length_2_to_the_64_does_not_eat_the_next_users_request(
    front: RunningProxy, nginx: Nginx
) -> None:
    """Defect 2: `Content-Length: 18446744073709551615` was read as no body and forwarded
    with that length, so the upstream took the next user's request (token included) as body."""
    mark = nginx.mark()
    first = await exchange(
        front, head("POST", "/open/huge", "Content-Length: 18446744073709551615"), 1
    )
    assert [a.status for a in first] == [400]
    token = front.token(userId="7")
    second = await exchange(
        front, head("GET", "/api/next", f"Authorization: Bearer {token}", "Connection: close"), 1
    )
    assert len(second) == 1 and _seen_by_nginx(second[0], "/api/next")
    seen = await nginx.lines_since(mark, expect=1)
    assert [line.request for line in seen] == ["GET /api/next HTTP/1.1"]
    assert seen[0]["user_id"] == "7"


# --- Both lengths, and chunk framings a lenient parser reads differently ---------------------


@pytest.mark.parametrize(
    ("extra", "wire", "expected"),
    [
        pytest.param(
            ["Content-Length: 4", "Transfer-Encoding: chunked"],
            b"5\r\nhello\r\n0\r\n\r\n",
            b"hello",
            id="cl-and-te",
        ),
        pytest.param(
            ["Transfer-Encoding: chunked", "Content-Length: 4"],
            b"5\r\nhello\r\n0\r\n\r\n",
            b"hello",
            id="te-and-cl",
        ),
        pytest.param(
            ["Content-Length: 5", "Content-Length: 5"], b"hello", b"hello", id="cl-duplicate-same"
        ),
    ],
)
async def test_two_framings_at_once(
    front: RunningProxy, nginx: Nginx, extra: list[str], wire: bytes, expected: bytes
) -> None:
    """CL.TE: a parser that believes `Content-Length: 4` sees `0\\r\\n\\r\\n` and then a
    second request. The proxy either refuses (400, nothing upstream) or reads one framing
    (RFC 9112 §6.1: the chunked one), forwards exactly that body and then closes the
    connection, so the bytes after it are read by nobody."""
    mark = nginx.mark()
    answers = await exchange(front, head("POST", "/open/clte", *extra) + wire + SMUGGLED, 2)
    assert answers, "no answer"
    refused = answers[0].status == 400
    seen = await nginx.lines_since(mark, expect=0 if refused else 1)
    _assert_no_stranger(seen, {"POST /open/clte HTTP/1.1"})
    assert all(b"smuggled" not in a.body for a in answers)
    if refused:
        assert seen == [] and len(answers) == 1
    else:
        assert _seen_by_nginx(answers[0], "/open/clte")
        assert len(seen) == 1 and nginx.body(seen[0]) == expected
        if "Transfer-Encoding: chunked" in extra:
            assert len(answers) == 1  # closed after the answer (RFC 9112 §6.1)


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="size-not-hex"),
        pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="data-without-crlf"),
        pytest.param(b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n", id="size-overflow"),
        pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="size-negative"),
        pytest.param(b"5 \r\nhello\r\n0\r\n\r\n", id="size-trailing-space"),
        pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", id="size-0x"),
        pytest.param(b"5\nhello\n0\n\n", id="bare-lf"),
        pytest.param(b"5\rhello\r0\r\r", id="bare-cr"),
    ],
)
async def test_malformed_chunks_never_smuggle(
    front: RunningProxy, nginx: Nginx, wire: bytes
) -> None:
    """A chunk framing the proxy cannot read for sure: it may refuse or abort, but nginx never
    parses a second request, and never completes one with a body the client did not frame."""
    mark = nginx.mark()
    answers = await exchange(
        front,
        head("POST", "/open/badchunk", "Transfer-Encoding: chunked") + wire + SMUGGLED,
        2,
    )
    seen = await nginx.lines_since(mark, expect=0, settle=0.5)
    _assert_no_stranger(seen, {"POST /open/badchunk HTTP/1.1"})
    assert len(seen) <= 1
    assert all(b"smuggled" not in a.body for a in answers)
    if seen and seen[0]["status"] == "200":
        assert nginx.body(seen[0]) == b"hello"  # only a reading that matches nginx's own
    assert not answers or answers[0].status in (200, 400, 502)


# --- Expect: 100-continue -------------------------------------------------------------------


async def test_expect_continue_accepted(front: RunningProxy, nginx: Nginx) -> None:
    """The decision runs first; then `100 Continue`, then the body goes upstream as it came."""
    mark = nginx.mark()
    client = await Client.open(front)
    try:
        await client.send(head("POST", "/open/expect", "Expect: 100-continue", "Content-Length: 5"))
        interim = await client.answer(wait=3)
        assert interim is not None and interim.status == 100
        await client.send(b"hello")
        final = await client.final()
        assert final is not None and _seen_by_nginx(final, "/open/expect")
    finally:
        client.close()
    seen = await nginx.lines_since(mark, expect=1)
    assert [line.request for line in seen] == ["POST /open/expect HTTP/1.1"]
    assert nginx.body(seen[0]) == b"hello"


async def test_expect_continue_rejected_reads_no_body(front: RunningProxy, nginx: Nginx) -> None:
    """A rejected `Expect: 100-continue` request gets its 401 at once, no `100 Continue`, and
    its connection closed; a body sent anyway is never parsed as a request."""
    mark = nginx.mark()
    client = await Client.open(front)
    try:
        await client.send(
            head("POST", "/api/expect", "Expect: 100-continue", "Content-Length: 10000000000")
        )
        first = await client.answer(wait=3)
        assert first is not None and first.status == 401
        await client.send(SMUGGLED)  # what a client that gave up waiting would send
        assert await client.closed()
    finally:
        client.close()
    assert await nginx.lines_since(mark, expect=0, settle=0.3) == []


@pytest.mark.parametrize("expect", [True, False], ids=["expect", "no-expect"])
async def test_rejected_body_is_not_drained(
    front: RunningProxy, nginx: Nginx, expect: bool
) -> None:
    """Defect 8: after the 401 the old listener read and discarded the whole body (10 GB in
    6 s). SPEC §6: answer, then close (at most 64 KB more read). The client here keeps
    sending; the proxy must cut it off long before 64 MB, whatever the socket buffers hold."""
    mark = nginx.mark()
    host, port = front.url.split("//", 1)[1].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    extra = ["Expect: 100-continue"] if expect else []
    await loop.sock_sendall(sock, head("POST", "/api/drain", *extra, "Content-Length: 10000000000"))
    answer = b""
    async with asyncio.timeout(5):
        while b"\r\n\r\n" not in answer:
            answer += await loop.sock_recv(sock, 65536)
    assert answer.startswith(b"HTTP/1.1 401")
    sent, cut = 0, False
    chunk = b"x" * 65536
    async with asyncio.timeout(20):
        while sent < 64 << 20:
            try:
                await loop.sock_sendall(sock, chunk)
            except OSError:  # reset or broken pipe: the proxy closed
                cut = True
                break
            sent += len(chunk)
    sock.close()
    assert cut, f"the proxy read {sent} bytes of a rejected body"
    assert await nginx.lines_since(mark, expect=0, settle=0.3) == []


# --- Pipelining, a rejected request first -----------------------------------------------------


async def test_pipelined_answers_in_order(front: RunningProxy, nginx: Nginx) -> None:
    token = front.token(userId="5")
    requests = [
        head("GET", "/open/p1"),
        head("POST", "/open/p2", "Content-Length: 5") + b"hello",
        head("POST", "/api/p3", f"Authorization: Bearer {token}", "Transfer-Encoding: chunked")
        + chunked(b"abc", b"defgh"),
        head("DELETE", "/open/p4"),
        head("GET", "/open/p5", "Connection: close"),
    ]
    mark = nginx.mark()
    answers = await exchange(front, b"".join(requests), 6)
    targets = ["/open/p1", "/open/p2", "/api/p3", "/open/p4", "/open/p5"]
    assert [a.body for a in answers] == [f"seen {t}\n".encode() for t in targets]
    seen = await nginx.lines_since(mark, expect=5)
    assert sorted(line.request for line in seen) == sorted(
        f"{m} {t} HTTP/1.1"
        for m, t in zip(["GET", "POST", "POST", "DELETE", "GET"], targets, strict=True)
    )
    bodies = {line.request.split()[1]: nginx.body(line) for line in seen}
    assert bodies == {
        "/open/p1": b"",
        "/open/p2": b"hello",
        "/api/p3": b"abcdefgh",
        "/open/p4": b"",
        "/open/p5": b"",
    }


@pytest.mark.parametrize(("first", "status"), REJECTED_FIRST)
async def test_rejected_body_is_never_a_request(
    front: RunningProxy, nginx: Nginx, first: bytes, status: int
) -> None:
    """SPEC §6: a rejected request's unread body is never parsed as a request: the proxy
    skips it (then answers the next request) or closes the connection."""
    mark = nginx.mark()
    after = head("GET", "/open/after", "Connection: close")
    answers = await exchange(front, first + after, 3)
    assert answers and answers[0].status == status
    assert all(b"smuggled" not in a.body for a in answers)
    assert len(answers) <= 2
    seen = await nginx.lines_since(mark, expect=len(answers) - 1)
    _assert_no_stranger(seen, {"GET /open/after HTTP/1.1"})
    if len(answers) == 2:
        assert _seen_by_nginx(answers[1], "/open/after") and len(seen) == 1
    else:
        assert seen == []


# --- HTTP/1.0, versions, Upgrade --------------------------------------------------------------


async def test_http10_keep_alive(front: RunningProxy, nginx: Nginx) -> None:
    """An HTTP/1.0 client that asks for keep-alive gets length-framed answers (it cannot read
    chunks) on one connection; its second request is read where the first ended."""
    mark = nginx.mark()
    client = await Client.open(front)
    try:
        await client.send(head("GET", "/open/ten-a", "Connection: keep-alive", version="HTTP/1.0"))
        first = await client.final()
        assert first is not None and _seen_by_nginx(first, "/open/ten-a")
        assert first.header("transfer-encoding") is None
        assert first.header("content-length") == str(len(first.body))
        assert (first.header("connection") or "").lower() == "keep-alive"
        await client.send(
            head(
                "POST",
                "/open/ten-b",
                "Connection: keep-alive",
                "Content-Length: 3",
                version="HTTP/1.0",
            )
            + b"abc"
        )
        second = await client.final()
        assert second is not None and _seen_by_nginx(second, "/open/ten-b")
        await client.send(head("GET", "/open/ten-c", version="HTTP/1.0"))  # no keep-alive: closes
        third = await client.final()
        assert third is not None and _seen_by_nginx(third, "/open/ten-c")
        assert await client.closed()
    finally:
        client.close()
    seen = await nginx.lines_since(mark, expect=3)
    assert [line.request.split()[1] for line in seen] == [
        "/open/ten-a",
        "/open/ten-b",
        "/open/ten-c",
    ]
    assert nginx.body(seen[1]) == b"abc"


@pytest.mark.parametrize(
    ("line", "statuses"),
    [
        pytest.param(b"GET /open/v HTTP/2.0\r\nHost: a\r\n\r\n", (505, 400), id="http2"),
        pytest.param(b"GET /open/v HTTP/3.0\r\nHost: a\r\n\r\n", (505, 400), id="http3"),
        pytest.param(b"GET /open/v HTTP/1.2\r\nHost: a\r\n\r\n", (505, 400), id="http1.2"),
        pytest.param(b"GET /open/v\r\n\r\n", (400, 505), id="http0.9"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400,), id="h2-prior-knowledge"),
        pytest.param(b"GET /open/v HTTP/1.1 extra\r\nHost: a\r\n\r\n", (400,), id="extra-token"),
        pytest.param(b"GET /open/v\x00 HTTP/1.1\r\nHost: a\r\n\r\n", (400,), id="nul-in-target"),
        pytest.param(
            b"GET /open/v HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", (400,), id="nul-in-header"
        ),
    ],
)
async def test_unreadable_request_lines_reach_nothing(
    front: RunningProxy, nginx: Nginx, line: bytes, statuses: tuple[int, ...]
) -> None:
    """Defect 10: HTTP/0.9 and HTTP/2.0 lines were forwarded as 1.1. SPEC §6: 505, or the fixed
    400 where the parser cannot read the line; never a 500, and nothing upstream."""
    mark = nginx.mark()
    answers = await exchange(front, line, 1)
    assert answers and answers[0].status in statuses
    assert await nginx.lines_since(mark, expect=0, settle=0.3) == []


async def test_upgrade_h2c_is_a_plain_request(front: RunningProxy, nginx: Nginx) -> None:
    """`Upgrade: h2c` is hop-by-hop: nginx sees a plain request, without `Upgrade` or the
    headers `Connection` lists; the answer is no 101, and the connection goes on in HTTP/1.1
    (or is closed after the answer, never left hanging)."""
    mark = nginx.mark()
    client = await Client.open(front)
    try:
        await client.send(
            head(
                "GET",
                "/open/h2c",
                "Connection: Upgrade, HTTP2-Settings",
                "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            )
        )
        first = await client.final()
        assert first is not None and _seen_by_nginx(first, "/open/h2c")
        expected = ["GET /open/h2c HTTP/1.1"]
        if (first.header("connection") or "").lower() != "close":
            await client.send(head("GET", "/open/h2c-after", "Connection: close"))
            second = await client.final()
            assert second is not None and _seen_by_nginx(second, "/open/h2c-after")
            expected.append("GET /open/h2c-after HTTP/1.1")
    finally:
        client.close()
    seen = await nginx.lines_since(mark, expect=len(expected))
    assert [line.request for line in seen] == expected
    assert seen[0]["upgrade"] == "" and seen[0]["http2_settings"] == ""


async def test_websocket_upgrade_the_upstream_refuses(front: RunningProxy, nginx: Nginx) -> None:
    """nginx (no WebSocket here) answers the handshake with a plain 200: the client gets no
    101, nginx parsed exactly one request, and the handshake went up with nothing added
    (defect 10: `Accept`, `Accept-Encoding` and a `Content-Length` were added)."""
    mark = nginx.mark()
    answers = await exchange(
        front,
        head(
            "GET",
            "/open/ws",
            "Connection: Upgrade",
            "Upgrade: websocket",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ),
        1,
    )
    assert answers and answers[0].status not in (101, 500)
    seen = await nginx.lines_since(mark, expect=1)
    assert [line.request for line in seen] == ["GET /open/ws HTTP/1.1"]
    assert seen[0]["accept"] == "" and seen[0]["accept_encoding"] == ""
    assert seen[0]["content_length"] == "" and seen[0]["user_agent"] == ""
    # the proxy still serves: a plain request afterwards goes through
    after = await exchange(front, head("GET", "/open/ws-after", "Connection: close"), 1)
    assert after and _seen_by_nginx(after[0], "/open/ws-after")


# --- Headers nginx must never see from a client ------------------------------------------------


async def test_headers_the_proxy_owns(front: RunningProxy, nginx: Nginx) -> None:
    """Defect 10: `X-Original-URL`/`X-Rewrite-URL` route IIS/Symfony servers to a path the
    decision never saw, and a client's `X-Real-IP` passed through. Identity headers are the
    proxy's in every spelling; and the proxy adds no `Accept`, `Accept-Encoding`, `User-Agent`."""
    mark = nginx.mark()
    answers = await exchange(
        front,
        head(
            "GET",
            "/open/owned",
            "X-Original-URL: /admin/users",
            "X-Rewrite-URL: /admin/users",
            "X-Real-IP: 203.0.113.9",
            "X-Auth-User-Id: 1",
            "Connection: close",
        ),
        1,
    )
    assert answers and _seen_by_nginx(answers[0], "/open/owned")
    seen = await nginx.lines_since(mark, expect=1)
    assert len(seen) == 1
    line = seen[0]
    assert line["user_id"] == ""
    assert line["accept"] == "" and line["accept_encoding"] == "" and line["user_agent"] == ""
    assert line["x_original_url"] == "" and line["x_rewrite_url"] == ""
    assert line["x_real_ip"] == "127.0.0.1"


# --- Path confusion: what nginx is asked for is what the decision judged -----------------------


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/open/a/./b", "/open/a/b"),
        ("/open//a", "/open/a"),
        ("/open/%61", "/open/a"),
        ("/open/a/../b", "/open/b"),
        ("http://client.example/open/abs", "/open/abs"),
    ],
)
async def test_forwarded_target_is_the_judged_one(
    front: RunningProxy, nginx: Nginx, target: str, forwarded: str
) -> None:
    mark = nginx.mark()
    answers = await exchange(front, head("GET", target, "Connection: close"), 1)
    assert answers and _seen_by_nginx(answers[0], forwarded)
    seen = await nginx.lines_since(mark, expect=1)
    assert [line.request for line in seen] == [f"GET {forwarded} HTTP/1.1"]


@pytest.mark.parametrize(
    "target",
    [
        "/open/../api/x",
        "/open/%2e%2e/api/x",
        "/open/..;/api/x",
        "/open%2fapi",
        "/open/%5c..%5capi",
        "/open/\\../api",
        "http://other.example/open/abs",
        "*",
    ],
)
async def test_path_tricks_reach_nothing(front: RunningProxy, nginx: Nginx, target: str) -> None:
    """A path that leaves `/open/` or cannot be read is judged as such: 400 or 401, never the
    open route's pass."""
    mark = nginx.mark()
    answers = await exchange(front, head("GET", target, "Connection: close"), 1)
    assert answers and answers[0].status in (400, 401)
    assert answers[0].status != 500
    assert await nginx.lines_since(mark, expect=0, settle=0.3) == []
