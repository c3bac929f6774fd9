"""`diffusion-pipeline`: one console script, one subcommand module per stage.

Each module in `SUBCOMMANDS` defines `register(app: typer.Typer) -> None`; the options given before
the subcommand reach every command as typer's `ctx.obj` (`flows.cli.context.CliContext`). What the
terminal shows is decided in `flows.cli.console` (`--verbose`, `--debug`). Errors that users can act
on (`DiffusionPipelineError`) print as one line plus a hint; `--debug` shows the traceback. Ctrl-C
stops the command's stages, says so and exits with 130.
"""

from __future__ import annotations

import gc
import importlib
import sys
from pathlib import Path

import typer

from diffusion_core.errors import DiffusionPipelineError
from flows.cli.console import Verbosity, configure_console
from flows.cli.context import CliContext, cli_context
from flows.config import CONFIG_ENV

SUBCOMMANDS = (
    "prepare", "train", "evaluate", "register", "promote", "rollback",
    "serve", "generate", "schedule", "run", "config",
)
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C

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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show the INFO logs of Ray, "
                                 "Prefect and MLflow and the output of Ray workers."),
    debug: bool = typer.Option(False, "--debug", help="Show debug logs of everything and full tracebacks."),
) -> None:
    from typer._click.core import ParameterSource  # typer 0.29 vendors its click

    context = cli_context(ctx)
    context.config = config
    context.config_from_flag = ctx.get_parameter_source("config") is ParameterSource.COMMANDLINE
    context.verbosity = Verbosity.DEBUG if debug else Verbosity.VERBOSE if verbose else Verbosity.DEFAULT
    configure_console(context.verbosity)


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
    except KeyboardInterrupt:  # typer turns Ctrl-C inside a command into exit code 130 (below)
        code = INTERRUPTED_EXIT_CODE
    except ClickException as err:  # usage errors: click's own message and code
        err.show()
        sys.exit(err.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as err:  # the CLI's last line of defence
        if context.debug:
            raise
        _report_unexpected(err)
        sys.exit(1)
    # standalone_mode=False returns typer.Exit codes instead of exiting.
    if code == INTERRUPTED_EXIT_CODE and not context.interruption_reported:
        typer.secho("interrupted", err=True)
    # Interpreter shutdown would end with garbage collections over everything Ray, MLflow, Prefect and
    # torch loaded: seconds to minutes on a busy machine, after the command has done its work and its
    # cleanup. Frozen objects are left out of those collections.
    gc.freeze()
    sys.exit(code if isinstance(code, int) else 0)


def _report_unexpected(err: Exception) -> None:
    """One line for an error nobody anticipated; a refused connection says which server is missing."""
    url = _refused_url(err)
    if url is not None:
        typer.secho(f"error: no server answers at {url}", fg=typer.colors.RED, err=True)
        typer.secho("hint: start the endpoint with `diffusion-pipeline serve` (in the folder where "
                    "`run` ran), or pass the URL of a running one", err=True)
        return
    typer.secho(f"error: {type(err).__name__}: {err}", fg=typer.colors.RED, err=True)
    typer.secho("hint: rerun with --debug for the full traceback", err=True)


def _refused_url(err: BaseException) -> str | None:
    """The address of an HTTP request that found no server (httpx.ConnectError), else None."""
    if type(err).__name__ != "ConnectError" or "httpx" not in type(err).__module__:
        return None
    try:
        url = err.request.url  # type: ignore[attr-defined]
    except RuntimeError:  # an httpx error raised without its request
        return "the server's address"
    return f"{url.scheme}://{url.netloc.decode()}"
