"""`diffusion-pipeline serve`: start the Ray Serve app and block until Ctrl-C.

Which model and which MLflow store: the same defaults as every command (`run` in the same folder
registered the model there, so `serve` with no flags serves its champion); `--version` pins a
version and then no alias is claimed. The other settings (ServeSettings) layer as `flows.config`
documents, with the Serve config file (--serve-config, default serving/serve_config.yaml) below the
config file's `serve` section; replicas and ray_actor_options come from the Serve config file's
deployments. The model is looked up before Ray starts: a missing one is reported with the store
that was searched and a nearby store that holds it.

Ray: `connect_ray` (--ray-address / RAY_ADDRESS, else a new local Ray owned by this command; `auto`
for a `ray start` cluster on this machine). Ctrl-C deletes only the app this command started on a
cluster it connected to, so other apps there keep running; a Ray this command started stops with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from flows.cli.context import MODEL_NAME_HELP, WORK_DIR_HELP, CliContext, cli_context
from serving.config import SERVE_CONFIG_PATH

if TYPE_CHECKING:
    from serving.config import ServeSettings

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


def block_forever() -> None:
    """Sleep until interrupted (Ctrl-C raises KeyboardInterrupt)."""
    while True:
        time.sleep(3600)


def serve_until_interrupted(context: CliContext, settings: ServeSettings, base: dict[str, Any],
                            ray_address: str | None, block: Callable[[], None] = block_forever) -> None:
    """Start the app, run `block` (until Ctrl-C), then delete the app, or stop Serve and Ray with it
    when this command started Ray."""
    from ray import serve

    from diffusion_core.adapters.ray_cluster import stop_ray
    from serving import control

    connection = context.connect_ray(ray_address)
    started = False
    try:
        control.start_app(settings, base)
        started = True
        typer.echo(f"serving {_what(settings)} at {settings.url} (docs: {settings.url}/docs); "
                   "Ctrl-C stops")
        block()
    except KeyboardInterrupt:
        typer.echo("shutting down")
    finally:
        if started and not connection.started:
            serve.delete(settings.app_name)
            logger.info("deleted Serve app %s; the cluster and its other apps keep running",
                        settings.app_name)
        stop_ray(connection)


def without_alias_when_pinned(settings: ServeSettings) -> ServeSettings:
    """A pinned version claims no alias (the alias may point elsewhere, now or later), so that
    /model reports what is really served."""
    if settings.version is None or settings.alias is None:
        return settings
    return settings.model_validate({**settings.model_dump(), "alias": None})


def _what(settings: ServeSettings) -> str:
    if settings.checkpoint_dir:
        return f"checkpoint {settings.checkpoint_dir}"
    if settings.version:
        return f"{settings.model_name} version {settings.version}"
    return f"{settings.model_name}@{settings.alias}"


def serve_command(
    ctx: typer.Context,
    model_name: str | None = typer.Option(None, "--model-name", help=MODEL_NAME_HELP),
    alias: str | None = typer.Option(None, "--alias", help="Registry alias to serve (default champion)."),
    version: str | None = typer.Option(None, "--version", help="Pinned registry version (wins over "
                                       "--alias; the app then reports no alias)."),
    checkpoint_dir: str | None = typer.Option(None, "--checkpoint", help="Serve a local checkpoint instead."),
    work_dir: str | None = typer.Option(None, "--work-dir", help=WORK_DIR_HELP),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: "
                                            "the store in the work dir)."),
    host: str | None = typer.Option(None, "--host", help="HTTP host (default: the Serve config's)."),
    port: int | None = typer.Option(None, "--port", help="HTTP port (default: the Serve config's)."),
    route_prefix: str | None = typer.Option(None, "--route-prefix", help="URL prefix of the API."),
    device: str | None = typer.Option(None, "--device", help="torch device of the model (cpu, cuda)."),
    max_images_per_batch: int | None = typer.Option(None, "--max-images-per-batch"),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="Env var holding the bearer token."),
    serve_config: Path = typer.Option(SERVE_CONFIG_PATH, "--serve-config", help="Ray Serve config file."),
    ray_address: str | None = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                           help="Ray cluster address (default: a new local Ray)."),
) -> None:
    """Serve the model over HTTP until interrupted."""
    from flows.stores import registered_version

    context = cli_context(ctx)
    overrides = {
        "model_name": model_name, "alias": alias, "version": version, "checkpoint_dir": checkpoint_dir,
        "work_dir": work_dir, "tracking_uri": tracking_uri, "host": host, "port": port,
        "route_prefix": route_prefix, "device": device, "max_images_per_batch": max_images_per_batch,
        "api_key_env": api_key_env,
    }
    settings, base = context.serve_settings(serve_config, overrides)
    settings = without_alias_when_pinned(settings)
    if settings.checkpoint_dir is None:
        registered_version(settings.model_name, settings.tracking_uri, settings.alias, settings.version)
    serve_until_interrupted(context, settings, base, ray_address)
