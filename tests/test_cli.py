"""The `token-proxy` command, run as a real subprocess (SPEC §2)."""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.conftest import SECRET, SECRET_B64, KeyFiles, free_port, mint, write_config

BIN = Path(sys.executable).parent / "token-proxy"


def run(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_version_from_script_and_module() -> None:
    module = run("--version")
    assert module.returncode == 0
    assert module.stdout.startswith("token-proxy ")
    script = subprocess.run([str(BIN), "--version"], capture_output=True, text=True, timeout=30)
    assert script.stdout == module.stdout


@pytest.mark.slow
def test_bad_usage_exits_2_with_usage_on_stderr() -> None:
    result = run("serve", "--workers", "zero")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: token-proxy serve")
    assert run("nonsense").returncode == 2
    assert run().returncode == 2


APPS = {
    "upstream": {"url": "http://127.0.0.1:9"},
    "apps": [
        {
            "id": "TR21063826",
            "match": {"claim": "appId"},
            "algorithms": ["HS256"],
            "secrets": ["${APP_SECRET}"],
            "issuer": "https://host.example",
            "audience": "api",
            "max_lifetime": 120,
        }
    ],
    "routes": [
        {"path": "/healthz", "auth": "none"},
        {"path": "/v1/users/{userId}/*", "bind": {"userId": "path.userId"}},
        {"path": "/*"},
    ],
}
ENV = {"APP_SECRET": SECRET_B64}


def test_check_valid_and_five_mistakes(tmp_path: Path) -> None:
    good = write_config(tmp_path, APPS, "good.yaml")
    ok = run("check", "--config", str(good), env=ENV)
    assert ok.returncode == 0, ok.stderr
    bad_data: dict[str, Any] = {
        "listen": "nowhere",
        "upstream": {"url": "http://127.0.0.1:9"},
        "apps": [
            {
                "id": "a",
                "match": {},
                "algorithms": ["HS256", "RS256"],
                "secrets": ["${APP_SECRET}"],
            },
            {"id": "b", "algorithms": ["HS256"], "secrets": ["dG9vLXNob3J0"]},
        ],
        "routes": [{"path": "/x", "apps": ["ghost"]}, {"path": "/y", "auth": "sometimes"}],
    }
    bad = write_config(tmp_path, bad_data, "bad.yaml")
    result = run("check", "--config", str(bad), env=ENV)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f'{bad}: listen: must be HOST:PORT, not "nowhere"',
        f"{bad}: apps[0].algorithms: mixes HS* (HS256) and asymmetric (RS256) algorithms; "
        "use two apps",
        f"{bad}: apps[1].secrets[0]: is 9 bytes; HS256 needs at least 32 "
        "(make one with: token-proxy keygen --alg HS256)",
        f'{bad}: routes[0].apps[0]: unknown app "ghost"',
        f'{bad}: routes[1].auth: must be one of none, optional, required, not "sometimes"',
    ]
    assert SECRET_B64 not in result.stdout + result.stderr
    assert "dG9vLXNob3J0" not in result.stdout + result.stderr


