"""`diffusion-pipeline`: one console script, one subcommand module per stage.

Each module in `SUBCOMMANDS` defines `register(app: typer.Typer) -> None`; the options given before
the subcommand reach every command as typer's `ctx.obj` (`flows.cli.context.CliContext`). Errors that
users can act on (`DiffusionPipelineError`) print as one line plus a hint; `--debug` shows the
traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import typer

from diffusion_core.errors import DiffusionPipelineError
from flows.cli.context import CliContext, cli_context
from flows.config import CONFIG_ENV

SUBCOMMANDS = (
    "prepare", "train", "evaluate", "register", "promote", "rollback",
    "serve", "generate", "schedule", "run",
)

app = typer.Typer(
    name="diffusion-pipeline",
    help="Train, register, serve and retrain denoising diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML or TOML file with one section per stage "
        "(prepare, train, evaluate, registry, serve, pipeline, schedule); give it before the "
        "subcommand. MLFLOW_TRACKING_URI and RAY_ADDRESS override it; flags override both.",
        envvar=CONFIG_ENV,
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logs."),
) -> None:
    context = cli_context(ctx)
    context.config, context.debug = config, debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _register_all() -> None:
    for name in SUBCOMMANDS:
        importlib.import_module(f"flows.cli.{name}").register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    from typer._click.exceptions import ClickException  # typer 0.29 vendors its click

    context = CliContext()  # filled by the app callback; read here to decide on tracebacks
    try:
        code = app(args=argv, standalone_mode=False, obj=context)
    except DiffusionPipelineError as err:
        if context.debug:
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        if err.hint:
            typer.secho(f"hint: {err.hint}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except ClickException as err:  # usage errors: click's own message and code
        err.show()
        sys.exit(err.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as err:  # the CLI's last line of defence
        if context.debug:
            raise
        typer.secho(f"error: {type(err).__name__}: {err}", fg=typer.colors.RED, err=True)
        typer.secho("hint: rerun with --debug for the full traceback", err=True)
        sys.exit(1)
    # standalone_mode=False returns typer.Exit codes instead of exiting.
    sys.exit(code if isinstance(code, int) else 0)
