"""`diffusion-pipeline evaluate CHECKPOINT DATASET`: score a checkpoint against a validation split."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from diffusion_core.atomic_io import atomic_write_text
from diffusion_core.metrics import EvalConfig, EvalResult
from flows.cli.context import WORK_DIR_HELP, CliContext, cli_context, help_with_default


def _help(field: str, text: str) -> str:
    return help_with_default(EvalConfig, field, text)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)


def eval_overrides(num_samples: int | None, steps: int | None, sampler: str | None, seed: int | None,
                   guidance_scale: float | None) -> dict[str, object]:
    """The evaluation flags shared by `evaluate` and `register`, as EvalConfig overrides."""
    return {"num_samples": num_samples, "steps": steps, "sampler": sampler, "seed": seed,
            "guidance_scale": guidance_scale}


def evaluate_command(
    ctx: typer.Context,
    checkpoint: str = typer.Argument(..., help="Checkpoint directory, or models:/<name>@<alias> / "
                                     "models:/<name>/<version> (downloaded from the registry)."),
    dataset: str = typer.Argument(..., help="Prepared dataset (local path or URI)."),
    num_samples: int | None = typer.Option(None, help=_help("num_samples", "Images to generate.")),
    steps: int | None = typer.Option(None, help=_help("steps", "Sampler steps.")),
    sampler: str | None = typer.Option(None, help=_help("sampler", "Sampler name.")),
    seed: int | None = typer.Option(None, help=_help("seed", "Seed of image 0 (image i uses seed + i).")),
    guidance_scale: float | None = typer.Option(None, help=_help("guidance_scale", "CFG scale.")),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the result as JSON here."),
    work_dir: str | None = typer.Option(None, "--work-dir", help=WORK_DIR_HELP + " Where models:/ "
                                        "checkpoints are looked up."),
) -> None:
    """Generate samples from CHECKPOINT and report FD, precision/recall and class statistics."""
    from diffusion_core.checkpoint import load_checkpoint
    from diffusion_core.metrics import evaluate_model, reference_from_dataset

    context = cli_context(ctx)
    config = context.eval_config(eval_overrides(num_samples, steps, sampler, seed, guidance_scale))
    with _checkpoint_directory(checkpoint, context, work_dir) as directory:
        loaded = load_checkpoint(directory, use_ema=config.use_ema, device=config.device)
    result = evaluate_model(loaded, reference_from_dataset(dataset), config)
    print_result(result)
    if output is not None:
        atomic_write_text(output, json.dumps(result.model_dump(mode="json"), indent=2) + "\n")


def _checkpoint_directory(checkpoint: str, context: CliContext,
                          work_dir: str | None) -> AbstractContextManager[Path]:
    """The checkpoint as a local directory: the user's own path (never deleted), or a registry
    version downloaded for as long as it takes to load it."""
    if not checkpoint.startswith("models:/"):
        return nullcontext(Path(checkpoint))
    from flows.checkpoints import registry_checkpoint

    return registry_checkpoint(checkpoint, context.registry_config({"work_dir": work_dir}).tracking_uri)


def print_result(result: EvalResult) -> None:
    table = Table(title="Evaluation", show_header=False)
    for key, value in result.model_dump().items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