def test_check_reads_token_proxy_config_env(tmp_path: Path) -> None:
    good = write_config(tmp_path, APPS, "good.yaml")
    result = run("check", env={**ENV, "TOKEN_PROXY_CONFIG": str(good)})
    assert result.returncode == 0, result.stderr
    missing = run("check", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"{tmp_path / 'nope.yaml'}: no such file"


def test_mint_claims_and_lifetime(tmp_path: Path) -> None:
    config = write_config(tmp_path, APPS)
    result = run(
        "mint",
        "--config",
        str(config),
        "--app",
        "TR21063826",
        "--claim",
        "userId=42",
        "--claim",
        'roles=["a","b"]',
        "--claim",
        "note=hello world",
        "--claim",
        "n=007",
        "--ttl",
        "600",
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="api")
    assert claims["appId"] == "TR21063826"
    assert claims["iss"] == "https://host.example"
    assert claims["aud"] == "api"
    assert claims["exp"] - claims["iat"] == 120  # the app's max_lifetime is shorter
    assert claims["userId"] == 42
    assert claims["roles"] == ["a", "b"]
    assert claims["note"] == "hello world"
    assert claims["n"] == "007"


@pytest.mark.slow
def test_mint_asymmetric_needs_key(tmp_path: Path, keys: KeyFiles) -> None:
    data = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "apps": [
            {
                "id": "idp",
                "match": {"claim": "iss", "value": "https://idp"},
                "algorithms": ["ES256"],
                "public_keys": [keys.path("ec.pub")],
            }
        ],
    }
    config = write_config(tmp_path, data)
    without = run("mint", "--config", str(config), "--app", "idp")
    assert without.returncode == 2
    assert "--key" in without.stderr
    signed = run("mint", "--config", str(config), "--app", "idp", "--key", keys.path("ec.key"))
    assert signed.returncode == 0, signed.stderr
    header = jwt.get_unverified_header(signed.stdout.strip())
    assert header["alg"] == "ES256"
    inspect = run("inspect", "--config", str(config), signed.stdout.strip())
    assert inspect.returncode == 0, inspect.stdout


@pytest.mark.parametrize(("alg", "size"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
def test_keygen_secrets(alg: str, size: int) -> None:
    result = run("keygen", "--alg", alg)
    assert result.returncode == 0
    assert len(base64.b64decode(result.stdout.strip(), validate=True)) == size


@pytest.mark.slow
@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
def test_keygen_key_pairs(alg: str, tmp_path: Path) -> None:
    result = run("keygen", "--alg", alg, "--kid", "k-1")
    assert result.returncode == 0
    assert result.stdout.startswith("-----BEGIN PRIVATE KEY-----")
    public = json.loads(result.stderr)
    assert public["kid"] == "k-1"
    assert public["alg"] == alg
    assert "d" not in public
    (tmp_path / "key.pem").write_text(result.stdout)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [public]}))
    data = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "apps": [{"id": "x", "match": {}, "algorithms": [alg], "jwks_file": "jwks.json"}],
    }
    config = write_config(tmp_path, data)
    token = run("mint", "--config", str(config), "--app", "x", "--key", str(tmp_path / "key.pem"))
    assert jwt.get_unverified_header(token.stdout.strip())["kid"] == "k-1"
    assert run("inspect", "--config", str(config), token.stdout.strip()).returncode == 0


# --- inspect and serve agree ---------------------------------------------------------------------


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A `token-proxy serve` subprocess in front of a tiny HTTP upstream."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    upstream.daemon_threads = False  # server_close() joins the handler threads
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    directory = tmp_path_factory.mktemp("served")
    port, admin = free_port(), free_port()
    data = {
        **APPS,
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "upstream": {"url": f"http://127.0.0.1:{upstream.server_address[1]}"},
    }
    config = write_config(directory, data)
    with (directory / "log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            stdout=log,
            stderr=log,
            env={**os.environ, **ENV},
        )
        wait_ready(f"http://127.0.0.1:{admin}/readyz")
        yield f"http://127.0.0.1:{port}", config
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    upstream.shutdown()
    upstream.server_close()


