"""`diffusion-pipeline train DATASET`: train a model on a prepared dataset with Ray Train.

Progress (step, loss, images/s, ETA) is logged by rank 0 of the workers and shown by Ray on this
console; the final line gives the checkpoint and the MLflow run.
"""

from __future__ import annotations

import typer

from diffusion_core.redact import redact_uri
from flows.cli.context import cli_context


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)


def train_command(
    ctx: typer.Context,
    dataset: str = typer.Argument(..., help="Prepared dataset directory or URI (from `prepare`)."),
    run_name: str | None = typer.Option(None, "--run-name", help="Ray Train run name; reuse to resume."),
    storage_path: str | None = typer.Option(None, "--storage-path", help="Checkpoint root (path or URI)."),
    steps: int | None = typer.Option(None, "--steps", help="Total optimisation steps."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (AdamW)."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help="Linear warm-up steps (< steps)."),
    num_workers: int | None = typer.Option(None, "--num-workers", help="Ray Train workers."),
    cpus_per_worker: float | None = typer.Option(None, "--cpus-per-worker", help="CPUs per worker."),
    use_gpu: bool | None = typer.Option(None, "--gpu/--cpu", help="Train on GPUs (NCCL, bf16)."),
    warm_start: str | None = typer.Option(None, "--warm-start", help="Checkpoint to start weights from."),
    experiment_name: str | None = typer.Option(None, "--experiment", help="MLflow experiment name."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow tracking URI."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address."),
) -> None:
    """Train a diffusion model; prints the final checkpoint path and MLflow run id."""
    from diffusion_core.adapters.ray_train import run_training
    from diffusion_core.training import TrainConfig

    overrides = {
        "dataset": dataset, "run_name": run_name, "storage_path": storage_path, "steps": steps,
        "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "num_workers": num_workers,
        "cpus_per_worker": cpus_per_worker, "use_gpu": use_gpu, "warm_start": warm_start,
        "experiment_name": experiment_name, "tracking_uri": tracking_uri, "ray_address": ray_address,
    }
    config = cli_context(ctx).load(TrainConfig, "train", overrides)
    typer.echo(f"training {config.steps} steps on {config.num_workers} worker(s), "
               f"dataset {redact_uri(config.dataset)}")
    result = run_training(config)
    typer.echo(f"checkpoint: {redact_uri(result.checkpoint_path)}")
    typer.echo(f"mlflow run: {result.run_id}  (training run {result.run_name})")
