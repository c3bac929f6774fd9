"""`diffusion-pipeline run`: the whole pipeline on one machine, ending with pictures from the endpoint.

prepare (built-in digits by default) -> train with a local Ray -> evaluate, register, gate in an
MLflow SQLite store under the work dir -> deploy to Ray Serve on 127.0.0.1:8000 -> fetch a grid of
generated images over HTTP. The endpoint stops when `run` returns (`--keep-serving` leaves it up
until Ctrl-C); the summary, the last thing printed, says so and gives the commands that work
afterwards, starting with the `serve` command that brings the endpoint back. Ctrl-C at any point
stops every stage (training workers, Serve, Ray, the temporary Prefect server) and exits with 130;
rerunning the same command reuses what was finished and resumes training from its last checkpoint.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from diffusion_core.redact import has_credentials, redact_uri
from flows.cli.context import MODEL_NAME_HELP, WORK_DIR_HELP, CliContext, cli_context
from flows.cli.evaluate import evaluation_summary

if TYPE_CHECKING:
    from flows.pipeline import PipelineResult
    from flows.pipeline_config import PipelineConfig


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)


@dataclass(frozen=True)
class Grid:
    """The PNG grid fetched from the endpoint, and the version that really generated it."""

    path: Path
    model_name: str
    version: str
    alias: str | None
    num_images: int


def run_command(
    ctx: typer.Context,
    source: str | None = typer.Option(None, "--source", help="'digits' (built in) or a path: image "
                                      "folder, .npy/.npz or .parquet."),
    work_dir: str | None = typer.Option(None, "--work-dir", help=WORK_DIR_HELP),
    size: int | None = typer.Option(None, "--size", help="Image side after preparation."),
    channels: int | None = typer.Option(None, "--channels", help="1 (grey) or 3 (RGB)."),
    steps: int | None = typer.Option(None, "--steps", help="Training steps."),
    num_workers: int | None = typer.Option(None, "--num-workers", help="Ray Train workers."),
    model_name: str | None = typer.Option(None, "--model-name", help=MODEL_NAME_HELP),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow tracking URI."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster (default: local)."),
    promotion_margin: float | None = typer.Option(None, "--promotion-margin",
                                                  help="Relative FD improvement needed to become champion."),
    eval_samples: int | None = typer.Option(None, "--eval-samples", help="Images generated to evaluate."),
    force_train: bool | None = typer.Option(None, "--force-train", help="Train even if nothing changed."),
    warm_start: bool | None = typer.Option(None, "--warm-start", help="Start from the champion's weights."),
    port: int | None = typer.Option(None, "--port", help="Serve HTTP port (default 8000)."),
    num_images: int = typer.Option(40, "--num-images", "-n", help="Images in the final grid."),
    keep_serving: bool = typer.Option(False, "--keep-serving", help="Leave the endpoint up until Ctrl-C."),
) -> None:
    """Run the whole pipeline: prepare -> train -> evaluate/register -> serve -> sample grid."""
    context = cli_context(ctx)
    config = context.pipeline_config({
        "source": source, "work_dir": work_dir, "prepare.size": size, "prepare.channels": channels,
        "train.steps": steps, "train.num_workers": num_workers, "model_name": model_name,
        "tracking_uri": tracking_uri, "ray_address": ray_address, "promotion_margin": promotion_margin,
        "evaluate.num_samples": eval_samples, "force_train": force_train, "warm_start": warm_start,
        "serving.port": port, "serve": True,
    })
    from flows.pipeline import retrain

    started = time.monotonic()
    with context.flow_runs():
        # A Ray started here outlives training so that Serve can run in it; it stops when `run` ends.
        # Its dashboard (127.0.0.1) carries Serve's REST API, through which the app is started and
        # switched.
        connection = context.connect_ray(config.resolved_ray_address())
        try:
            result = retrain(config)
            grid = _fetch_grid(config, result, num_images)
            if keep_serving:
                _print_summary(context, config, result, grid, time.monotonic() - started, serving=True)
                _serve_until_interrupted()
                return
        except KeyboardInterrupt:
            _say_interrupted(context)
            raise
        finally:
            _stop(connection)
    _print_summary(context, config, result, grid, time.monotonic() - started, serving=not connection.started)


def _stop(connection) -> None:
    from diffusion_core.adapters.ray_cluster import stop_ray

    stop_ray(connection)


def _say_interrupted(context: CliContext) -> None:
    typer.secho("\ninterrupted: stopping training, Serve, Ray and the temporary Prefect server", err=True)
    typer.secho("rerun the same command to continue: finished stages are reused and training resumes "
                "from its last checkpoint", err=True)
    context.interruption_reported = True


def _fetch_grid(config: PipelineConfig, result: PipelineResult, num_images: int) -> Grid:
    """Generate `num_images` over HTTP (labels cycling through the classes when the model has them)
    and save them as one PNG grid named after the version that answered (GET /model), which a rerun
    that skipped training may not have registered."""
    from diffusion_core.images import make_grid, save_png
    from serving.client import GenerationClient

    with GenerationClient(result.served_url or config.serve_settings().url) as client:
        info = client.model_info()
        classes = info.get("num_classes")
        labels = [i % classes for i in range(num_images)] if classes else None
        generated = client.generate(num_images=num_images, labels=labels, seed=0)
    name, version = generated.model["name"], str(generated.model["version"])
    path = config.work_path() / "samples" / f"{name}-v{version}.png"
    images = generated.images
    zoom = max(1, 32 // images.shape[1])  # 8x8 digits are unreadable at 1:1
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    save_png(path, make_grid(images, nrow=10, padding=2))
    return Grid(path=path, model_name=name, version=version, alias=info.get("alias"),
                num_images=len(generated.seeds))


def _print_summary(context: CliContext, config: PipelineConfig, result: PipelineResult, grid: Grid,
                   seconds: float, serving: bool) -> None:
    from flows.mlflow_ui import mlflow_ui
    from flows.pipeline import status_line
    from flows.progress import duration

    trained = "trained" if result.trained else "training skipped: unchanged"
    if result.resumed_at_step:
        trained = f"trained, resumed at step {result.resumed_at_step}"
    served = f"version {grid.version}" + (f", the {grid.alias}" if grid.alias else "")
    typer.echo("")
    typer.echo(f"model      {result.model_name} version {result.version}: {status_line(result)}")
    for i, line in enumerate(evaluation_summary(result.metrics, config.evaluate.guided_scale)):
        typer.echo(f"{'evaluation' if i == 0 else '':<10} {line}")
    typer.echo(f"samples    {grid.path} ({grid.num_images} images by {grid.model_name} {served})")
    dataset = "reused" if result.dataset_reused else "prepared"
    typer.echo(f"time       {duration(seconds)} (dataset {dataset}, {trained})")
    url = result.served_url or config.serve_settings().url
    typer.echo("")
    if serving:
        typer.echo(f"The endpoint serves {grid.model_name} {served} at {url}. Try it from another terminal:")
    else:
        typer.echo(f"The endpoint at {url} stopped when `run` returned. Serve the champion again "
                   "(until Ctrl-C):")
        typer.echo(f"  {serve_command(context, config)}")
        typer.echo("Then, from another terminal:")
    for command in endpoint_commands(url):
        typer.echo(f"  {command}")
    ui = mlflow_ui(config.resolved_tracking_uri())
    if ui.command:
        typer.echo(f"Runs, metrics and model versions in the MLflow UI (then open {ui.url}):")
        typer.echo(f"  {ui.command}")
    else:
        typer.echo("Runs, metrics and model versions in the MLflow UI:")
        typer.echo(f"  {ui.url}")
    if has_credentials(config.resolved_tracking_uri()):
        typer.echo("(the tracking URI is shown without its credentials: give them through the environment, "
                   "e.g. MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")


def endpoint_commands(url: str) -> list[str]:
    """Commands that call a running endpoint at `url`."""
    body = '{"num_images": 4, "seed": 0}'
    return [f"curl -s -X POST {url}/generate -H 'content-type: application/json' -d '{body}'",
            f"diffusion-pipeline generate --url {url} -n 16 --out samples/"]


def serve_command(context: CliContext, config: PipelineConfig) -> str:
    """The `serve` command that serves what `run` served, run from the same folder: with a flag only
    where `serve` without it would resolve something else (work dir, model name, store, port)."""
    words = ["diffusion-pipeline"]
    if context.config is not None and context.config_from_flag:
        words += ["--config", shlex.quote(str(context.config))]
    words.append("serve")
    flags: dict[str, str] = {}
    wanted = {"work_dir": str(config.work_path()), "model_name": config.resolved_model_name(),
              "tracking_uri": config.resolved_tracking_uri()}
    for key, value in wanted.items():
        bare = context.pipeline_config(flags)
        resolved = {"work_dir": str(bare.work_path()), "model_name": bare.resolved_model_name(),
                    "tracking_uri": bare.resolved_tracking_uri()}[key]
        if resolved != value:
            flags[key] = config.work_dir if key == "work_dir" else value
    settings, _ = context.serve_settings(overrides=flags)
    for key in ("host", "port"):
        if getattr(settings, key) != getattr(config.serve_settings(), key):
            flags[key] = str(getattr(config.serve_settings(), key))
    for key, value in flags.items():
        shown = redact_uri(value) if key == "tracking_uri" else value
        words += [f"--{key.replace('_', '-')}", shlex.quote(shown)]
    return " ".join(words)


def _serve_until_interrupted() -> None:
    from flows.cli.serve import block_forever

    try:
        block_forever()
    except KeyboardInterrupt:
        typer.echo("stopping the endpoint")
