"""`diffusion-pipeline serve`: start the Ray Serve app and block until Ctrl-C.

Which model and which MLflow store: the same defaults as every command (`run` in the same folder
registered the model there, so `serve` with no flags serves its champion); `--version` pins a
version and then no alias is claimed. The other settings (ServeSettings) layer as `flows.config`
documents, with the Serve config file (--serve-config, default serving/serve_config.yaml) below the
config file's `serve` section; replicas and ray_actor_options come from the Serve config file's
deployments. The model is looked up before Ray starts: a missing one is reported with the store
that was searched and a nearby store that holds it.

Ray: `connect_ray` (--ray-address / RAY_ADDRESS, else a new local Ray owned by this command, with
its dashboard on 127.0.0.1, port 8265 or the next free one; `auto` for a `ray start` cluster on this
machine). The app is deployed through Serve's REST API on that Ray's dashboard, where `promote` and
`rollback` find it later (RAY_DASHBOARD_ADDRESS when it is not at 127.0.0.1:8265). Ctrl-C deletes
only the app this command started on a cluster it connected to, so other apps there keep running; a
Ray this command started stops with it.

API key: an endpoint on a non-loopback host needs one (ServeSettings refuses `api_key_env` unset
there), and when this command starts Ray itself the variable must be set, in this environment or
in the app's runtime_env, before anything starts.
"""

from __future__ import annotations

import logging
import os
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
    """Start the app with its registry version pinned (`pin_alias`), run `block` (until Ctrl-C),
    then delete the app, or stop Serve and Ray with it when this command started Ray."""
    from ray import serve

    from diffusion_core.adapters.ray_cluster import stop_ray
    from diffusion_core.adapters.ray_dashboard import local_dashboard_url
    from serving import control

    settings = pin_alias(settings)
    connection = context.connect_ray(ray_address)
    started = False
    try:
        control.start_app(settings, base)
        started = True
        typer.echo(f"serving {_what(settings)} at {settings.url} (docs: {settings.url}/docs); "
                   "Ctrl-C stops")
        typer.echo(f"Ray dashboard (Serve REST API, for promote/rollback): {local_dashboard_url()}")
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
    if ray_address is None:  # replicas of a Ray started here inherit this environment
        require_api_key(settings, base)
    if settings.checkpoint_dir is None:
        registered_version(settings.model_name, settings.tracking_uri, settings.alias, settings.version)
    serve_until_interrupted(context, settings, base, ray_address)


def pin_alias(settings: ServeSettings) -> ServeSettings:
    """`settings` with the version its alias points to now: every replica, also one that starts
    later, loads that version until `promote` or `rollback` pins another (serving.switch)."""
    if settings.checkpoint_dir is not None or settings.version is not None:
        return settings
    from flows.deploy import resolve_pinned_version

    version = resolve_pinned_version(settings.model_name, settings.alias, None, settings.tracking_uri)
    return settings.model_copy(update={"version": version})


def require_api_key(settings: ServeSettings, base: dict[str, Any]) -> None:
    """ConfigError when the app names an API-key variable that neither this environment nor the
    app's runtime_env sets: its endpoint could not start."""
    from diffusion_core.errors import ConfigError
    from serving import control

    name = settings.api_key_env
    if name is None or os.environ.get(name) or control.app_env_vars(base).get(name):
        return
    raise ConfigError(f"api_key_env: environment variable {name!r} is not set or empty; the endpoint "
                      "requires its API key", hint=f"export {name}=<key> (clients send it as a bearer token)")
