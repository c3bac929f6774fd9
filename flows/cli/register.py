"""`diffusion-pipeline register CHECKPOINT`: log a checkpoint to MLflow as a new registered version.

With `--dataset` the checkpoint is evaluated first (numbers become version tags) and the promotion
gate runs (unless `--no-gate`); without it the version is registered as `candidate` only.
Exit code 0 once the version is registered, whatever the gate decided (the decision is printed);
`promote` is the command whose exit code reports the gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from flows.cli.context import MODEL_NAME_HELP, WORK_DIR_HELP, cli_context
from flows.cli.evaluate import eval_overrides

if TYPE_CHECKING:  # MLflow loads only when a registry command runs, not with every CLI call
    from diffusion_core.adapters.mlflow_registry import ModelVersionInfo, PromotionDecision


def register(app: typer.Typer) -> None:
    app.command("register")(register_command)


def print_version(version: ModelVersionInfo) -> None:
    table = Table(title=f"{version.name} version {version.version}", show_header=False)
    table.add_row("aliases", ", ".join(version.aliases) or "-")
    table.add_row("run_id", version.run_id or "-")
    for key in sorted(version.tags):
        table.add_row(key, version.tags[key][:80])
    Console().print(table)


def print_decision(decision: PromotionDecision) -> None:
    colour = "green" if decision.promoted or decision.action == "rolled_back" else "yellow"
    Console().print(f"[{colour}]{decision.action}[/]: champion of {decision.name} is version "
                    f"{decision.champion_version or '-'} ({decision.reason})")


def register_command(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (spec.json + safetensors)."),
    dataset: str | None = typer.Option(None, help="Prepared dataset: evaluate first and run the gate."),
    model_name: str | None = typer.Option(None, help=MODEL_NAME_HELP),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: the store in the "
                                            "work dir; or MLFLOW_TRACKING_URI)."),
    work_dir: str | None = typer.Option(None, "--work-dir", help=WORK_DIR_HELP),
    run_id: str | None = typer.Option(None, help="Training run to log the model into."),
    gate: bool = typer.Option(True, "--gate/--no-gate", help="Try to promote after registering."),
    force: bool = typer.Option(False, "--force", help="Promote even if the gate would reject it."),
    num_samples: int | None = typer.Option(None, help="Evaluation images (evaluate.num_samples)."),
    steps: int | None = typer.Option(None, help="Evaluation sampler steps (evaluate.steps)."),
    sampler: str | None = typer.Option(None, help="Evaluation sampler (evaluate.sampler)."),
    seed: int | None = typer.Option(None, help="Evaluation seed (evaluate.seed)."),
) -> None:
    """Register CHECKPOINT as a new version (alias candidate); with --dataset also evaluate and gate."""
    context = cli_context(ctx)
    registry = context.registry_config({"model_name": model_name, "tracking_uri": tracking_uri,
                                        "work_dir": work_dir})
    if dataset is None:
        from diffusion_core.adapters.mlflow_registry import log_and_register

        print_version(log_and_register(checkpoint, model_name=registry.model_name,
                                       tracking_uri=registry.tracking_uri, run_id=run_id,
                                       experiment_name=registry.experiment_name, device=registry.device,
                                       lock_dir=registry.lock_dir, lock_timeout_s=registry.lock_timeout_s))
        return
    from flows.evaluate import evaluate_and_register

    config = context.eval_config(eval_overrides(num_samples, steps, sampler, seed, None))
    with context.flow_runs():
        outcome = evaluate_and_register(checkpoint, dataset, config, registry, training_run_id=run_id,
                                        run_gate=gate, force=force)
    print_version(outcome.version)
    if outcome.decision is not None:
        print_decision(outcome.decision)
