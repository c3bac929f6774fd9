"""Starting the app and switching its model version, declaratively (the way `serve run CONFIG` and
`serve deploy CONFIG` do it: the controller applies a ServeDeploySchema).

Declarative deployment matters for the hot swap: an application applied from a config keeps its code
version as long as import_path, args and runtime_env are unchanged, so a changed user_config reaches
the running replicas through `reconfigure` instead of replacing them.

Needs a connected Ray (`ray.init(address=...)`). Applying a config replaces the whole set of
declaratively deployed applications, so `switch_model` re-applies the others unchanged.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from diffusion_core.errors import ConfigError
from serving.config import (
    MODEL_DEPLOYMENT,
    SERVE_CONFIG_PATH,
    ModelDeploymentConfig,
    ModelSelection,
    ServeSettings,
)
from serving.schemas import ModelInfo

logger = logging.getLogger(__name__)


def load_serve_config(path: str | Path = SERVE_CONFIG_PATH) -> dict[str, Any]:
    """The Serve config file as a dict (validated by Ray's ServeDeploySchema)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"serve_config: {path} does not exist", hint=f"default: {SERVE_CONFIG_PATH}")
    data = yaml.safe_load(path.read_text()) or {}
    ServeDeploySchema.model_validate(data)
    return data


def serve_deploy_config(settings: ServeSettings, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base` (the Serve config file) with the app's args, name, route prefix and HTTP host/port taken
    from `settings`; deployment options (replicas, actor options) stay as in `base`."""
    config = copy.deepcopy(base if base is not None else load_serve_config())
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"serve_config.applications: expected one application, got {len(apps)}")
    app = apps[0]
    app.update(name=settings.app_name, route_prefix=settings.route_prefix,
               args=settings.model_dump(mode="json"))
    config.setdefault("http_options", {}).update(host=settings.host, port=settings.port)
    return config


def _client() -> Any:
    from ray.serve.context import _get_global_client

    return _get_global_client()


def apply_config(config: dict[str, Any]) -> None:
    """Start Serve (HTTP options from `config`) if needed and apply `config` to the controller."""
    schema = ServeDeploySchema.model_validate(config)
    serve.start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    _client().deploy_apps(schema, _blocking=False)


def wait_until_running(app_name: str, timeout_s: float = 300.0) -> None:
    """Block until the app is RUNNING; ConfigError with Serve's message if it fails or times out."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ConfigError(f"serve: application {app_name!r} is {status.status}: {status.message}")
        time.sleep(0.5)
    raise ConfigError(f"serve: application {app_name!r} not running after {timeout_s:.0f}s "
                      f"(status {getattr(status, 'status', None)})")


def start_app(settings: ServeSettings, base: dict[str, Any] | None = None, timeout_s: float = 300.0) -> None:
    """Deploy the app of `settings` (with the deployment options of `base`) and wait until it runs."""
    apply_config(serve_deploy_config(settings, base))
    wait_until_running(settings.app_name, timeout_s)
    logger.info("serving %s at %s", settings.app_name, settings.url)


def running_app_names() -> list[str]:
    if not serve.context._get_global_client(raise_if_no_controller_running=False):
        return []
    return [name for name, s in serve.status().applications.items() if s.status in ("RUNNING", "DEPLOYING")]


def _deployed_configs() -> dict[str, dict[str, Any]]:
    """name -> config of every declaratively deployed app (the ones a new config would replace)."""
    details = _client().get_serve_details()
    configs = {}
    for name, app in (details.get("applications") or {}).items():
        deployed = app.get("deployed_app_config")
        if deployed:
            configs[name] = deployed
    return configs


def _with_model(app_config: dict[str, Any], selection: ModelSelection) -> dict[str, Any]:
    """`app_config` with the model deployment's user_config pointing at `selection`."""
    app_config = copy.deepcopy(app_config)
    settings = ServeSettings.model_validate(app_config.get("args") or {})
    deployments = app_config.setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == MODEL_DEPLOYMENT), None)
    if entry is None:
        entry = {"name": MODEL_DEPLOYMENT}
        deployments.append(entry)
    current = entry.get("user_config") or settings.model_deployment_config().model_dump(mode="json")
    new = ModelDeploymentConfig.model_validate(current).model_copy(update={"model": selection})
    entry["user_config"] = new.model_dump(mode="json")
    return app_config


def switch_model(app_name: str, selection: ModelSelection, timeout_s: float = 300.0) -> ModelInfo:
    """Point the running app's model deployment at `selection` through its user_config (replicas
    reconfigure in place; in-flight requests finish on the old version). Returns the new ModelInfo."""
    configs = _deployed_configs()
    if app_name not in configs:
        raise ConfigError(f"app_name: {app_name!r} is not a declaratively deployed Serve app; running: "
                          f"{sorted(configs)}",
                          hint="start it with `diffusion-pipeline serve` or serve deploy")
    configs[app_name] = _with_model(configs[app_name], selection)
    details = _client().get_serve_details()
    config = {"applications": list(configs.values()),
              "http_options": {k: v for k, v in (details.get("http_options") or {}).items()
                               if k in ("host", "port")},
              "proxy_location": details.get("proxy_location") or "EveryNode"}
    _client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
    return wait_for_model(app_name, selection, timeout_s)


def serves(info: ModelInfo, selection: ModelSelection) -> bool:
    """Whether `info` (a replica's model) is the one `selection` asks for."""
    if selection.checkpoint_dir is not None:
        return info.source == selection.checkpoint_dir and info.version == selection.version
    version_ok = selection.version is None or info.version == selection.version
    return info.name == selection.model_name and version_ok and info.source.startswith("models:/")


def wait_for_model(app_name: str, selection: ModelSelection, timeout_s: float = 300.0) -> ModelInfo:
    """Poll the model deployment until it serves `selection`'s version (or reports a failed load)."""
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info: ModelInfo = handle.describe.remote().result(timeout_s=30)
        if serves(info, selection):
            return info
        if info.last_load_error:
            raise ConfigError(f"model: loading {selection.model_name} version {selection.version} "
                              f"failed: {info.last_load_error}; still serving version {info.version}")
        time.sleep(0.5)
    raise ConfigError(f"model: {app_name!r} did not switch to version {selection.version} "
                      f"in {timeout_s:.0f}s")
