"""Prefect task `deploy`: make the running Serve applications serve a registered model version.

    resolve models:/<name>@<alias> now (or take the pinned version)
      -> switch every app of the configured targets that serves the model to that version
         (serving.switch: the same step as `promote` and `rollback`; the version is pinned in the
         model deployment's user_config, replicas reconfigure in place, in-flight requests finish
         on the old version)
      -> start_if_not_running and the app `settings.app_name` does not serve it on the first Ray
         target: start that app there through Serve's REST API (serve_config.yaml + settings, the
         version pinned)

Targets: `settings.targets` (RayTarget: a cluster's dashboard, or the local Ray without one;
KubeRayTarget: a RayService), else the local Ray. An app is started only on the first RayTarget
(the cluster the pipeline runs on: the local Ray, or the dashboard URL that training was submitted
to); a RayService's apps belong to KubeRay and are only switched. When a target is the local
Ray, `connect_ray(ray_address)` connects first (the cluster at `ray_address` or RAY_ADDRESS, else a
new local Ray that lives as long as this process; the `run` command connects first and stops it
when it is done).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.adapters.ray_cluster import connect_ray
from diffusion_core.errors import ConfigError, DiffusionPipelineError
from serving.config import SERVE_CONFIG_PATH, RayTarget, ServeSettings
from serving.switch import DEFAULT_SWITCH_TIMEOUT_S, SwitchOutcome, SwitchReport, switch_to_version

logger = logging.getLogger(__name__)

DeployAction = Literal["switched", "unchanged", "started", "not_running"]


class DeployError(DiffusionPipelineError):
    """An application serving the model could not be switched (each failure is named)."""


class DeployResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: DeployAction
    app_name: str
    model_name: str
    version: str
    alias: str | None
    url: str | None  # the local app's; None when every target is elsewhere
    outcomes: list[SwitchOutcome] = Field(default_factory=list)


def resolve_pinned_version(model_name: str, alias: str | None, version: str | None,
                           tracking_uri: str | None) -> str:
    """The version to pin: `version` (checked to exist), else the one `alias` points to now."""
    from diffusion_core.adapters.mlflow_registry import get_version, resolve_version

    if version is not None:
        return get_version(model_name, version, tracking_uri).version
    if alias is None:
        raise ConfigError("alias/version: give an alias or a version")
    return resolve_version(model_name, alias, tracking_uri).version


def deploy_model(
    model_name: str,
    alias: str | None = "champion",
    version: str | None = None,
    *,
    settings: ServeSettings | None = None,
    start_if_not_running: bool = False,
    ray_address: str | None = None,
    serve_config: str | Path = SERVE_CONFIG_PATH,
    timeout_s: float = DEFAULT_SWITCH_TIMEOUT_S,
) -> DeployResult:
    """Serve `model_name` at `version` (or the version `alias` points to); see the module docstring.

    settings: the app's ServeSettings (targets, tracking URI; all of it when starting the app).
    Raises DeployError naming every app that could not be switched.
    """
    settings = settings or ServeSettings()
    pinned = resolve_pinned_version(model_name, alias, version, settings.tracking_uri)
    targets = settings.switch_targets()
    local = any(isinstance(t, RayTarget) and t.dashboard_url is None for t in targets)
    if local:
        connect_ray(ray_address)  # a Ray started here lives until this process exits, with its app
    report = switch_to_version(model_name, pinned, alias, targets, timeout_s)
    home = next((t for t in targets if isinstance(t, RayTarget)), None)
    start = (start_if_not_running and home is not None
             and settings.app_name not in {o.app_name for o in report.serving})
    failures = [o for o in report.failures if not (start and o.action == "missing"
                                                   and o.app_name == settings.app_name)]
    if failures:
        raise DeployError("deploy: could not switch " + "; ".join(o.describe() for o in failures))
    action = _action(report)
    if start:
        _start_app(settings, model_name, alias, pinned, serve_config, timeout_s, home.dashboard_url)
        action = "started"
    logger.info("deploy %s v%s: %s", model_name, pinned, action)
    return DeployResult(action=action, app_name=settings.app_name, model_name=model_name, version=pinned,
                        alias=alias, url=settings.url if local or start else None, outcomes=report.outcomes)


def _action(report: SwitchReport) -> DeployAction:
    actions = {o.action for o in report.serving}
    if "switched" in actions:
        return "switched"
    return "unchanged" if actions else "not_running"


def _start_app(settings: ServeSettings, model_name: str, alias: str | None, version: str,
               serve_config: str | Path, timeout_s: float, dashboard_url: str | None) -> None:
    from serving import control

    pinned = settings.model_copy(update={"model_name": model_name, "alias": alias, "version": version})
    control.start_app(ServeSettings.model_validate(pinned.model_dump()),
                      control.load_serve_config(serve_config), timeout_s, dashboard_url=dashboard_url)


# The Prefect task is the same function: one signature, one docstring.
deploy = task(name="deploy-model", cache_policy=NO_CACHE)(deploy_model)
