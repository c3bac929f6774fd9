"""Starting the app and switching its model version, declaratively (the way `serve run CONFIG` and
`serve deploy CONFIG` do it: the controller applies a ServeDeploySchema).

Declarative deployment matters for the hot swap: an application applied from a config keeps its code
version as long as import_path, args and runtime_env are unchanged, so a changed user_config reaches
the running replicas through `reconfigure` instead of replacing them.

Needs a connected Ray (`ray.init(address=...)`). Applying a config replaces the whole set of
declaratively deployed applications, so `start_app` and `switch_model` re-apply the others unchanged.
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
from diffusion_core.redact import has_credentials, redact_uri
from serving.config import (
    MODEL_DEPLOYMENT,
    SERVE_CONFIG_PATH,
    ModelDeploymentConfig,
    ModelSelection,
    ServeSettings,
)
from serving.schemas import ModelInfo, ReplicaLoadState

logger = logging.getLogger(__name__)


def load_serve_config(path: str | Path = SERVE_CONFIG_PATH) -> dict[str, Any]:
    """The Serve config file as a dict (validated by Ray's ServeDeploySchema)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"serve_config: {path} does not exist", hint=f"default: {SERVE_CONFIG_PATH}")
    data = yaml.safe_load(path.read_text()) or {}
    ServeDeploySchema.model_validate(data)
    return data


def _single_app(config: dict[str, Any]) -> dict[str, Any]:
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"serve_config.applications: expected one application, got {len(apps)}")
    return apps[0]


def settings_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The ServeSettings fields that the Serve config file sets for its one application: its `args`,
    `name` (app_name), `route_prefix` and http_options host/port. `diffusion-pipeline serve` starts
    from these, then applies the config file's `serve` section, the environment and its flags."""
    app = _single_app(config)
    fields = dict(app.get("args") or {})
    fields.update({key: app[src] for key, src in (("app_name", "name"), ("route_prefix", "route_prefix"))
                   if app.get(src) is not None})
    http = config.get("http_options") or {}
    fields.update({key: http[key] for key in ("host", "port") if http.get(key) is not None})
    return fields


