"""Every example config passes `token-proxy check` with its variables set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SECRET_B64, KeyFiles

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    "APP_A_SECRET": SECRET_B64,
    "APP_B_SECRET": SECRET_B64,
    "HOST_SECRET": "a host system secret of 32+ chars",
    "IDP_JWKS_URL": "https://login.example.com/.well-known/jwks.json",
    "BACKOFFICE_SECRET": SECRET_B64,
    "PARTNER_SECRET": SECRET_B64,
    "USERS_SECRET": SECRET_B64,
    "APP_123_SECRET": "a-client-secret-of-24-chars",
}


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "config").glob("*.yaml")))
def test_example_config_passes_check(example: str, keys: KeyFiles) -> None:
    env = {**os.environ, **ENV, "SIGNING_KEY_FILE": keys.path("ec.key")}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(ROOT / "config" / example)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{ROOT / 'config' / example}: ok")
