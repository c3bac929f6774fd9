"""A registry version pinned into a Serve application's config, and how Serve shows it applied.

Pure functions on Serve config and status dicts, shared by every switching path (Serve's REST API,
a RayService's serveConfigV2).

The model deployment's `user_config` (ModelDeploymentConfig) names the exact version: the running
replicas reconfigure to it in place, and a replica that starts later (autoscaling, a restart) loads
that version, never whatever the alias says by then. Serve reports a deployment HEALTHY once every
replica runs its current config; a replica whose `reconfigure` could not load the version fails
instead (see model_deployment.py), so HEALTHY with the pinned user_config means every replica
serves the pinned version.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from serving.config import MODEL_DEPLOYMENT, ModelDeploymentConfig, ServeSettings
from serving.serve_rest import ServeRestError, app_status

APP_IMPORT_PATH = "serving.app:build_app"


def _model_entry(app: dict[str, Any]) -> dict[str, Any] | None:
    return next((d for d in app.get("deployments") or [] if d.get("name") == MODEL_DEPLOYMENT), None)


def app_model(app: dict[str, Any]) -> ModelDeploymentConfig | None:
    """The model deployment's config in a Serve app config: its user_config, else what build_app
    derives from the app's args; None for an app that is not this project's."""
    if app.get("import_path") != APP_IMPORT_PATH:
        return None
    entry = _model_entry(app) or {}
    try:
        if entry.get("user_config"):
            return ModelDeploymentConfig.model_validate(entry["user_config"])
        return ServeSettings.model_validate(app.get("args") or {}).model_deployment_config()
    except ValidationError:
        return None


def serves_model(app: dict[str, Any], model_name: str) -> bool:
    """Whether the app serves registered model `model_name` (a local checkpoint does not count)."""
    model = app_model(app)
    return model is not None and model.model.checkpoint_dir is None and model.model.model_name == model_name


def pinned_model(app: dict[str, Any], version: str, alias: str | None) -> ModelDeploymentConfig:
    """The app's model deployment config with `version` pinned (recorded as reached through
    `alias`); the tracking URI, device and batching stay the app's own."""
    current = app_model(app)
    if current is None:
        raise ValueError(f"application {app.get('name')!r} is not a {APP_IMPORT_PATH} app")
    selection = current.model.model_copy(update={"version": version, "alias": alias, "checkpoint_dir": None})
    return current.model_copy(update={"model": selection})


def pin_version(app: dict[str, Any], version: str, alias: str | None) -> dict[str, Any]:
    """A copy of the app config whose model deployment's user_config pins `version`."""
    app = copy.deepcopy(app)
    entry = _model_entry(app)
    if entry is None:
        entry = {"name": MODEL_DEPLOYMENT}
        app.setdefault("deployments", []).append(entry)
    entry["user_config"] = pinned_model(app, version, alias).model_dump(mode="json")
    return app


def is_pinned(app: dict[str, Any], version: str, alias: str | None) -> bool:
    """Whether the app config already pins `version` through `alias`."""
    entry = _model_entry(app) or {}
    return entry.get("user_config") == pinned_model(app, version, alias).model_dump(mode="json")


def model_pinned(details: dict[str, Any], app_name: str, user_config: dict[str, Any]) -> bool | None:
    """From Serve's details: True once the app's model deployment runs `user_config` on every
    replica (HEALTHY) and the app is RUNNING; None while the change is on its way; ServeRestError
    when the deployment failed (a replica could not load the version) or the app is gone."""
    app = app_status(details, app_name)
    if app is None:
        raise ServeRestError(f"serve: application {app_name!r} is no longer running")
    deployment = (app.get("deployments") or {}).get(MODEL_DEPLOYMENT) or {}
    target = (deployment.get("deployment_config") or {}).get("user_config")
    if target != user_config:
        return None  # Serve has not taken the new config yet
    status = deployment.get("status")
    if status in ("UNHEALTHY", "DEPLOY_FAILED"):
        raise ServeRestError(f"serve: {app_name}/{MODEL_DEPLOYMENT} is {status}: {deployment.get('message')}")
    return True if status == "HEALTHY" and app.get("status") == "RUNNING" else None
