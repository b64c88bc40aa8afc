"""The checks a contributor runs, as nox sessions (nox itself is not a dependency: install it).

    nox -l                               # the sessions
    nox -s lint types test compiled      # all four; `nox -R` reuses the environments
    nox -s test -- tests/test_proxy.py   # arguments after -- go to pytest

Each session installs the project with its `test` extra into its own environment. `test` is the
quick loop (`pytest -m "not slow"`); `.ci/run` runs every test, slow ones included.
"""

from __future__ import annotations

import sys

import nox

nox.options.sessions = ["lint", "types", "test"]  # `compiled` builds a wheel: only when asked


def install(session: nox.Session) -> None:
    session.install("-e", ".[test]")


@nox.session
def lint(session: nox.Session) -> None:
    install(session)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def types(session: nox.Session) -> None:
    install(session)
    session.run("mypy", "--strict", "proxy", "tests")
    # This file, against the nox running it (the session's environment has no nox).
    session.run("mypy", "--strict", "--python-executable", sys.executable, "noxfile.py")


@nox.session
def test(session: nox.Session) -> None:
    install(session)
    session.run("pytest", "-m", "not slow", *session.posargs)


@nox.session
def compiled(session: nox.Session) -> None:
    """The mypyc build from a copy of the tree, and the suite on it (needs a C compiler)."""
    install(session)
    session.run("pytest", "tests/test_packaging.py", *session.posargs)
