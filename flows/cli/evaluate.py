"""`diffusion-pipeline evaluate CHECKPOINT DATASET`: score a checkpoint against a validation split."""

from __future__ import annotations

import json
from collections.abc import Mapping
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
    table = Table(title="Evaluation (headline: the default request, no labels)", show_header=False)
    for key, value in sorted(result.as_metrics().items()):
        table.add_row(key, f"{value:.4g}")
    for key in ("feature_kind", "guided_scale", "eval_key"):
        table.add_row(key, str(getattr(result, key)))
    table.add_row("class_histogram", json.dumps([round(p, 3) for p in result.class_histogram]))
    Console().print(table)


# (label, metric prefix) of each kind of request in the summary, the headline first.
_SUMMARY_PASSES = (("default request (no labels)", "eval_"), ("null label (unconditional)", "eval_null_"),
                   ("guided", "eval_guided_"))
_SUMMARY_NUMBERS = (("fd", "fd"), ("precision", "precision"), ("recall", "recall"),
                    ("label_accuracy", "label accuracy"), ("copy_share", "copy share"),
                    ("nn_distance_ratio", "nn-distance ratio"))


def evaluation_summary(metrics: Mapping[str, float], guided_scale: float | None = None) -> list[str]:
    """Evaluation metrics (EvalResult.as_metrics names) as summary lines: one per kind of request
    (the headline first; its label accuracy is the conditional accuracy: the drawn labels asked
    for at guidance 1), then the feature network's check."""
    lines = []
    for label, prefix in _SUMMARY_PASSES:
        numbers = [f"{text}={metrics[prefix + name]:.4g}" for name, text in _SUMMARY_NUMBERS
                   if prefix + name in metrics]
        if label == "guided" and guided_scale is not None:
            label = f"guidance {guided_scale:g}"
        if numbers:
            lines.append(f"{label}: {' '.join(numbers)}")
    if "eval_feature_accuracy" in metrics:
        lines.append(f"feature classifier: held-out accuracy {metrics['eval_feature_accuracy']:.3f} "
                     f"(chance {metrics.get('eval_feature_chance', float('nan')):.3f})")
    return lines
