"""`diffusion-pipeline train DATASET`: train a model on a prepared dataset with Ray Train.

The training configuration is built as `run` builds it (`PipelineConfig.train_config`): the UNet's
image size, channels and classes come from the dataset's manifest, and so do its width and depth
and the batch on CPU; checkpoints go under the work dir and the MLflow run into its store unless
given. An estimate of the time comes first, then progress lines (step, loss, images/s, ETA); the
final lines give the checkpoint and the MLflow run. Rerunning with the same --run-name resumes from
the run's last checkpoint.
"""

from __future__ import annotations

import typer

from diffusion_core.redact import redact_uri
from flows.cli.context import WORK_DIR_HELP, cli_context


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)


def train_command(
    ctx: typer.Context,
    dataset: str = typer.Argument(..., help="Prepared dataset directory or URI (from `prepare`)."),
    run_name: str | None = typer.Option(None, "--run-name", help="Ray Train run name; reuse to resume."),
    work_dir: str | None = typer.Option(None, "--work-dir", help=WORK_DIR_HELP),
    storage_path: str | None = typer.Option(None, "--storage-path", help="Checkpoint root (path or URI; "
                                            "default <work dir>/ray_results)."),
    steps: int | None = typer.Option(None, "--steps", help="Total optimisation steps."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (AdamW)."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help="Linear warm-up steps (< steps)."),
    num_workers: int | None = typer.Option(None, "--num-workers", help="Ray Train workers."),
    cpus_per_worker: float | None = typer.Option(None, "--cpus-per-worker", help="CPUs per worker."),
    use_gpu: bool | None = typer.Option(None, "--gpu/--cpu", help="Train on GPUs (NCCL, bf16)."),
    warm_start: str | None = typer.Option(None, "--warm-start", help="Checkpoint to start weights from."),
    experiment_name: str | None = typer.Option(None, "--experiment", help="MLflow experiment name."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: "
                                            "the store in the work dir)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address."),
) -> None:
    """Train a diffusion model; prints the final checkpoint path and MLflow run id."""
    from diffusion_core.adapters.ray_cluster import stop_ray
    from diffusion_core.adapters.ray_train import default_run_name
    from diffusion_core.data.manifest import read_manifest
    from flows.train import train_interruptibly

    context = cli_context(ctx)
    train_flags = {"storage_path": storage_path, "steps": steps, "batch_size": batch_size, "lr": lr,
                   "warmup_steps": warmup_steps, "num_workers": num_workers,
                   "cpus_per_worker": cpus_per_worker, "use_gpu": use_gpu, "experiment_name": experiment_name}
    pipeline = context.pipeline_config({
        "work_dir": work_dir, "tracking_uri": tracking_uri, "ray_address": ray_address,
        **{f"train.{key}": value for key, value in train_flags.items()},
    })
    name = run_name or default_run_name()
    config = pipeline.train_config(read_manifest(dataset), dataset, name, warm_start)
    connection = context.connect_ray(config.ray_address)
    try:
        result = train_interruptibly(config)
    except KeyboardInterrupt:
        typer.secho(f"\ninterrupted; resume with: diffusion-pipeline train {dataset} --run-name {name}",
                    err=True)
        context.interruption_reported = True
        raise
    finally:
        stop_ray(connection)
    typer.echo(f"checkpoint: {redact_uri(result.checkpoint_path)}")
    typer.echo(f"mlflow run: {result.run_id}  (training run {result.run_name}; MLflow store "
               f"{redact_uri(config.tracking_uri)})")
