"""The dev console's JSON endpoints (SPEC §12), on a real `token-proxy serve` subprocess.

The page itself is driven in a real browser in test_console_browser.py.
"""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization

from proxy.config import load
from proxy.errors import ConfigError
from proxy.mint import keygen
from tests.conftest import SECRET, SECRET_B64, free_port, mint, write_config
from tests.test_cli import wait_ready

CONFIG: dict[str, Any] = {
    "dev_console": True,
    "apps": [
        {
            "id": "app-1",
            "match": {"claim": "appId"},
            "algorithms": ["HS256"],
            "secrets": [SECRET_B64],
            "required_claims": ["exp", "userId"],
        },
        {
            "id": "idp",
            "match": {"claim": "iss"},
            "algorithms": ["ES256"],
            "public_keys": ["es.pem"],
        },
    ],
    "routes": [
        {"path": "/healthz", "auth": "none"},
        {"path": "/v1/users/{userId}/*", "bind": {"userId": "path.userId"}},
        {"path": "/*"},
    ],
}


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"user": self.headers.get("X-Auth-User-Id")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Served:
    url: str  # the main listener
    admin: str  # the admin listener
    log: Path  # the process's stdout and stderr
    process: subprocess.Popen[bytes]


@contextmanager
def serve(directory: Path, data: dict[str, Any]) -> Iterator[Served]:
    """A `token-proxy serve` subprocess with `data`, in front of a tiny upstream."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    private, _ = keygen("ES256")
    public = serialization.load_pem_private_key(private.encode(), None).public_key()
    (directory / "es.pem").write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    port, admin = free_port(), free_port()
    data = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "upstream": {"url": f"http://127.0.0.1:{upstream.server_address[1]}"},
        **data,
    }
    config = write_config(directory, data)
    log = directory / "log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            stdout=out,
            stderr=out,
        )
        try:
            wait_ready(f"http://127.0.0.1:{admin}/readyz")
            yield Served(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", log, process)
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
            upstream.shutdown()
            upstream.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("console"), CONFIG) as served:
        yield served


def call(
    url: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> tuple[int, Any]:
    """Status and JSON body of a GET (no body) or a JSON POST to the console."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, headers=headers or {})  # noqa: S310
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            text = error.read()
            return error.code, json.loads(text) if text.startswith(b"{") else text.decode()


def try_token(served: Served, token: str, path: str, method: str = "GET") -> dict[str, Any]:
    status, result = call(
        served.admin + "/console/api/try", {"token": token, "path": path, "method": method}
    )
    assert status == 200, result
    return result  # type: ignore[no-any-return]


# --- The page and the apps it mints for -------------------------------------------------------


def test_page_is_one_self_contained_html_document(served: Served) -> None:
    with urllib.request.urlopen(served.admin + "/console", timeout=10) as response:  # noqa: S310
        page = response.read().decode()
        policy = response.headers["Content-Security-Policy"]
        assert response.headers["Content-Type"].startswith("text/html")
    assert "<title>token-proxy dev console</title>" in page
    # Nothing loaded from elsewhere: no src/href to another document, and the policy says so.
    assert " src=" not in page and "<link" not in page and "@import" not in page
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_apps_lists_hs_apps_with_their_match_and_required_claims(served: Served) -> None:
    status, body = call(served.admin + "/console/api/apps")
    assert status == 200
    assert body["listen"] == served.url
    assert body["apps"] == [
        {"id": "app-1", "algorithm": "HS256", "claims": {"appId": "app-1", "userId": ""},
         "max_lifetime": None},
    ]  # fmt: skip
    assert body["not_mintable"] == ["idp"]  # ES256: the console has no private key for it


# --- Try a token: inspect's decision against the running keys --------------------------------


