"""`diffusion-pipeline run`: the whole pipeline on one machine, ending with pictures from the endpoint.

prepare (built-in digits by default) -> train with a local Ray -> evaluate, register, gate in an
MLflow SQLite store under the work dir -> deploy to Ray Serve on 127.0.0.1:8000 -> fetch a grid of
generated images over HTTP. `--keep-serving` leaves the endpoint up until Ctrl-C.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from diffusion_core.redact import redact_uri
from flows.cli.context import cli_context
from flows.cli.evaluate import evaluation_summary

if TYPE_CHECKING:
    from flows.pipeline import PipelineResult
    from flows.pipeline_config import PipelineConfig


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)


def run_command(
    ctx: typer.Context,
    source: str | None = typer.Option(None, "--source", help="'digits' (built in) or a path: image "
                                      "folder, .npy/.npz or .parquet."),
    work_dir: str | None = typer.Option(None, "--work-dir", help="Where the dataset, checkpoints, "
                                        "MLflow store and samples go (default ./diffusion-pipeline-work)."),
    size: int | None = typer.Option(None, "--size", help="Image side after preparation."),
    channels: int | None = typer.Option(None, "--channels", help="1 (grey) or 3 (RGB)."),
    steps: int | None = typer.Option(None, "--steps", help="Training steps."),
    num_workers: int | None = typer.Option(None, "--num-workers", help="Ray Train workers."),
    model_name: str | None = typer.Option(None, "--model-name", help="Registered model name."),
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
    config = cli_context(ctx).pipeline_config({
        "source": source, "work_dir": work_dir, "prepare.size": size, "prepare.channels": channels,
        "train.steps": steps, "train.num_workers": num_workers, "model_name": model_name,
        "tracking_uri": tracking_uri, "ray_address": ray_address, "promotion_margin": promotion_margin,
        "evaluate.num_samples": eval_samples, "force_train": force_train, "warm_start": warm_start,
        "serving.port": port, "serve": True,
    })
    from diffusion_core.adapters.ray_cluster import connect_ray, stop_ray
    from flows.pipeline import retrain

    started = time.monotonic()
    # A Ray started here outlives training so that Serve can run in it; it stops when `run` ends.
    connection = connect_ray(config.resolved_ray_address(), include_dashboard=False)
    try:
        result = retrain(config)
        grid = _fetch_grid(config, result, num_images)
        _print_summary(config, result, grid, time.monotonic() - started)
        if keep_serving:
            typer.echo("serving; press Ctrl-C to stop")
            _wait_for_interrupt()
    finally:
        if not connection.started:
            typer.echo("the Serve app stays up on the Ray cluster")
        stop_ray(connection)


def _fetch_grid(config: PipelineConfig, result: PipelineResult, num_images: int) -> Path:
    """Generate `num_images` over HTTP (labels cycling through the classes when the model has them)
    and save them as one PNG grid."""
    from diffusion_core.images import make_grid, save_png
    from serving.client import GenerationClient

    url = result.served_url or config.serve_settings().url
    with GenerationClient(url) as client:
        info = client.model_info()
        classes = info.get("num_classes")
        labels = [i % classes for i in range(num_images)] if classes else None
        generated = client.generate(num_images=num_images, labels=labels, seed=0)
    path = config.work_path() / "samples" / f"{result.model_name}-v{result.version}.png"
    images = generated.images
    zoom = max(1, 32 // images.shape[1])  # 8x8 digits are unreadable at 1:1
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    save_png(path, make_grid(images, nrow=10, padding=2))
    return path


def _print_summary(config: PipelineConfig, result: PipelineResult, grid: Path, seconds: float) -> None:
    status = "became champion" if result.became_champion else f"not promoted ({result.decision})"
    typer.echo("")
    typer.echo(f"model      {result.model_name} version {result.version}: {status}")
    for i, line in enumerate(evaluation_summary(result.metrics, config.evaluate.guided_scale)):
        typer.echo(f"{'evaluation' if i == 0 else '':<10} {line}")
    typer.echo(f"samples    {grid}")
    typer.echo(f"time       {seconds:.0f} s (dataset {'reused' if result.dataset_reused else 'prepared'}, "
               f"{'trained' if result.trained else 'training skipped: unchanged'})")
    url = result.served_url or config.serve_settings().url
    typer.echo("")
    typer.echo(f"MLflow UI: {_mlflow_ui(config.resolved_tracking_uri())}")
    typer.echo(f"endpoint:  curl -s -X POST {url}/generate -H 'content-type: application/json' "
               "-d '{\"num_images\": 4, \"seed\": 0}'")
    typer.echo(f"           diffusion-pipeline generate --url {url} -n 16 --out samples/")


def _mlflow_ui(tracking_uri: str) -> str:
    """Where to look at the runs: a tracking server is its own UI; a store needs `mlflow ui`.
    The URI is redacted: it can carry credentials."""
    if tracking_uri.startswith(("http://", "https://")):
        return redact_uri(tracking_uri)
    return f"mlflow ui --backend-store-uri {redact_uri(tracking_uri)} --port 5000"


def _wait_for_interrupt() -> None:
    from flows.cli.serve import block_forever

    try:
        block_forever()
    except KeyboardInterrupt:
        typer.echo("stopping")
