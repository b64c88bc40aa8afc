"""The code stays lint-clean, formatted and type-checked (ruff, mypy --strict)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def check(*command: str) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_check() -> None:
    check(str(BIN / "ruff"), "check", ".")


def test_ruff_format() -> None:
    check(str(BIN / "ruff"), "format", "--check", ".")


def test_mypy_strict() -> None:
    check(str(BIN / "mypy"), "--strict", "proxy")
