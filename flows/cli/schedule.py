"""`diffusion-pipeline schedule --cron "0 3 * * *"`: serve scheduled retraining from this process.

The deployment (name, cron, parameters) is the one `prefect.yaml` declares for a work pool; this
command is the no-infrastructure form (`flow.serve`). It blocks until interrupted.
"""

from __future__ import annotations

import typer

from flows.cli.context import cli_context


def register(app: typer.Typer) -> None:
    app.command("schedule")(schedule_command)


def schedule_command(
    ctx: typer.Context,
    cron: str | None = typer.Option(None, "--cron", help="Five-field cron expression, e.g. '0 3 * * *'."),
    timezone: str | None = typer.Option(None, "--timezone", help="IANA time zone of the cron (default UTC)."),
    name: str | None = typer.Option(None, "--name", help="Deployment name (default retrain-nightly)."),
    source: str | None = typer.Option(None, "--source", help="Data source: 'digits' or a path."),
    work_dir: str | None = typer.Option(None, "--work-dir", help="Working directory of each retrain."),
    serve: bool | None = typer.Option(None, "--serve/--no-serve", help="Deploy the new champion to Serve."),
) -> None:
    """Serve the `retrain` flow on a cron schedule (Prefect `flow.serve`); Ctrl-C stops it."""
    from flows.schedule import RetrainSchedule, serve_retraining

    context = cli_context(ctx)
    schedule = context.load(RetrainSchedule, "schedule",
                            {"cron": cron, "timezone": timezone, "deployment_name": name})
    config = context.pipeline_config({"source": source, "work_dir": work_dir, "serve": serve})
    typer.echo(f"serving deployment 'retrain/{schedule.deployment_name}' on cron '{schedule.cron}' "
               f"({schedule.timezone}); trigger now with: "
               f"prefect deployment run 'retrain/{schedule.deployment_name}'")
    with context.flow_runs():
        serve_retraining(schedule, config)
