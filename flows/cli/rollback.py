"""`diffusion-pipeline rollback`: move the champion alias back to the previous champion, then switch every
running application serving the model to it (as `promote` does; exit code 3 names an application
that could not be switched)."""

from __future__ import annotations

import typer

from flows.cli.context import MODEL_NAME_HELP, WORK_DIR_HELP, cli_context
from flows.cli.promote import switch_served_apps
from flows.cli.register import print_decision


def register(app: typer.Typer) -> None:
    app.command("rollback")(rollback_command)


def rollback_command(
    ctx: typer.Context,
    model_name: str | None = typer.Option(None, help=MODEL_NAME_HELP),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: the store in the "
                                            "work dir; or MLFLOW_TRACKING_URI)."),
    work_dir: str | None = typer.Option(None, "--work-dir", help=WORK_DIR_HELP),
) -> None:
    """Point `champion` at the version the current champion replaced (repeat to go further back)."""
    from diffusion_core.adapters.mlflow_registry import CHAMPION, rollback
    from flows.stores import registered_version

    context = cli_context(ctx)
    registry = context.registry_config({"model_name": model_name, "tracking_uri": tracking_uri,
                                        "work_dir": work_dir})
    registered_version(registry.model_name, registry.tracking_uri, alias=CHAMPION)
    print_decision(rollback(registry.model_name, tracking_uri=registry.tracking_uri,
                            lock_dir=registry.lock_dir, lock_timeout_s=registry.lock_timeout_s))
    switch_served_apps(context, registry)
