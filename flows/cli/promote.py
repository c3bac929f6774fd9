"""`diffusion-pipeline promote VERSION`: run the promotion gate for a registered version (or force it).

Then every running application serving the model switches to the champion (serving.switch; the
targets are the `serve.targets` of the config file, else the local Ray) and each one is printed.

Exit codes: 0 when VERSION is champion afterwards (promoted, forced, or already champion) and every
application serves it; 1 when the gate rejects it (the champion is unchanged), so scripts can
branch on the decision; 2 for an error the user can act on (DiffusionPipelineError, e.g. FDs that
are not comparable); 3 when an application could not be switched (the champion has changed; each
such application is named).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import typer

from flows.cli.context import MODEL_NAME_HELP, WORK_DIR_HELP, CliContext, cli_context
from flows.cli.register import print_decision

if TYPE_CHECKING:
    from diffusion_core.adapters.mlflow_registry import RegistryConfig


def register(app: typer.Typer) -> None:
    app.command("promote")(promote_command)


def promote_command(
    ctx: typer.Context,
    version: str = typer.Argument(..., help="Version number of the registered model."),
    model_name: str | None = typer.Option(None, help=MODEL_NAME_HELP),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: the store in the "
                                            "work dir; or MLFLOW_TRACKING_URI)."),
    work_dir: str | None = typer.Option(None, "--work-dir", help=WORK_DIR_HELP),
    force: bool = typer.Option(False, "--force", help="Make it champion whatever the numbers say."),
    dataset: str | None = typer.Option(
        None, help="Prepared dataset to re-evaluate the champion on when its recorded FD was measured "
        "under other settings (the `evaluate` config section applies)."),
) -> None:
    """Make VERSION the champion if it passes the quality floor and its recorded FD beats the
    champion's by registry.gate_margin.

    Exits with code 1 when the gate rejects VERSION.
    """
    from diffusion_core.adapters.mlflow_registry import promote_if_better
    from flows.stores import registered_version

    context = cli_context(ctx)
    registry = context.registry_config({"model_name": model_name, "tracking_uri": tracking_uri,
                                        "work_dir": work_dir})
    registered_version(registry.model_name, registry.tracking_uri, version=version)
    decision = promote_if_better(
        registry.model_name, version, policy=registry.gate_policy(), force=force,
        tracking_uri=registry.tracking_uri, lock_dir=registry.lock_dir,
        lock_timeout_s=registry.lock_timeout_s,
        reevaluate_champion=None if dataset is None else _reevaluator(dataset, registry, context))
    print_decision(decision)
    if decision.action == "rejected":
        raise typer.Exit(code=1)
    switch_served_apps(context, registry)


def switch_served_apps(context: CliContext, registry: RegistryConfig) -> None:
    """Switch every running app serving the model to its champion; print each outcome; exit 3
    naming the apps that could not be switched."""
    from diffusion_core.adapters.mlflow_registry import CHAMPION
    from serving.switch import switch_to_alias

    settings, _ = context.serve_settings()
    report = switch_to_alias(registry.model_name, CHAMPION, settings.switch_targets(),
                             tracking_uri=registry.tracking_uri)
    for outcome in report.outcomes:
        typer.echo(f"serving: {outcome.describe()}")
    if report.failures:
        names = ", ".join(f"{o.app_name or '(all)'} on {o.target}" for o in report.failures)
        typer.secho(f"error: not switched to version {report.version}: {names}", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(code=3)


def _reevaluator(dataset: str, registry: RegistryConfig, context: CliContext) -> Callable[[str], float]:
    from diffusion_core.metrics import feature_extractor_for, reference_from_dataset
    from flows.evaluate import champion_reevaluator

    config = context.eval_config()
    reference = reference_from_dataset(dataset)
    return champion_reevaluator(reference, feature_extractor_for(reference, config), config, registry)
