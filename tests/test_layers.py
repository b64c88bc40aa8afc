"""Imports flow one way: a module imports only from its own layer or the ones below it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

LAYERS = {
    "__init__": 0, "errors": 0, "model": 0, "telemetry": 0, "metrics": 0, "deadlines": 0,
    "routing": 1, "yamlconf": 1, "jwk": 1,
    "config": 2,
    "keys": 3,
    "extract": 4, "claims": 4, "tokens": 4,
    "decision": 5, "headers": 5, "mint": 5, "authorize": 5, "state": 5, "explain": 5,
    "forward": 6, "token_service": 6,
    "app": 7,
    "answers": 8, "exchange": 8, "listener": 8, "websocket": 8, "console": 8,
    "runtime": 9,
    "workers": 10, "demo": 10, "cli": 10, "__main__": 11,
}  # fmt: skip
CORE = 5  # layers up to here are framework-free: `inspect` runs them without a server
PACKAGE = Path(__file__).resolve().parent.parent / "proxy"


def sources() -> list[tuple[str, Path]]:
    """(module, file): a top-level file is its own module; a package's files are the package's."""
    found = [(path.stem, path) for path in PACKAGE.glob("*.py")]
    for init in PACKAGE.glob("*/__init__.py"):
        found += [(init.parent.name, path) for path in init.parent.glob("*.py")]
    return found


def imports(path: Path) -> set[tuple[str, int]]:
    """(module, line) of every import: proxy modules by name, others by top package. Inside a
    package (`proxy/config/`), `..x` is proxy's module x and `.x` the package itself."""
    depth = len(path.relative_to(PACKAGE).parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and 0 < node.level < depth:
            found.add((path.parent.name, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level == depth:
            if node.module:
                found.add((node.module.split(".")[0], node.lineno))
            else:
                found.update((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update((f"{node.module}.{alias.name}", node.lineno) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update((alias.name, node.lineno) for alias in node.names)
    return found


def test_every_module_has_a_layer() -> None:
    assert {name for name, _ in sources()} == set(LAYERS)


def test_imports_point_down() -> None:
    wrong = []
    for module, path in sources():
        layer = LAYERS[module]
        shown = path.relative_to(PACKAGE)
        for name, line in imports(path):
            if name in LAYERS and LAYERS[name] > layer:
                wrong.append(f"{shown}:{line} imports {name} from a higher layer")
            if layer <= CORE and name.startswith("aiohttp.web"):
                wrong.append(f"{shown}:{line} imports {name} into the core")
    assert wrong == []


def test_inspect_runs_without_a_server_or_an_upstream_pool() -> None:
    """`inspect`'s machinery and the offline state assembly load neither aiohttp's server
    nor the upstream pool, even indirectly (a fresh interpreter sees every module loaded)."""
    code = (
        "import sys, proxy.explain, proxy.state\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('aiohttp', 'proxy.')))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert "proxy.explain" in loaded and "proxy.state" in loaded
    unwanted = {"aiohttp.web", "proxy.forward", "proxy.app", "proxy.listener"}
    assert unwanted.isdisjoint(loaded)