def test_minted_token_is_forwarded_with_identity_headers_and_its_curl_line_works(
    served: Served,
) -> None:
    status, minted = call(
        served.admin + "/console/api/mint",
        {"app": "app-1", "claims": {"userId": "42"}, "ttl": 120, "path": "/v1/users/42/threads"},
    )
    assert status == 200, minted
    token = minted["token"]
    result = try_token(served, token, "/v1/users/42/threads")
    assert result["forwarded"] is True
    assert result["app"] == "app-1"
    assert all(step["ok"] for step in result["steps"])
    assert {"step": "bind userId", "ok": True, "detail": "equals path.userId"} in result["steps"]
    assert {"name": "X-Auth-User-Id", "value": "42"} in result["identity_headers"]
    assert {"name": "X-Auth-App-Id", "value": "app-1"} in result["identity_headers"]
    # The curl line reaches the main listener with the token where the route looks for it.
    assert minted["curl"] == (
        f"curl -si -H 'Authorization: Bearer {token}' {served.url}/v1/users/42/threads"
    )
    request = urllib.request.Request(  # noqa: S310 - loopback
        served.url + "/v1/users/42/threads", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        assert json.loads(response.read()) == {"user": "42"}


@pytest.mark.parametrize(
    ("token", "path", "status", "code", "reason"),
    [
        pytest.param(mint(ttl=60, now=time.time() - 3600, appId="app-1", userId="42"),
                     "/v1/users/42/x", 401, 40, "expired", id="expired"),
        pytest.param(mint(appId="app-1", userId="42"), "/v1/users/7/x", 403, 38,
                     "binding_mismatch", id="another-users-path"),
        pytest.param(mint(b"w" * 32, appId="app-1", userId="42"), "/v1/users/42/x", 401, 38,
                     "bad_signature", id="wrong-secret"),
        pytest.param(mint(appId="app-1"), "/anything", 401, 38, "missing_claim",
                     id="no-userId"),
        pytest.param("not.a.token", "/anything", 401, 38, "malformed", id="malformed"),
    ],
)  # fmt: skip
def test_rejected_tokens_show_status_code_reason_and_the_failed_step(
    served: Served, token: str, path: str, status: int, code: int, reason: str
) -> None:
    result = try_token(served, token, path)
    assert result["forwarded"] is False
    assert (result["status"], result["code"], result["reason"]) == (status, code, reason)
    assert result["message"]  # the contract's message, as the client would read it
    assert result["identity_headers"] == []
    assert result["steps"][-1]["ok"] is False  # the failing check, under its own name


def test_expired_token_explains_the_exp_step(served: Served) -> None:
    token = mint(ttl=60, now=time.time() - 3600, appId="app-1", userId="42")
    result = try_token(served, token, "/v1/users/42/x")
    assert result["name"] == "TokenExpired" and result["message"] == "The token has expired."
    assert {"step": "signature", "ok": True, "detail": "verified with secrets[0]"} in result[
        "steps"
    ]
    failed = result["steps"][-1]
    assert failed["step"] == "times" and failed["ok"] is False
    assert failed["detail"].startswith("exp is ") and "in the past (leeway " in failed["detail"]


def test_method_matters_as_in_inspect(served: Served, tmp_path: Path) -> None:
    data = {**CONFIG, "routes": [{"path": "/v1/*", "methods": ["GET"]}]}
    with serve(tmp_path, data) as other:
        token = mint(appId="app-1", userId="42")
        assert try_token(other, token, "/v1/x", "GET")["forwarded"] is True
        refused = try_token(other, token, "/v1/x", "DELETE")
        assert (refused["status"], refused["reason"]) == (405, "method_not_allowed")


# --- Mint ------------------------------------------------------------------------------------


def test_negative_lifetime_mints_a_token_that_has_expired(served: Served) -> None:
    status, minted = call(
        served.admin + "/console/api/mint",
        {"app": "app-1", "claims": {"userId": "42"}, "ttl": -3600},
    )
    assert status == 200
    result = try_token(served, minted["token"], "/v1/users/42/x")
    assert (result["status"], result["code"], result["reason"]) == (401, 40, "expired")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({"app": "ghost", "claims": {}}, "no app 'ghost'", id="unknown-app"),
        pytest.param({"app": "idp", "claims": {}}, "signs with a private key", id="asymmetric"),
        pytest.param({"app": "app-1", "claims": [1]}, "claims must be a JSON object",
                     id="claims-not-object"),
        pytest.param({"app": "app-1", "ttl": "soon"}, "ttl must be a number", id="ttl-text"),
        pytest.param({"app": "app-1", "ttl": True}, "ttl must be a number", id="ttl-bool"),
        pytest.param({"claims": {}}, "app must be a non-empty string", id="no-app"),
        pytest.param([1, 2], "the body must be a JSON object", id="not-object"),
    ],
)  # fmt: skip
def test_mint_errors_are_clear_json(served: Served, body: Any, message: str) -> None:
    status, answer = call(served.admin + "/console/api/mint", body)
    assert status == 400
    assert message in answer["error"]


