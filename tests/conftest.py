"""Shared fixtures: a real echo upstream on loopback, a real proxy in front of it, token makers.

    async def test_x(proxy_for):
        proxy = await proxy_for(APPS_AND_ROUTES)           # a config dict, upstream filled in
        response = await proxy.get("/v1/x", token=proxy.token(userId="42"))
        assert (await response.json())["headers"]["X-Auth-User-Id"] == "42"

Tokens are minted in each test with PyJWT, times relative to the (injectable) clock.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web
from yarl import URL

from proxy.app import Proxy, Resources
from proxy.config import Config, load
from proxy.listener import Listener
from proxy.metrics import Metrics
from proxy.runtime import make_socket
from proxy.telemetry import Log

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

    PrivateKey = RSAPrivateKey | EllipticCurvePrivateKey | Ed25519PrivateKey

SECRET = b"s" * 32 + b"-test-secret-of-forty-bytes"
SECRET_B64 = base64.b64encode(SECRET).decode()
OTHER_SECRET = b"o" * 48


def mint(
    secret: bytes | Any = SECRET,
    *,
    ttl: float = 300,
    now: float | None = None,
    alg: str = "HS256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A signed token: `iat`/`exp` from `now` and `ttl` unless given, then `claims`."""
    now = time.time() if now is None else now
    payload: dict[str, Any] = {"iat": int(now), "exp": int(now + ttl)}
    payload.update(claims)
    for name, value in list(payload.items()):
        if value is None:
            del payload[name]
    return jwt.encode(payload, secret, algorithm=alg, headers=headers)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- The upstream: tells what reached it ------------------------------------------------------


async def _echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    seen = {
        "method": request.method,
        "target": request.raw_path,
        "raw_headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in request.raw_headers},
        "body_bytes": len(body),
    }
    request.app[SEEN].append(seen)
    return web.json_response(seen, headers={"X-Upstream": "echo"})


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "3")))
    return web.json_response({"slept": True})


async def _trickle(request: web.Request) -> web.StreamResponse:
    """Headers at once, then the body after `s` seconds."""
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"start ")
    await asyncio.sleep(float(request.query.get("s", "2")))
    await response.write(b"end")
    await response.write_eof()
    return response


async def _cookies(request: web.Request) -> web.Response:
    response = web.Response(text="ok")
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/")
    response.headers.add("X-Multi", "one")
    response.headers.add("X-Multi", "two")
    response.headers["Connection"] = "X-Private"
    response.headers["X-Private"] = "secret-hop"
    response.headers["Keep-Alive"] = "timeout=5"
    response.headers["Proxy-Authenticate"] = "Basic"
    return response


async def _download(request: web.Request) -> web.StreamResponse:
    total = int(request.query.get("bytes", "1048576"))
    response = web.StreamResponse()
    response.content_length = total
    await response.prepare(request)
    chunk = b"x" * 65536
    sent = 0
    while sent < total:
        part = chunk[: min(len(chunk), total - sent)]
        await response.write(part)
        sent += len(part)
    await response.write_eof()
    return response


async def _upload(request: web.Request) -> web.Response:
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
    return web.json_response({"received": total})


async def _broken(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = 1_000_000
    await response.prepare(request)
    await response.write(b"partial")
    assert request.transport is not None
    request.transport.close()
    return response


async def _ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("chat",))
    await ws.prepare(request)
    request.app[SEEN].append({"ws_headers": dict(request.headers)})
    async for message in ws:
        if message.type is aiohttp.WSMsgType.TEXT:
            if message.data == "close-4001":
                await ws.close(code=4001)
                break
            await ws.send_str("echo:" + message.data)
        elif message.type is aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(message.data[::-1])
    request.app[CLOSED].append(ws.close_code)
    return ws


SEEN = web.AppKey("seen", list)
CLOSED = web.AppKey("closed", list)


def upstream_app() -> web.Application:
    app = web.Application(client_max_size=1 << 40)
    app[SEEN] = []
    app[CLOSED] = []
    app.router.add_get("/slow", _slow)
    app.router.add_get("/trickle", _trickle)
    app.router.add_get("/cookies", _cookies)
    app.router.add_get("/download", _download)
    app.router.add_post("/upload", _upload)
    app.router.add_put("/upload", _upload)
    app.router.add_get("/broken", _broken)
    app.router.add_get("/ws", _ws)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    app = upstream_app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield Upstream(app, f"http://127.0.0.1:{port}")
    await runner.cleanup()


class Upstream:
    def __init__(self, app: web.Application, url: str) -> None:
        self.app = app
        self.url = url

    @property
    def closed(self) -> list[int | None]:
        return self.app[CLOSED]

    @property
    def seen(self) -> list[dict[str, Any]]:
        return self.app[SEEN]


# --- The proxy under test ---------------------------------------------------------------------


