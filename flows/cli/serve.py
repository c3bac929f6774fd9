"""`diffusion-pipeline serve`: start the Ray Serve app and block until Ctrl-C.

Settings (ServeSettings), lowest to highest precedence: the application's args, name, route_prefix and
http_options host/port in the Serve config file (--serve-config, default serving/serve_config.yaml),
the `serve` section of the pipeline config file, MLFLOW_TRACKING_URI, then these flags. Replicas and
ray_actor_options come from the Serve config file's deployments.

Ray: --ray-address / RAY_ADDRESS, else a `ray start` cluster on this machine, else a new local Ray.
Ctrl-C deletes only the app this command started; Serve and Ray are shut down only when this process
started Ray, so other apps on a shared cluster keep running.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from serving.config import SERVE_CONFIG_PATH

if TYPE_CHECKING:
    from serving.config import ServeSettings

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


def load_serve_settings(serve_config: str | Path = SERVE_CONFIG_PATH,
                        overrides: dict[str, Any] | None = None) -> tuple[ServeSettings, dict[str, Any]]:
    """(settings, Serve config): the settings layered as the module docstring says (the pipeline
    config file is the CLI's --config / DIFFUSION_PIPELINE_CONFIG)."""
    from diffusion_core.errors import ConfigError
    from flows.cli import GlobalOptions
    from flows.config import build_config, read_config_file
    from serving import control
    from serving.config import ServeSettings

    base = control.load_serve_config(serve_config)
    section = read_config_file(GlobalOptions.config).get("serve") or {}
    if not isinstance(section, dict):
        raise ConfigError("config: section 'serve' must be a mapping")
    data = {**control.settings_fields(base), **section}
    return build_config(ServeSettings, data, "serve", overrides), base


def _connect_ray(address: str | None) -> bool:
    """Connect to or start Ray; True when this process started it (and so may shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, configure_logging=False)
    # Ray has no public "did init start the cluster": a started one makes this process its head node.
    node = getattr(ray._private.worker, "_global_node", None)
    return node is not None and node.is_head()


def _block_forever() -> None:
    while True:
        time.sleep(3600)


def serve_until_interrupted(settings: ServeSettings, base: dict[str, Any], ray_address: str | None,
                            block: Callable[[], None] = _block_forever) -> None:
    """Start the app, run `block` (until Ctrl-C), then delete the app; stop Serve and Ray only if
    this process started Ray."""
    import ray
    from ray import serve

    from serving import control

    own_ray = _connect_ray(ray_address)
    started = False
    try:
        control.start_app(settings, base)
        started = True
        typer.echo(f"serving {settings.model_name} at {settings.url} (docs: {settings.url}/docs); "
                   "Ctrl-C stops")
        block()
    except KeyboardInterrupt:
        typer.echo("shutting down")
    finally:
        if own_ray:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        elif started:
            serve.delete(settings.app_name)
            logger.info("deleted Serve app %s; the cluster and its other apps keep running",
                        settings.app_name)


def serve_command(
    model_name: str | None = typer.Option(None, "--model-name", help="Registered model name."),
    alias: str | None = typer.Option(None, "--alias", help="Registry alias to serve (default champion)."),
    version: str | None = typer.Option(None, "--version", help="Pinned registry version (wins over alias)."),
    checkpoint_dir: str | None = typer.Option(None, "--checkpoint", help="Serve a local checkpoint instead."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow tracking URI."),
    host: str | None = typer.Option(None, "--host", help="HTTP host (default: the Serve config's)."),
    port: int | None = typer.Option(None, "--port", help="HTTP port (default: the Serve config's)."),
    route_prefix: str | None = typer.Option(None, "--route-prefix", help="URL prefix of the API."),
    device: str | None = typer.Option(None, "--device", help="torch device of the model (cpu, cuda)."),
    max_images_per_batch: int | None = typer.Option(None, "--max-images-per-batch"),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="Env var holding the bearer token."),
    serve_config: Path = typer.Option(SERVE_CONFIG_PATH, "--serve-config", help="Ray Serve config file."),
    ray_address: str | None = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                           help="Ray cluster address (default: a local Ray)."),
) -> None:
    """Serve the model over HTTP until interrupted."""
    overrides = {
        "model_name": model_name, "alias": alias, "version": version, "checkpoint_dir": checkpoint_dir,
        "tracking_uri": tracking_uri, "host": host, "port": port, "route_prefix": route_prefix,
        "device": device, "max_images_per_batch": max_images_per_batch, "api_key_env": api_key_env,
    }
    settings, base = load_serve_settings(serve_config, overrides)
    serve_until_interrupted(settings, base, ray_address)
