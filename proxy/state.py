"""The framework-free part of compiling a config: verifier, app keys, header plan, error
bodies. No listener, no upstream pool, no fetch: `app.Resources.prepare` adds those.

    core = compile_core(config, sources_by_app, metrics)   # sources: app id -> JwksSource
    core.verifier, core.plan, core.errors.rendered(Reason.EXPIRED)
    remote_apps(config)        # (discovery?, url, ca_file, issuers) -> ids of the apps sharing it

A `Rejection` is rendered through `errors.CONTRACT` once per config (`ErrorBodies`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import App, Config, Errors
from .errors import CONTRACT, Reason
from .headers import HeaderPlan
from .keys import AppKeys, JwksSource
from .metrics import Metrics
from .tokens import Verifier, service_app

# What an app fetches its keys from: (discovery?, URL, ca_file, issuers).
RemoteSpec = tuple[bool, str, str | None, tuple[str, ...] | None]


class ErrorBodies:
    """Every rejection's status, body and challenge, rendered once per config."""

    def __init__(self, errors: Errors) -> None:
        self._rendered: dict[Reason, tuple[int, bytes, str | None]] = {}
        for reason, outcome in CONTRACT.items():
            error: dict[str, Any] = {
                "code": outcome.code,
                "name": outcome.name,
                "message": outcome.message,
            }
            if errors.expose_reason:
                error["reason"] = reason.value
            body = json.dumps({"error": error}, separators=(",", ":")).encode()
            challenge = None
            if outcome.challenge == "":
                challenge = f'Bearer realm="{errors.realm}"'
            elif outcome.challenge is not None:
                challenge = (
                    f'Bearer realm="{errors.realm}", error="{outcome.challenge}", '
                    f'error_description="{outcome.message}"'
                )
            self._rendered[reason] = (outcome.status, body, challenge)

    def rendered(self, reason: Reason) -> tuple[int, bytes, str | None]:
        """Status, body and challenge (None: no challenge) of one reason."""
        return self._rendered[reason]


@dataclass(frozen=True, slots=True)
class Core:
    """What one config compiles to before any network: the verifier, header plan, bodies."""

    verifier: Verifier
    plan: HeaderPlan
    errors: ErrorBodies


def compile_core(
    config: Config, sources: Mapping[str, JwksSource], metrics: Metrics | None = None
) -> Core:
    """The verifier over each app's keys (`sources`: the JWKS source of each remote app),
    plus the token service's implicit app, the header plan and the rendered error bodies."""
    keys = {app.id: AppKeys(app, sources.get(app.id)) for app in config.apps}
    implicit = service_app(config)
    if implicit is not None:
        keys[implicit.id] = AppKeys(implicit)
    verifier = Verifier(config, keys, metrics=metrics, service_app=implicit)
    return Core(verifier, HeaderPlan(config.forward), ErrorBodies(config.errors))


def remote_apps(config: Config) -> dict[RemoteSpec, list[str]]:
    """Apps share a source when they fetch the same thing the same way: URL, CA bundle and,
    for discovery, the issuers the document is checked against."""
    remote: dict[RemoteSpec, list[str]] = {}
    for app in config.apps:
        spec = _remote(app)
        if spec is not None:
            remote.setdefault(spec, []).append(app.id)
    return remote


def _remote(app: App) -> RemoteSpec | None:
    if app.discovery_url:
        return True, app.discovery_url, app.ca_file, app.issuer
    if app.jwks_url:
        return False, app.jwks_url, app.ca_file, None
    return None