class Clock:
    """A clock tests move by hand; starts at the real time."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class RunningProxy:
    """A proxy serving on loopback, with its log lines and metrics at hand."""

    def __init__(self, url: str, proxy: Proxy, log: io.StringIO, clock: Clock) -> None:
        self.url = url
        self.proxy = proxy
        self.log_stream = log
        self.clock = clock
        self.session = aiohttp.ClientSession(auto_decompress=False)

    @property
    def config(self) -> Config:
        return self.proxy.state.config

    def token(self, secret: bytes = SECRET, **claims: Any) -> str:
        claims.setdefault("appId", "app-1")
        claims.setdefault("now", self.clock.now)
        return mint(secret, **claims)

    async def request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> aiohttp.ClientResponse:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        url = URL(self.url + path, encoded=True)
        return await self.session.request(
            method, url, headers=all_headers, allow_redirects=False, **kwargs
        )

    async def get(
        self, path: str, token: str | None = None, **kwargs: Any
    ) -> aiohttp.ClientResponse:
        return await self.request("GET", path, token, **kwargs)

    def log_text(self) -> str:
        self.proxy.log.flush()  # access lines are buffered up to 50 ms
        return self.log_stream.getvalue()

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_text().splitlines() if line]

    def metrics_text(self) -> str:
        return self.proxy.metrics.render().decode()


BASE_APPS = [{"id": "app-1", "algorithms": ["HS256"], "secrets": [SECRET_B64], "match": {}}]


def write_config(directory: Path, data: dict[str, Any], name: str = "proxy.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def proxy_for(upstream: Upstream, tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """Start proxies from config dicts; `upstream.url` and apps default in."""
    started: list[tuple[Listener, Resources, RunningProxy]] = []

    async def start(
        data: dict[str, Any] | None = None,
        *,
        clock: Clock | None = None,
        env: dict[str, str] | None = None,
        scheme: str = "http",
        ssl_context: Any = None,
        fetcher: Any = None,
    ) -> RunningProxy:
        data = dict(data or {})
        data.setdefault("upstream", {"url": upstream.url})
        data.setdefault("apps", BASE_APPS)
        data.setdefault("admin_listen", None)
        path = write_config(tmp_path, data, f"proxy-{len(started)}.yaml")
        config = load(str(path), env={**os.environ, **(env or {})})
        clock = clock or Clock()
        stream = io.StringIO()
        log = Log(stream, "debug")
        resources = Resources(Metrics(), log, clock=clock, fetcher=fetcher)
        proxy = Proxy(await resources.prepare(config), resources, scheme=scheme)
        from proxy.token_service import TokenService

        proxy.service = TokenService(lambda: proxy.state, resources.metrics, clock).handle
        listener = Listener(proxy, config)
        sock = make_socket(config.listen if data.get("listen") else _loopback())
        _host, port = sock.getsockname()[:2]
        await listener.serve(sock, ssl_context)
        running = RunningProxy(f"{scheme}://127.0.0.1:{port}", proxy, stream, clock)
        started.append((listener, resources, running))
        return running

    yield start
    for listener, resources, running in started:
        await running.session.close()
        await listener.drain(0)
        await resources.close()


def _loopback() -> Any:
    from proxy.config import Listen

    return Listen("127.0.0.1", free_port())


# --- Raw HTTP, for what a client library would not send -----------------------------------------


async def raw_exchange(url: str, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send bytes to the proxy's port and read until it closes (or the timeout)."""
    host, port = url.split("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    received = b""
    try:
        async with asyncio.timeout(read_timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        pass
    writer.close()
    return received


def parse_head(raw: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, body


# --- Key material, made once per session ------------------------------------------------------


class KeyFiles:
    """Private keys and their public PEMs/certificates on disk."""

    def __init__(self, directory: Path) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

        self.directory = directory
        self.private: dict[str, PrivateKey] = {
            "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "rsa1024": rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "ec384": ec.generate_private_key(ec.SECP384R1()),
            "ec521": ec.generate_private_key(ec.SECP521R1()),
            "ed": ed25519.Ed25519PrivateKey.generate(),
        }
        for name in self.private:
            (directory / f"{name}.key").write_bytes(self.private_pem(name))
            (directory / f"{name}.pub").write_bytes(self.public_pem(name))
        (directory / "rsa.crt").write_bytes(self.certificate("rsa"))
        (directory / "garbage.pem").write_bytes(b"-----BEGIN PUBLIC KEY-----\nnope\n")

    def private_pem(self, name: str) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.private[name].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self, name: str) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return (
            self.private[name]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def certificate(self, name: str) -> bytes:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

        key = self.private[name]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def path(self, file: str) -> str:
        return str(self.directory / file)

    def jwk(self, name: str, **extra: Any) -> dict[str, Any]:
        from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

        key = self.private[name].public_key()
        family = {"r": RSAAlgorithm, "e": ECAlgorithm}.get(name[0], OKPAlgorithm)
        if name.startswith("ed"):
            family = OKPAlgorithm
        data: dict[str, Any] = json.loads(family.to_jwk(key))  # type: ignore[attr-defined]
        data.update(extra)
        return data


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    return KeyFiles(tmp_path_factory.mktemp("keys"))
