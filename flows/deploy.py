"""Prefect task `deploy`: put a registered model version behind the Ray Serve app.

    resolve models:/<name>@<alias> (or take the pinned version)
      -> the app is running: `switch_served_version` (replicas reconfigure in place; in-flight
         requests finish on the old version)
      -> not running and start_if_not_running: start the app (serve_config.yaml + settings)
      -> not running otherwise: nothing to do ("not_running")

Ray: `connect_ray(ray_address)`: the cluster at `ray_address` or RAY_ADDRESS, else a new local Ray that
lives as long as this process (the `run` command connects first and stops it when it is done).

`switch_served_version` is the one place where the pipeline changes the version a running app
serves; how a switch is carried out (the app's declarative config on this Ray cluster today; on
Kubernetes, where the RayService owns the Serve config, its serveConfigV2) belongs behind it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from diffusion_core.adapters.ray_cluster import connect_ray
from diffusion_core.errors import ConfigError
from serving.config import MODEL_DEPLOYMENT, SERVE_CONFIG_PATH, ModelSelection, ServeSettings
from serving.schemas import ModelInfo

logger = logging.getLogger(__name__)

DeployAction = Literal["switched", "unchanged", "started", "not_running"]


class DeployResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: DeployAction
    app_name: str
    model_name: str
    version: str
    alias: str | None
    url: str


def _selection(model_name: str, alias: str | None, version: str | None,
               settings: ServeSettings) -> ModelSelection:
    """Pin the version: an alias is resolved now, so that the user_config changes whenever the alias
    moves (Serve only calls reconfigure on a changed user_config)."""
    from diffusion_core.adapters.mlflow_registry import get_version, resolve_version

    if version is None:
        if alias is None:
            raise ConfigError("alias/version: give an alias or a version")
        version = resolve_version(model_name, alias, settings.tracking_uri).version
    else:
        version = get_version(model_name, version, settings.tracking_uri).version
    return ModelSelection(model_name=model_name, alias=alias, version=version,
                          tracking_uri=settings.tracking_uri)


def deploy_model(
    model_name: str,
    alias: str | None = "champion",
    version: str | None = None,
    *,
    settings: ServeSettings | None = None,
    start_if_not_running: bool = False,
    ray_address: str | None = None,
    serve_config: str | Path = SERVE_CONFIG_PATH,
    timeout_s: float = 300.0,
) -> DeployResult:
    """Serve `model_name` at `version` (or the version `alias` points to); see the module docstring.

    settings: the app's ServeSettings (app name, tracking URI; all of it when starting the app).
    """
    from serving import control

    settings = settings or ServeSettings()
    selection = _selection(model_name, alias, version, settings)
    connect_ray(ray_address)  # a Ray started here lives until this process exits, with its app
    result = {"app_name": settings.app_name, "model_name": model_name, "version": selection.version,
              "alias": alias, "url": settings.url}
    if settings.app_name in control.running_app_names():
        action = "unchanged" if control.serves(_current(settings.app_name), selection) else "switched"
        if action == "switched":
            switch_served_version(settings.app_name, selection, timeout_s)
    elif start_if_not_running:
        pinned = settings.model_copy(update={"model_name": model_name, "alias": alias,
                                             "version": selection.version})
        control.start_app(ServeSettings.model_validate(pinned.model_dump()),
                          control.load_serve_config(serve_config), timeout_s)
        action = "started"
    else:
        action = "not_running"
    logger.info("deploy %s v%s to %s: %s", model_name, selection.version, settings.app_name, action)
    return DeployResult(action=action, **result)


def switch_served_version(app_name: str, selection: ModelSelection, timeout_s: float = 300.0) -> None:
    """Make the running Serve app `app_name` serve `selection` and return once every replica does;
    ConfigError (the app keeps its version) when a replica cannot load it."""
    from serving import control

    control.switch_model(app_name, selection, timeout_s)


def _current(app_name: str) -> ModelInfo:
    from ray import serve

    return serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name).describe.remote().result(timeout_s=60)


# The Prefect task is the same function: one signature, one docstring.
deploy = task(name="deploy-model", cache_policy=NO_CACHE)(deploy_model)
