"""The code stays lint-clean, formatted and type-checked (ruff; mypy --strict on proxy and
tests), and SECURITY.md names tests that exist."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def check(*command: str) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_check() -> None:
    check(str(BIN / "ruff"), "check", ".")


def test_ruff_format() -> None:
    check(str(BIN / "ruff"), "format", "--check", ".")


@pytest.mark.slow
def test_mypy_strict() -> None:
    check(str(BIN / "mypy"), "--strict", "proxy", "tests")


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_security_md_names_tests_that_exist() -> None:
    """Every attack class names its tests as `tests/test_x.py::test_name`; each one exists (a
    renamed or deleted test must not leave the table claiming coverage it lost)."""
    text = (ROOT / "SECURITY.md").read_text()
    table = text.split("## Attack classes", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| **")]
    assert len(rows) >= 10
    missing = []
    for row in rows:
        cell = row.rstrip(" |").rsplit(" | ", 1)[1]
        named = re.findall(r"`((?:tests|bench)/[\w/]+\.py)(?:::(\w+))?`", cell)
        assert any(name for _, name in named), f"no test named in: {row[:60]}"
        for file, name in named:
            path = ROOT / file
            if not path.is_file():
                missing.append(file)
            elif name and name not in _functions(path):
                missing.append(f"{file}::{name}")
    assert not missing, missing


def test_every_reason_is_in_the_readme_table() -> None:
    """The README's reason table lists every `Reason` with the contract's status, code, name."""
    from proxy.errors import CONTRACT, Reason

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d+ / \d+ / \w+) \|", readme, re.MULTILINE))
    for reason in Reason:
        outcome = CONTRACT[reason]
        assert rows.get(reason.value) == f"{outcome.status} / {outcome.code} / {outcome.name}", (
            reason
        )


def test_readme_starts_with_the_demo_and_the_ci_command() -> None:
    """The first code block: the demo, then the very command `.ci/run` runs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert block[0].endswith(".venv/bin/token-proxy demo")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line for line in ci.splitlines() if ".venv/bin/pytest" in line)
    assert block[1] in command.replace(" -q", "")