def serve_deploy_config(settings: ServeSettings, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base` (the Serve config file) with its application's args replaced by all of `settings`
    (callers build `settings` on top of the file's args: see `settings_fields`), and the name, route
    prefix and HTTP host/port taken from `settings`; deployment options (replicas, actor options)
    stay as in `base`."""
    _warn_if_credentials(settings.tracking_uri)
    config = copy.deepcopy(base if base is not None else load_serve_config())
    app = _single_app(config)
    app.update(name=settings.app_name, route_prefix=settings.route_prefix,
               args=settings.model_dump(mode="json"))
    config.setdefault("http_options", {}).update(host=settings.host, port=settings.port)
    return config


def _warn_if_credentials(tracking_uri: str | None) -> None:
    """Args and user_config carry the tracking URI without credentials (config.TrackingUri)."""
    if tracking_uri and has_credentials(tracking_uri):
        logger.warning("tracking_uri %s carries credentials: the Serve app gets it without them; give the "
                       "replicas MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN "
                       "in their environment (runtime_env env_vars or a Kubernetes Secret)",
                       redact_uri(tracking_uri))


def _client() -> Any:
    from ray.serve.context import _get_global_client

    return _get_global_client()


def _deployed_configs() -> dict[str, dict[str, Any]]:
    """name -> config of every declaratively deployed app (the ones a new config would replace)."""
    details = _client().get_serve_details()
    configs = {}
    for name, app in (details.get("applications") or {}).items():
        deployed = app.get("deployed_app_config")
        if deployed:
            configs[name] = deployed
    return configs


def _deploy_alongside_others(config: dict[str, Any]) -> None:
    """Apply `config`'s applications and re-apply every other declaratively deployed app unchanged:
    the controller deletes each declarative app that an applied config lacks. An app of the same
    name as one in `config` is replaced by it."""
    names = {app["name"] for app in config["applications"]}
    others = [app for name, app in _deployed_configs().items() if name not in names]
    merged = {**config, "applications": [*others, *config["applications"]]}
    _client().deploy_apps(ServeDeploySchema.model_validate(merged), _blocking=False)


def apply_config(config: dict[str, Any]) -> None:
    """Start Serve (HTTP options from `config`) if needed and apply `config`'s applications next to
    the apps already deployed."""
    schema = ServeDeploySchema.model_validate(config)
    serve.start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    _deploy_alongside_others(config)


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
    """Deploy the app of `settings` (with the deployment options of `base`) next to the other
    deployed apps (one of the same name is replaced) and wait until it runs."""
    apply_config(serve_deploy_config(settings, base))
    wait_until_running(settings.app_name, timeout_s)
    logger.info("serving %s at %s", settings.app_name, settings.url)


def running_app_names() -> list[str]:
    if not serve.context._get_global_client(raise_if_no_controller_running=False):
        return []
    return [name for name, s in serve.status().applications.items() if s.status in ("RUNNING", "DEPLOYING")]


def _with_model(app_config: dict[str, Any], selection: ModelSelection) -> dict[str, Any]:
    """`app_config` with the model deployment's user_config pointing at `selection`."""
    _warn_if_credentials(selection.tracking_uri)
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
    reconfigure in place; in-flight requests finish on the old version) and wait until every replica
    serves it (`wait_for_model`). Returns the new ModelInfo."""
    configs = _deployed_configs()
    if app_name not in configs:
        raise ConfigError(f"app_name: {app_name!r} is not a declaratively deployed Serve app; running: "
                          f"{sorted(configs)}",
                          hint="start it with `diffusion-pipeline serve` or serve deploy")
    details = _client().get_serve_details()
    http = details.get("http_options") or {}
    _deploy_alongside_others({
        "applications": [_with_model(configs[app_name], selection)],
        "http_options": {k: v for k, v in http.items() if k in ("host", "port")},
        "proxy_location": details.get("proxy_location") or "EveryNode",
    })
    return wait_for_model(app_name, selection, timeout_s)


def serves(info: ModelInfo, selection: ModelSelection) -> bool:
    """Whether `info` (a replica's model) is the one `selection` asks for."""
    if selection.checkpoint_dir is not None:
        return info.source == selection.checkpoint_dir and info.version == selection.version
    version_ok = selection.version is None or info.version == selection.version
    return info.name == selection.model_name and version_ok and info.source.startswith("models:/")


def wait_for_model(app_name: str, selection: ModelSelection, timeout_s: float = 300.0) -> ModelInfo:
    """Wait until every replica of the model deployment serves `selection`; ConfigError when a
    replica reports that loading `selection` failed (it keeps serving its previous model).

    First Serve must report the deployment HEALTHY with `selection` in its user_config: every replica
    has then returned from `reconfigure`, which returns after the new model loaded or failed to. A
    handle cannot address one replica, so `load_state` is then called until each running replica id
    has answered. A failure recorded for another selection (an earlier swap) does not count.
    """
    deadline = time.monotonic() + timeout_s
    replica_ids = _wait_until_reconfigured(app_name, selection, deadline)
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name)
    answered: dict[str, ModelInfo] = {}
    while time.monotonic() < deadline:
        state: ReplicaLoadState = handle.load_state.remote().result(timeout_s=30)
        info = state.info
        if state.failed_selection == selection and not serves(info, selection):
            raise ConfigError(f"model: loading {selection.model_name} version {selection.version} failed "
                              f"on replica {info.replica}: {info.last_load_error}; it still serves "
                              f"version {info.version}")
        if serves(info, selection):
            answered[info.replica] = info
        if answered and replica_ids <= set(answered):  # no ids: scaled to zero, the one that woke up
            return answered[min(replica_ids or answered)]
        time.sleep(0.05)
    raise ConfigError(f"model: {app_name!r}: replicas {sorted(replica_ids - set(answered))} did not "
                      f"switch to version {selection.version} in {timeout_s:.0f}s")


def _wait_until_reconfigured(app_name: str, selection: ModelSelection, deadline: float) -> set[str]:
    """Poll Serve until the model deployment's target user_config holds `selection` and it is HEALTHY
    (every replica RUNNING at that version) -> the running replica ids."""
    target = selection.model_dump(mode="json")
    status = "unknown"
    while time.monotonic() < deadline:
        app = (_client().get_serve_details().get("applications") or {}).get(app_name) or {}
        deployment = (app.get("deployments") or {}).get(MODEL_DEPLOYMENT) or {}
        user_config = (deployment.get("deployment_config") or {}).get("user_config") or {}
        status = deployment.get("status", "unknown")
        if user_config.get("model") == target:
            if status == "HEALTHY":
                return {r["replica_id"] for r in deployment.get("replicas", []) if r["state"] == "RUNNING"}
            if status in ("UNHEALTHY", "DEPLOY_FAILED"):
                raise ConfigError(f"model: deployment {MODEL_DEPLOYMENT} of {app_name!r} is {status}: "
                                  f"{deployment.get('message')}")
        time.sleep(0.2)
    raise ConfigError(f"model: {app_name!r} did not reconfigure to version {selection.version} "
                      f"(deployment status {status})")
