"""`diffusion-pipeline serve`: start the Ray Serve app and block until Ctrl-C.

Settings come from the `serve` section of the config file, MLFLOW_TRACKING_URI and these flags
(ServeSettings); replicas and ray_actor_options from the Serve config file (--serve-config, default
serving/serve_config.yaml). Ctrl-C shuts Serve down.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from serving.config import SERVE_CONFIG_PATH


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


def serve_command(
    model_name: str | None = typer.Option(None, "--model-name", help="Registered model name."),
    alias: str | None = typer.Option(None, "--alias", help="Registry alias to serve (default champion)."),
    version: str | None = typer.Option(None, "--version", help="Pinned registry version (wins over alias)."),
    checkpoint_dir: str | None = typer.Option(None, "--checkpoint", help="Serve a local checkpoint instead."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow tracking URI."),
    host: str | None = typer.Option(None, "--host", help="HTTP host (default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="HTTP port (default 8000)."),
    route_prefix: str | None = typer.Option(None, "--route-prefix", help="URL prefix of the API."),
    device: str | None = typer.Option(None, "--device", help="torch device of the model (cpu, cuda)."),
    max_images_per_batch: int | None = typer.Option(None, "--max-images-per-batch"),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="Env var holding the bearer token."),
    serve_config: Path = typer.Option(SERVE_CONFIG_PATH, "--serve-config", help="Ray Serve config file."),
    ray_address: str | None = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                           help="Ray cluster address (default: a local Ray)."),
) -> None:
    """Serve the model over HTTP until interrupted."""
    import ray
    from ray import serve

    from flows.cli import GlobalOptions
    from flows.config import load_config
    from serving import control
    from serving.config import ServeSettings

    overrides = {
        "model_name": model_name, "alias": alias, "version": version, "checkpoint_dir": checkpoint_dir,
        "tracking_uri": tracking_uri, "host": host, "port": port, "route_prefix": route_prefix,
        "device": device, "max_images_per_batch": max_images_per_batch, "api_key_env": api_key_env,
    }
    settings = load_config(ServeSettings, "serve", GlobalOptions.config, overrides)
    base = control.load_serve_config(serve_config)
    ray.init(address=ray_address, configure_logging=False)
    try:
        control.start_app(settings, base)
        typer.echo(f"serving {settings.model_name} at {settings.url} (docs: {settings.url}/docs); "
                   "Ctrl-C stops")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("shutting down")
    finally:
        serve.shutdown()
        ray.shutdown()
