"""Serve's REST API on a Ray dashboard: the documented way to read and change the applications a
cluster runs (`GET/PUT /api/serve/applications/`), open to any process that reaches the dashboard,
Ray driver or not.

A PUT is declarative: it carries the whole set of applications deployed from configs, and Serve
deletes each one a config leaves out. `ServeRestClient.deploy` therefore re-sends every other
declarative application exactly as Serve reports it deployed. Changing only deployment options
that Serve treats as lightweight (user_config, num_replicas, autoscaling) keeps the app's code
version, so the running replicas are reconfigured in place rather than replaced.

Requests carry the Ray token (`ray_dashboard.dashboard_headers`) when token auth is on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

from diffusion_core.adapters.ray_dashboard import dashboard_headers
from diffusion_core.errors import DiffusionPipelineError

logger = logging.getLogger(__name__)

APPLICATIONS_PATH = "/api/serve/applications/"
# Cluster-wide options of a running Serve instance that a PUT must repeat, or it would reset them.
_INSTANCE_OPTIONS = ("proxy_location", "http_options", "grpc_options", "target_capacity")
POLL_S = 0.25
T = TypeVar("T")


class ServeRestError(DiffusionPipelineError):
    """The Serve REST API refused a request, or an application did not reach the state asked for."""


class ServeUnreachableError(ServeRestError):
    """Nothing answered at the dashboard address."""


class ServeRestClient:
    """One Ray dashboard's Serve REST API. `timeout_s` bounds each HTTP request."""

    def __init__(self, dashboard_url: str, timeout_s: float = 30.0) -> None:
        self.url = dashboard_url.rstrip("/")
        self._timeout_s = timeout_s

    def _request(self, method: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            response = httpx.request(method, self.url + APPLICATIONS_PATH, json=body,
                                     headers=dashboard_headers(), timeout=self._timeout_s)
        except httpx.TransportError as err:
            raise ServeUnreachableError(f"serve: no Ray dashboard answers at {self.url} "
                                        f"({type(err).__name__})",
                                        hint="is the cluster up, and its dashboard on?") from None
        if response.status_code in (401, 403):
            raise ServeRestError(f"serve: the Ray dashboard at {self.url} refused the token "
                                 f"({response.status_code})",
                                 hint="set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token")
        if response.status_code >= 400:
            raise ServeRestError(f"serve: {method} {APPLICATIONS_PATH} at {self.url} failed "
                                 f"({response.status_code}): {response.text[:2000]}")
        return response

    def details(self) -> dict[str, Any]:
        """Serve's instance details: applications with their status, deployed config, deployments."""
        return self._request("GET").json()

    def deploy(self, apps: list[dict[str, Any]], instance: dict[str, Any] | None = None) -> None:
        """Apply `apps` (each replaces the declarative app of its name) next to every other
        declarative app, re-sent as deployed. The cluster-wide options (HTTP host and port, proxy
        location) are the running Serve's; `instance` gives them when Serve is not running yet."""
        details = self.details()
        names = {app["name"] for app in apps}
        others = [config for name, config in declarative_configs(details).items() if name not in names]
        options = _instance_options(details) if serve_is_running(details) else dict(instance or {})
        self._request("PUT", {**options, "applications": [*others, *apps]})

    def wait_for(self, check: Callable[[dict[str, Any]], T | None], what: str, timeout_s: float) -> T:
        """Poll the details until `check(details)` returns something other than None (it may
        raise to give up early); ServeRestError naming `what` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = check(self.details())
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                raise ServeRestError(f"serve: {what}: not done after {timeout_s:.0f}s at {self.url}")
            time.sleep(POLL_S)


def serve_is_running(details: dict[str, Any]) -> bool:
    return bool(details.get("controller_info"))


def declarative_configs(details: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> deployed config of every application deployed from a config (the ones a PUT replaces)."""
    return {name: app["deployed_app_config"] for name, app in (details.get("applications") or {}).items()
            if app.get("deployed_app_config")}


def _instance_options(details: dict[str, Any]) -> dict[str, Any]:
    return {key: details[key] for key in _INSTANCE_OPTIONS if details.get(key) is not None}


def app_status(details: dict[str, Any], app_name: str) -> dict[str, Any] | None:
    return (details.get("applications") or {}).get(app_name)


def running_app_names(details: dict[str, Any]) -> list[str]:
    return sorted(name for name, app in (details.get("applications") or {}).items()
                  if app.get("status") in ("RUNNING", "DEPLOYING"))


def app_running(details: dict[str, Any], app_name: str) -> bool | None:
    """True once the app is RUNNING, None while it deploys; ServeRestError when it failed."""
    app = app_status(details, app_name)
    status = (app or {}).get("status")
    if status in ("DEPLOY_FAILED", "UNHEALTHY"):
        raise ServeRestError(f"serve: application {app_name!r} is {status}: {app.get('message')}")
    return True if status == "RUNNING" else None
