"""The project's Serve config (serving/serve_config.yaml) and starting the app from it.

Apps are deployed declaratively, the way `serve deploy CONFIG` does it: through Serve's REST API on
the Ray dashboard (serving/serve_rest.py), which also starts Serve when it is not running. An app
applied from a config keeps its code version as long as import_path, args and runtime_env are
unchanged, so a later change of its model deployment's user_config (serving/switch.py) reaches the
running replicas through `reconfigure` instead of replacing them.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import yaml
from ray.serve.schema import ServeDeploySchema

from diffusion_core.adapters.ray_dashboard import local_dashboard_url
from diffusion_core.errors import ConfigError
from diffusion_core.redact import has_credentials, redact_uri
from serving import serve_rest
from serving.config import SERVE_CONFIG_PATH, ServeSettings
from serving.serve_rest import ServeRestClient, ServeUnreachableError, app_running

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


def app_env_vars(config: dict[str, Any]) -> dict[str, str]:
    """The environment variables the config's application sets for its replicas (runtime_env)."""
    return dict((_single_app(config).get("runtime_env") or {}).get("env_vars") or {})


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
               args=settings.app_args())
    config.setdefault("http_options", {}).update(host=settings.host, port=settings.port)
    return config


def _warn_if_credentials(tracking_uri: str | None) -> None:
    """Args and user_config carry the tracking URI without credentials (config.TrackingUri)."""
    if tracking_uri and has_credentials(tracking_uri):
        logger.warning("tracking_uri %s carries credentials: the Serve app gets it without them; give the "
                       "replicas MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN "
                       "in their environment (runtime_env env_vars or a Kubernetes Secret)",
                       redact_uri(tracking_uri))


def start_app(settings: ServeSettings, base: dict[str, Any] | None = None, timeout_s: float = 300.0,
              dashboard_url: str | None = None) -> None:
    """Deploy the app of `settings` (with the deployment options of `base`) through Serve's REST API
    on `dashboard_url` (default: the local Ray's), next to the other deployed apps (one of the same
    name is replaced), and wait until it runs. Starts Serve with the config's HTTP options if needed."""
    config = serve_deploy_config(settings, base)
    client = ServeRestClient(dashboard_url or local_dashboard_url())
    instance = {key: config[key] for key in ("proxy_location", "http_options") if key in config}
    client.deploy(config["applications"], instance)
    details = client.wait_for(lambda d: d if app_running(d, settings.app_name) else None,
                              f"{settings.app_name} starting", timeout_s)
    http = details.get("http_options") or {}
    if (http.get("host"), http.get("port")) != (settings.host, settings.port):
        logger.warning("Serve already ran on this cluster with HTTP %s:%s, which it keeps: the app answers "
                       "there, not at %s", http.get("host"), http.get("port"), settings.url)
    logger.info("serving %s at %s", settings.app_name, settings.url)


def running_app_names(dashboard_url: str | None = None) -> list[str]:
    """The Serve apps running or deploying on the local Ray (or the cluster at `dashboard_url`)."""
    try:
        return serve_rest.running_app_names(ServeRestClient(dashboard_url or local_dashboard_url()).details())
    except ServeUnreachableError:
        return []