def wait_ready(url: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            error.close()
            time.sleep(0.1)
        except (OSError, urllib.error.URLError):
            time.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


def http_status(url: str, method: str, token: str | None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, method=method)  # noqa: S310 - loopback
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, {}
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def claims(**extra: Any) -> dict[str, Any]:
    return {"appId": "TR21063826", "iss": "https://host.example", "aud": "api", **extra}


AGREEMENT = [
    pytest.param("GET", "/v1/users/42/t", lambda: mint(ttl=60, userId="42", **claims()), id="ok"),
    pytest.param(
        "GET", "/v1/users/7/t", lambda: mint(ttl=60, userId="42", **claims()), id="binding"
    ),
    pytest.param(
        "POST", "/x", lambda: mint(ttl=60, now=time.time() - 200, **claims()), id="expired"
    ),
    pytest.param("GET", "/x", lambda: mint(ttl=600, **claims()), id="lifetime"),
    pytest.param("GET", "/x", lambda: mint(b"z" * 32, ttl=60, **claims()), id="signature"),
    pytest.param("GET", "/x", lambda: mint(ttl=60, **claims(appId="other")), id="unknown-app"),
    pytest.param("GET", "/x", lambda: "not-a-token", id="malformed"),
    pytest.param("GET", "/healthz", lambda: "not-a-token", id="auth-none"),
    pytest.param("GET", "/x/../../etc", lambda: mint(ttl=60, **claims()), id="bad-path"),
]


@pytest.mark.parametrize(("method", "path", "make"), AGREEMENT)
def test_inspect_and_serve_agree(
    served: tuple[str, Path], method: str, path: str, make: Any
) -> None:
    url, config = served
    token = make()
    result = run(
        "inspect",
        "--config",
        str(config),
        "--method",
        method,
        "--path",
        path,
        "--json",
        "-",
        stdin=token,
        env=ENV,
    )
    report = json.loads(result.stdout)
    assert set(report) == {"forwarded", "status", "code", "reason", "app", "steps"}
    if path == "/x/../../etc":  # urllib would normalise it; the decision is bad_path either way
        assert report["reason"] == "bad_path"
        return
    status, body = http_status(url + path, method, token)
    assert report["forwarded"] == (status == 200)
    assert result.returncode == (0 if status == 200 else 1)
    if status != 200:
        assert report["status"] == status
        assert report["code"] == body["error"]["code"]
        assert report["reason"] == body["error"]["reason"]
    assert all({"step", "ok", "detail"} == set(step) for step in report["steps"])
    assert token not in result.stdout


def test_inspect_human_output(tmp_path: Path) -> None:
    config = write_config(tmp_path, APPS)
    token = mint(ttl=60, now=time.time() - 200, **claims())
    result = run("inspect", "--config", str(config), token, env=ENV)
    assert result.returncode == 1
    assert "app: app TR21063826" in result.stdout
    assert "found in header:Authorization" in result.stdout  # the source as configured
    assert "rejected: 401 TokenExpired (code 40), reason expired" in result.stdout


def test_inspect_shows_the_route_claims_step(tmp_path: Path) -> None:
    routes = [{"path": "/ops/*", "claims": {"roles": ["admin", "ops"]}}, {"path": "/*"}]
    config = write_config(tmp_path, {**APPS, "routes": routes})
    args = ("inspect", "--config", str(config), "--path", "/ops/deploy", "--json")
    denied = run(*args, mint(ttl=60, roles=["viewer"], **claims()), env=ENV)
    assert denied.returncode == 1
    report = json.loads(denied.stdout)
    assert (report["status"], report["code"], report["reason"]) == (403, 38, "route_claim_mismatch")
    step = next(s for s in report["steps"] if s["step"] == "claim roles")
    assert step["ok"] is False
    assert "roles" in step["detail"]
    allowed = run(*args, mint(ttl=60, roles=["viewer", "ops"], **claims()), env=ENV)
    assert allowed.returncode == 0
    steps = json.loads(allowed.stdout)["steps"]
    assert {"step": "claim roles", "ok": True, "detail": "roles matches a listed value"} in steps


def test_inspect_uses_the_route_sources(tmp_path: Path) -> None:
    routes = [{"path": "/ws/*", "sources": ["query:access_token"]}, {"path": "/*"}]
    config = write_config(tmp_path, {**APPS, "routes": routes})
    token = mint(ttl=60, **claims())
    ws = run("inspect", "--config", str(config), "--path", "/ws/chat", "--json", token, env=ENV)
    assert ws.returncode == 0, ws.stdout
    steps = json.loads(ws.stdout)["steps"]
    assert {"step": "token", "ok": True, "detail": "found in query:access_token"} in steps
    other = run("inspect", "--config", str(config), "--path", "/api", "--json", token, env=ENV)
    assert other.returncode == 0
    assert "found in header:Authorization" in other.stdout


def _inspect_json(config: Path, token: str) -> tuple[int, dict[str, Any]]:
    result = run("inspect", "--config", str(config), "--json", token, env=ENV)
    return result.returncode, json.loads(result.stdout)


def _failing(report: dict[str, Any]) -> list[tuple[str, str]]:
    return [(step["step"], step["detail"]) for step in report["steps"] if not step["ok"]]


@pytest.mark.slow
def test_inspect_names_the_failing_step(tmp_path: Path, keys: KeyFiles) -> None:
    """A bit-flipped token fails at `signature`, a malformed one at `structure`, an unknown
    kid at `key`, each once and under its own name (not `key ok, decision FAIL`)."""
    config = write_config(tmp_path, APPS)
    good = mint(ttl=60, **claims())
    flipped = good[:-2] + ("AA" if good[-2:] != "AA" else "BB")
    code, report = _inspect_json(config, flipped)
    assert (code, report["reason"]) == (1, "bad_signature")
    assert _failing(report) == [("signature", "none of 1 secret(s) verifies it")]
    human = run("inspect", "--config", str(config), flipped, env=ENV).stdout
    assert "FAIL  signature: none of 1 secret(s) verifies it" in human
    assert "decision" not in human
    code, report = _inspect_json(config, "abc.def")
    assert _failing(report) == [("structure", "the token is not three base64url segments")]

    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [keys.jwk("rsa", kid="k-1")]}))
    app = {"id": "idp", "algorithms": ["RS256"], "jwks_file": "jwks.json"}
    rsa_config = write_config(tmp_path, {**APPS, "apps": [app]}, "rsa.yaml")
    other = jwt.encode(
        {"exp": int(time.time()) + 60}, keys.private["rsa"], "RS256", headers={"kid": "k-2"}
    )
    code, report = _inspect_json(rsa_config, other)
    assert (code, report["reason"]) == (1, "unknown_kid")
    assert _failing(report) == [("key", "no key has kid 'k-2'")]