def test_bad_json_and_missing_token_are_clear_json(served: Served) -> None:
    status, answer = call(served.admin + "/console/api/try", raw=b"{not json")
    assert (status, answer) == (400, {"error": "the body must be JSON"})
    status, answer = call(served.admin + "/console/api/try", {"path": "/"})
    assert (status, answer) == (400, {"error": "token must be a non-empty string"})
    status, answer = call(served.admin + "/console/api/try", {"token": "x", "method": "G T"})
    assert (status, answer) == (400, {"error": "method must be letters, such as GET"})


# --- Recent decisions ------------------------------------------------------------------------


async def test_requests_appear_in_recent_decisions_without_token_or_claims(
    served: Served,
) -> None:
    _, before = call(served.admin + "/console/api/recent")
    token = mint(appId="app-1", userId="42", email="dev@example.com")
    expired = mint(ttl=60, now=time.time() - 3600, appId="app-1", userId="42")
    async with aiohttp.ClientSession() as session:
        async with session.get(
            served.url + "/v1/users/42/recent?q=hidden",
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 200
        async with session.post(
            served.url + "/v1/users/42/recent", headers={"Authorization": f"Bearer {expired}"}
        ) as response:
            assert response.status == 401
    status, after = call(served.admin + f"/console/api/recent?after={before['next']}")
    assert status == 200
    assert after["next"] == before["next"] + 2
    first, second = after["decisions"]
    assert {k: v for k, v in first.items() if k not in ("time", "duration_ms")} == {
        "seq": before["next"] + 1, "method": "GET", "path": "/v1/users/42/recent",
        "route": "/v1/users/{userId}/*", "status": 200, "outcome": "forwarded", "reason": "",
        "app": "app-1",
    }  # fmt: skip
    assert first["duration_ms"] >= 0 and first["time"].endswith("Z")
    assert (second["method"], second["status"], second["outcome"], second["reason"]) == (
        "POST", 401, "TokenExpired", "expired",
    )  # fmt: skip
    text = json.dumps(after)
    for secret in (token, expired, "hidden", "dev@example.com", token.split(".")[1]):
        assert secret not in text
    # Nothing newer: the cursor returns no decision twice.
    assert call(served.admin + f"/console/api/recent?after={after['next']}")[1]["decisions"] == []


def test_recent_decisions_keep_the_last_100(served: Served) -> None:
    _, before = call(served.admin + "/console/api/recent")
    for _ in range(105):
        with urllib.request.urlopen(served.url + "/healthz", timeout=10) as response:  # noqa: S310
            assert response.status == 200
    _, recent = call(served.admin + "/console/api/recent")
    assert recent["next"] == before["next"] + 105
    assert len(recent["decisions"]) == 100
    assert recent["decisions"][-1]["seq"] == recent["next"]
    assert recent["decisions"][0]["seq"] == recent["next"] - 99


def test_console_traffic_writes_no_token_to_the_log(served: Served) -> None:
    _, minted = call(served.admin + "/console/api/mint", {"app": "app-1", "claims": {}})
    try_token(served, minted["token"], "/v1/users/42/x")
    time.sleep(0.1)  # access lines are flushed within 50 ms; this only waits for the file
    log = served.log.read_text()
    assert '"event":"start"' in log
    assert minted["token"] not in log
    assert minted["token"].split(".")[2] not in log


# --- Who may use it --------------------------------------------------------------------------


def test_console_refuses_foreign_hosts_and_cross_origin_posts(served: Served) -> None:
    status, answer = call(served.admin + "/console/api/apps", headers={"Host": "evil.example"})
    assert (status, answer) == (403, {"error": "the console answers only on a loopback host name"})
    body = {"app": "app-1", "claims": {}}
    status, answer = call(
        served.admin + "/console/api/mint", body, headers={"Origin": "http://evil.example"}
    )
    assert (status, answer) == (403, {"error": "cross-origin requests are refused"})
    status, _ = call(  # what an HTML form elsewhere could send without a preflight
        served.admin + "/console/api/mint", body, headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    origin = served.admin  # the page's own origin is fine
    assert call(served.admin + "/console/api/mint", body, headers={"Origin": origin})[0] == 200


def test_console_is_404_when_dev_console_is_off(tmp_path: Path) -> None:
    with serve(tmp_path, {**CONFIG, "dev_console": False}) as other:
        for path in ("/console", "/console/api/apps", "/console/api/recent"):
            assert call(other.admin + path)[0] == 404
        assert call(other.admin + "/console/api/mint", {"app": "app-1"})[0] == 404
        assert call(other.admin + "/healthz")[0] == 200


def test_reload_can_turn_the_console_off(tmp_path: Path) -> None:
    with serve(tmp_path, CONFIG) as other:
        assert call(other.admin + "/console/api/apps")[0] == 200
        config = tmp_path / "proxy.yaml"
        config.write_text(config.read_text().replace("dev_console: true", "dev_console: false"))
        other.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and call(other.admin + "/console/api/apps")[0] != 404:
            time.sleep(0.1)
        assert call(other.admin + "/console/api/apps")[0] == 404


# --- check refuses it where it would mint tokens for the network -----------------------------


@pytest.mark.parametrize(
    ("admin", "ok"),
    [
        pytest.param("127.0.0.1:9901", True, id="ipv4-loopback"),
        pytest.param("[::1]:9901", True, id="ipv6-loopback"),
        pytest.param("localhost:9901", True, id="localhost"),
        pytest.param("0.0.0.0:9901", False, id="any-address"),
        pytest.param("10.1.2.3:9901", False, id="lan"),
        pytest.param(None, False, id="null"),
    ],
)
def test_dev_console_needs_a_loopback_admin_listen(admin: str | None, ok: bool) -> None:
    text = json.dumps({**CONFIG, "apps": CONFIG["apps"][:1], "admin_listen": admin,
                       "upstream": {"url": "http://127.0.0.1:9"}})  # fmt: skip
    if ok:
        assert load("<test>", env={}, text=text).dev_console is True
        return
    with pytest.raises(ConfigError) as raised:
        load("<test>", env={}, text=text)
    assert raised.value.lines() == [
        "<test>: dev_console: needs a loopback admin_listen (127.0.0.1, ::1 or localhost): "
        "the console mints tokens"
    ]


def test_check_refuses_dev_console_on_the_default_admin_listen(tmp_path: Path) -> None:
    data = {"dev_console": True, "apps": CONFIG["apps"][:1],
            "upstream": {"url": "http://127.0.0.1:9"}}  # fmt: skip
    config = write_config(tmp_path, data)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{config}: dev_console: needs a loopback admin_listen" in result.stderr
    assert SECRET.decode() not in result.stderr and SECRET_B64 not in result.stderr
    # Off (the default), the same file is fine.
    write_config(tmp_path, {**data, "dev_console": False})
    assert subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(config)],
        capture_output=True, timeout=60,
    ).returncode == 0  # fmt: skip
