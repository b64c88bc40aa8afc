"""The container image, the Kubernetes manifests and the dashboards stay true to the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import DEFAULT_IDENTITY
from proxy.metrics import ISSUED, JWKS_FETCHES, JWKS_KEYS, Metrics
from tests.conftest import SECRET_B64

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MANIFESTS = ["deploy/sidecar.yaml", "deploy/gateway.yaml", "deploy/ingress-auth.yaml"]
pytestmark = pytest.mark.slow  # builds the compiled wheel and runs the suite on it


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11 AS build" in text  # a compiler for mypyc
    assert "ENV HATCH_BUILD_HOOK_ENABLE_MYPYC=1" in text  # what the compiled-wheel test builds
    assert text.count("FROM python:3.11-slim") == 1  # the image that runs: slim official base
    assert "USER 10001" in text
    assert 'ENTRYPOINT ["token-proxy"]' in text
    assert 'CMD ["serve"]' in text
    assert "ENV TOKEN_PROXY_CONFIG=/etc/token-proxy/proxy.yaml" in text
    assert "HEALTHCHECK" in text and "9901/healthz" in text
    assert "tests" in (ROOT / ".dockerignore").read_text().split()


def test_compiled_wheel_builds_like_the_dockerfile_and_passes_the_suite(tmp_path: Path) -> None:
    """The image's build: mypyc-compiled modules, the same behaviour as the pure-Python ones."""
    source = tmp_path / "src"  # a copy: hatch-mypyc leaves built modules beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.so"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--quiet",
         "--wheel-dir", str(tmp_path), "."],
        cwd=source, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HATCH_BUILD_HOOK_ENABLE_MYPYC": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("token_proxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
        scripts = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        for name in names:
            if name.endswith(".so"):
                archive.extract(name, source)  # the compiled modules shadow the sources
    modules = {p.name for p in (ROOT / "proxy").glob("*.py")}
    assert {f"proxy/{m}" for m in modules} <= names
    assert "proxy/console.html" in names  # the dev console's page (SPEC §12), read at run time
    compiled = {Path(n).name.split(".")[0] for n in names if n.startswith("proxy/") and ".so" in n}
    assert {
        "app",
        "forward",
        "headers",
        "tokens",
        "claims",
        "extract",
        "decision",
        "routing",
    } <= compiled
    assert {"schema", "apps", "checks"} <= compiled  # the config package's modules too
    assert "server" not in compiled  # subclasses aiohttp's slotted classes: stays interpreted
    assert not any(name.startswith("tests/") for name in names)
    assert "token-proxy = proxy.cli:main" in scripts
    for dependency in ("aiohttp", "pyjwt", "cryptography", "cachetools", "pyyaml"):
        assert f"requires-dist: {dependency}" in metadata.lower()
    assert "requires-dist: uvloop>=0.23; extra == 'speed'" in metadata.lower()
    # The whole suite again, on the compiled modules (lint and packaging checks excepted).
    env = {**os.environ, "PYTHONPATH": str(source)}
    check = "import proxy.app as m, sys; sys.exit(not m.__file__.endswith('.so'))"
    assert subprocess.run([sys.executable, "-c", check], cwd=source, env=env).returncode == 0
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not interpreted",
         "--ignore", "tests/test_packaging.py", "--ignore", "tests/test_quality.py"],
        cwd=source, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_manifests_validate_against_kubernetes() -> None:
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", *MANIFESTS],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def documents(path: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((ROOT / path).read_text()) if doc]


@pytest.mark.parametrize("path", MANIFESTS)
def test_manifest_configs_pass_check_and_timing_fits(path: str, tmp_path: Path) -> None:
    docs = documents(path)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["proxy.yaml"]
    secret = next(d for d in docs if d["kind"] == "Secret")["stringData"]
    (tmp_path / "proxy.yaml").write_text(config)
    env = {**os.environ, **{name: SECRET_B64 for name in secret}}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(tmp_path / "proxy.yaml")],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shutdown = yaml.safe_load(config)["shutdown_timeout"]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    proxy = next(c for c in pod["containers"] if c["name"] == "token-proxy")
    pre_stop = int(proxy["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + shutdown
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_gateway_has_autoscaler_budget_and_scrape_annotations() -> None:
    kinds = {doc["kind"] for doc in documents("deploy/gateway.yaml")}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    deployment = next(d for d in documents("deploy/gateway.yaml") if d["kind"] == "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"


def test_compose_config_passes_check() -> None:
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yaml").read_text())
    assert {"upstream", "token-proxy"} <= set(compose["services"])
    config = str(ROOT / "deploy/compose-proxy.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", config],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def exported_names() -> set[str]:
    """Every sample name /metrics exports once each metric has a value."""
    metrics = Metrics()
    metrics.request("forwarded", "", "app", 0.01)
    metrics.upstream("default", 0.01)
    metrics.count(JWKS_FETCHES, "app", "ok")
    metrics.set(JWKS_KEYS, 1, "app")
    metrics.count(ISSUED, "jwt-bearer", "client")
    text = metrics.render().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def used_names() -> set[str]:
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load((ROOT / "deploy/prometheus-rules.yaml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return {name for expr in exprs for name in re.findall(r"\b[a-z_]+_[a-z_]+(?=[{\[\s)]|$)", expr)
            if name.startswith("token_proxy_")}  # fmt: skip


def test_dashboard_and_rules_use_only_exported_metrics() -> None:
    used = used_names()
    assert len(used) >= 8
    assert used <= exported_names(), used - exported_names()
    dashboard = (ROOT / "deploy/grafana-dashboard.json").read_text()
    for topic in ("outcome", "0.99", "upstream_duration", "jwks_fetches", "token_cache"):
        assert topic in dashboard
    rules = (ROOT / "deploy/prometheus-rules.yaml").read_text()
    for alert in ("TokenProxyJwksFailing", "TokenProxy5xxRatio", "TokenProxyNotReady"):
        assert alert in rules


def test_ingress_auth_asks_token_proxy_and_copies_every_identity_header() -> None:
    docs = documents("deploy/ingress-auth.yaml")
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    config = yaml.safe_load(config_map["data"]["proxy.yaml"])
    assert config["mode"] == "authorize"
    service = next(d for d in docs if d["kind"] == "Service")
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    annotations = ingress["metadata"]["annotations"]
    url = urlsplit(annotations["nginx.ingress.kubernetes.io/auth-url"])
    assert url.hostname.split(".")[0] == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    # X-Original-URI, the header the config reads, is only sent with an auth-method
    assert config["authorize"]["uri_header"] == "X-Original-URI"
    assert annotations["nginx.ingress.kubernetes.io/auth-method"] == "GET"
    copied = annotations["nginx.ingress.kubernetes.io/auth-response-headers"].split(",")
    assert set(copied) == set(DEFAULT_IDENTITY)  # a header not copied would pass the client's