@pytest.mark.slow
def test_inspect_time_checks_in_plain_seconds_with_the_limit(tmp_path: Path) -> None:
    config = write_config(tmp_path, APPS)
    now = time.time()
    expired = mint(ttl=60, now=now - 1000, **claims())
    _, report = _inspect_json(config, expired)
    [(step, detail)] = _failing(report)
    assert step == "times"
    assert detail.startswith("exp is 94") and detail.endswith("s in the past (leeway 30s)")
    # exp in 6.5 years: over max_lifetime 120, printed as seconds, not 2.04721e+08s
    far = mint(ttl=204_721_000, now=now, **claims())
    _, report = _inspect_json(config, far)
    assert _failing(report) == [("times", "lives 204721000s, over max_lifetime 120s")]
    future = mint(ttl=60, nbf=int(now) + 3600, **claims())
    _, report = _inspect_json(config, future)
    [(step, detail)] = _failing(report)
    assert step == "times" and detail.startswith("nbf is 3") and "(leeway 30s)" in detail
    _, ok = _inspect_json(config, mint(ttl=60, **claims()))
    assert next(s["detail"] for s in ok["steps"] if s["step"] == "times").startswith(
        "exp, nbf, iat and lifetime fine; expires in "
    )
    assert not any("e+" in step["detail"] for step in report["steps"] + ok["steps"])


