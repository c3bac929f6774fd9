"""`diffusion-pipeline evaluate CHECKPOINT DATASET`: score a checkpoint against a validation split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from diffusion_core.atomic_io import atomic_write_text
from diffusion_core.metrics import EvalConfig, EvalResult


def _help(field: str, text: str) -> str:
    """Help text quoting the model's default, so the default lives only in EvalConfig."""
    return f"{text} (default {EvalConfig.model_fields[field].default})"


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)


def eval_overrides(num_samples: int | None, steps: int | None, sampler: str | None, seed: int | None,
                   guidance_scale: float | None) -> dict[str, object]:
    return {"num_samples": num_samples, "steps": steps, "sampler": sampler, "seed": seed,
            "guidance_scale": guidance_scale}


def load_eval_config(overrides: dict[str, object]) -> EvalConfig:
    from flows.cli import GlobalOptions
    from flows.config import load_config

    return load_config(EvalConfig, "evaluate", GlobalOptions.config, overrides=overrides)


def evaluate_command(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory, or models:/<name>@<alias> / "
                                     "models:/<name>/<version> (downloaded from the registry)."),
    dataset: str = typer.Argument(..., help="Prepared dataset (local path or URI)."),
    num_samples: int | None = typer.Option(None, help=_help("num_samples", "Images to generate.")),
    steps: int | None = typer.Option(None, help=_help("steps", "Sampler steps.")),
    sampler: str | None = typer.Option(None, help=_help("sampler", "Sampler name.")),
    seed: int | None = typer.Option(None, help=_help("seed", "Seed of image 0 (image i uses seed + i).")),
    guidance_scale: float | None = typer.Option(None, help=_help("guidance_scale", "CFG scale.")),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the result as JSON here."),
) -> None:
    """Generate samples from CHECKPOINT and report FD, precision/recall and class statistics."""
    from diffusion_core.checkpoint import load_checkpoint
    from diffusion_core.metrics import evaluate_model, reference_from_dataset

    config = load_eval_config(eval_overrides(num_samples, steps, sampler, seed, guidance_scale))
    directory = local_checkpoint(checkpoint)
    try:
        loaded = load_checkpoint(directory, use_ema=config.use_ema, device=config.device)
    finally:  # the weights are in memory now; a registry download is ours to delete
        if directory != Path(checkpoint):
            shutil.rmtree(directory, ignore_errors=True)
    result = evaluate_model(loaded, reference_from_dataset(dataset), config)
    print_result(result)
    if output is not None:
        atomic_write_text(output, json.dumps(result.model_dump(mode="json"), indent=2) + "\n")


def local_checkpoint(checkpoint: str) -> Path:
    """A local checkpoint directory: the path itself, or a registry model downloaded to a temp dir."""
    if not checkpoint.startswith("models:/"):
        return Path(checkpoint)
    from diffusion_core.adapters.mlflow_registry import download_checkpoint
    from flows.cli.register import load_registry_config

    return download_checkpoint(checkpoint, tracking_uri=load_registry_config({}).tracking_uri)


def print_result(result: EvalResult) -> None:
    table = Table(title="Evaluation", show_header=False)
    for key, value in result.model_dump().items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
