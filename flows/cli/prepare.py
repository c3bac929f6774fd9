"""`diffusion-pipeline prepare SOURCE [OUT]`: build a versioned Parquet dataset and print its summary.

OUT defaults to where `run` keeps the dataset of SOURCE (`<work dir>/datasets/<name>`), so that a
`run --source SOURCE` in the same folder reuses it.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.prepare import PrepareResult, prepare, summary_rows
from diffusion_core.redact import redact_uri
from flows.cli.context import WORK_DIR_HELP, CliContext, cli_context, help_with_default


def _help(field: str, text: str) -> str:
    return help_with_default(PrepareConfig, field, text)


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare_command)


def prepare_command(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="'digits' (built-in 8x8 digits), an image folder, or a "
                                 ".npy / .npz / .parquet file."),
    output: str | None = typer.Argument(None, help="Dataset directory: local path or URI (file://, s3://, "
                                        "gs://); default <work dir>/datasets/<source name>."),
    work_dir: str | None = typer.Option(None, "--work-dir", help=WORK_DIR_HELP),
    size: int | None = typer.Option(None, help=_help("size", "Target image size (square).")),
    channels: int | None = typer.Option(None, help=_help("channels", "1 (grey) or 3 (RGB).")),
    val_fraction: float | None = typer.Option(
        None, help=_help("val_fraction", "Share held out for validation.")),
    alpha_background: str | None = typer.Option(
        None, help=_help("alpha_background", "Colour transparent pixels become: white or black.")),
    rows_per_shard: int | None = typer.Option(None, help=_help("rows_per_shard", "Rows per Parquet file.")),
    force: bool = typer.Option(False, "--force", help="Rebuild even when the dataset is up to date."),
    use_flow: bool = typer.Option(False, "--flow", help="Run as the Prefect flow (retries, artifacts)."),
) -> None:
    """Prepare SOURCE into a sharded Parquet dataset with a manifest at OUT."""
    context = cli_context(ctx)
    overrides = {"source": source, "output": output or _default_output(context, source, work_dir),
                 "size": size, "channels": channels, "val_fraction": val_fraction,
                 "alpha_background": alpha_background, "rows_per_shard": rows_per_shard}
    config = context.load(PrepareConfig, "prepare", overrides)
    if use_flow:
        with context.flow_runs():
            result = _run_flow(config, force)
    else:
        result = _run_with_progress(config, force)
    _print_summary(result)


def _default_output(context: CliContext, source: str, work_dir: str | None) -> str:
    """Where `run --source SOURCE` keeps the dataset (the config file's prepare.output when set)."""
    return context.pipeline_config({"source": source, "work_dir": work_dir}).resolved_dataset_uri()


def _run_with_progress(config: PrepareConfig, force: bool) -> PrepareResult:
    from diffusion_core.data.sources import open_source

    total = open_source(config.source, config.parameters()).count_hint()
    columns = (TextColumn("preparing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task_id = bar.add_task("prepare", total=total)
        return prepare(config, force=force, progress=lambda n: bar.update(task_id, completed=n))


def _run_flow(config: PrepareConfig, force: bool) -> PrepareResult:
    from flows.prepare import prepare_dataset

    return prepare_dataset(config, force=force)


def _print_summary(result: PrepareResult) -> None:
    table = Table(title="Prepared dataset", show_header=False)
    for row in summary_rows(result):
        table.add_row(row["item"], redact_uri(row["value"]))
    Console().print(table)