def test_check_prints_each_key_problem_once(tmp_path: Path, keys: KeyFiles) -> None:
    """Two unfit keys in a JWKS file: one line each, with keys[i]; a bad JWK keeps the
    library's reason; an unreadable public_keys file is one problem, not two."""
    short = keys.jwk("ec521", kid="short")
    short["y"] = short["y"][:-4]
    document = {"keys": [keys.jwk("ec", kid="a"), keys.jwk("ed", kid="b"), short]}
    (tmp_path / "jwks.json").write_text(json.dumps(document))
    apps = [
        {"id": "idp", "match": {}, "algorithms": ["RS256"], "jwks_file": "jwks.json"},
        {"id": "pem", "algorithms": ["ES256"], "public_keys": ["missing.pem"]},
    ]
    config = write_config(tmp_path, {**APPS, "apps": apps})
    result = run("check", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{config}: apps[0].jwks_file: keys[2] is not a valid JWK "
        "(Coords should be 66 bytes for curve P-521)",
        f"{config}: apps[0].jwks_file: keys[0] holds an EC P-256 key, which fits none of the "
        "app's algorithms (RS256)",
        f"{config}: apps[0].jwks_file: keys[1] holds an Ed25519 key, which fits none of the "
        "app's algorithms (RS256)",
        f'{config}: apps[1].public_keys[0]: file "missing.pem" cannot be read (no such file)',
    ]
    assert short["y"] not in result.stderr


# --- The demo's curl lines work as printed ------------------------------------------------------


def free_port_pair() -> int:
    """A port whose next port is free too (the demo's admin listens on port + 1)."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def start_demo(port: int) -> tuple[subprocess.Popen[str], list[str]]:
    """`token-proxy demo` on `port` (and `port + 1`), and the banner it printed up to Ctrl-C."""
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C") or not line:
            break
    return process, lines


def test_demo_curl_lines_work_as_printed() -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    port = free_port_pair()
    process, lines = start_demo(port)
    try:
        curls = [line for line in lines if line.startswith("curl ")]
        assert len(curls) == 4, lines
        expected = [(200, None), (401, 40), (401, 39), (403, 38)]
        for line, (status, code) in zip(curls, expected, strict=True):
            output = subprocess.run(line, shell=True, capture_output=True, timeout=30)  # noqa: S602
            head, _, body = output.stdout.decode().partition("\r\n\r\n")
            assert head.split()[1] == str(status), line
            if code is not None:
                assert json.loads(body)["error"]["code"] == code
            else:
                assert json.loads(body)["headers"]["X-Auth-User-Id"] == "42"
        ready = f"http://127.0.0.1:{port + 1}/readyz"
        with urllib.request.urlopen(ready, timeout=5) as admin:
            assert admin.status == 200
        console = f"http://127.0.0.1:{port + 1}/console"  # the dev console is on in the demo
        assert f"dev console: {console}" in lines
        with urllib.request.urlopen(console, timeout=5) as page:
            assert page.status == 200 and b"token-proxy dev console" in page.read()
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    assert process.returncode == 0


def test_serve_flags_override_the_file_found_by_env(
    served: tuple[str, Path], tmp_path: Path
) -> None:
    """`--listen`, `--upstream` and `--log-level` win over the file `TOKEN_PROXY_CONFIG` names."""
    url, _ = served  # a running proxy: our override upstream is that proxy's /healthz route
    admin = free_port()
    config = write_config(
        tmp_path,
        {
            "listen": "127.0.0.1:9",  # overridden; port 9 would fail to bind
            "admin_listen": f"127.0.0.1:{admin}",
            "upstream": {"url": "http://127.0.0.1:9"},  # overridden; nothing listens there
            "log": {"level": "info"},
            "routes": [{"path": "/*", "auth": "none"}],
        },
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--listen", f"127.0.0.1:{port}",
         "--upstream", url, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TOKEN_PROXY_CONFIG": str(config)},
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{admin}/readyz")
        assert http_status(f"http://127.0.0.1:{port}/healthz", "GET", None)[0] == 200
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    events = [json.loads(line)["event"] for line in output.decode().splitlines()]
    assert "start" not in events  # an info event, below --log-level warning
    assert "request" in events  # access lines are written whatever the level
