"""What the terminal shows: the project's own progress and results, and problems from anyone.

Three levels, chosen by the global options:

- default: INFO lines of the project's loggers (`flows`, `diffusion_core`, `serving`: stages,
  progress with rate and ETA, results) and WARNING or worse from the libraries. Ray's and MLflow's
  own INFO lines, Prefect's run logs, HTTP request logs, Python warnings and the output of Ray
  workers (`log_to_driver`) stay off the terminal. Prefect still receives every run log: its API
  handler sits on its own loggers, before the terminal's filter.
- `--verbose`: INFO of every library, Ray workers' output included.
- `--debug`: DEBUG of everything, plus tracebacks of errors.

MLflow and Ray configure their loggers when they are imported (own handlers, no propagation):
MLflow reads MLFLOW_LOGGING_LEVEL (and MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR), which `configure_console` sets
unless the user did, before MLflow loads; Ray's levels are applied by `quiet_ray_logs`, which the CLI
calls right before it connects. Messages the raylet pushes to the driver (e.g. a warning about how
many worker processes started) are printed by Ray directly and stay.
"""

from __future__ import annotations

import logging
import os
import sys
from enum import IntEnum

from flows.prefect_logs import PROJECT_LOGGERS


class Verbosity(IntEnum):
    DEFAULT = 0
    VERBOSE = 1
    DEBUG = 2


class TerminalHandler(logging.StreamHandler):
    """The terminal's handler on the root logger: a class of its own, so that a second
    configuration replaces it rather than adding another, and public, so that Prefect counts it as
    the application's handler and leaves the root logger alone (it replaces handlers whose class
    name starts with an underscore)."""


# Loggers kept off the default terminal at every level: Python's warnings module (notes about
# library internals) and Prefect's flow and task run loggers, whose lines (states, crash reports,
# tracebacks) are the run's record in the Prefect UI; the CLI reports failures and interruptions
# itself, in one line with a hint.
_HIDDEN_LOGGERS = ("py.warnings", "prefect.flow_runs", "prefect.task_runs")


class _TerminalFilter(logging.Filter):
    """Default level: the project's INFO lines, and WARNING or worse from the libraries."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in PROJECT_LOGGERS:
            return True
        if record.name.startswith(_HIDDEN_LOGGERS):
            return False
        return record.levelno >= logging.WARNING


class _TerminalFormatter(logging.Formatter):
    """`HH:MM:SS message` for the project's INFO lines; the level and logger otherwise."""

    def __init__(self, verbosity: Verbosity) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.verbosity = verbosity

    def format(self, record: logging.LogRecord) -> str:
        plain = (self.verbosity is Verbosity.DEFAULT and record.levelno == logging.INFO
                 and record.name.split(".", 1)[0] in PROJECT_LOGGERS)
        self._style._fmt = ("%(asctime)s %(message)s" if plain
                            else "%(asctime)s %(levelname)s %(name)s: %(message)s")
        return super().format(record)


def configure_console(verbosity: Verbosity) -> None:
    """Route log records to stderr as the module docstring describes. Call once, before Prefect,
    MLflow or Ray is imported: Prefect keeps a root handler that is already there."""
    handler = TerminalHandler(sys.stderr)
    handler.setFormatter(_TerminalFormatter(verbosity))
    if verbosity is Verbosity.DEFAULT:
        handler.addFilter(_TerminalFilter())
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, TerminalHandler)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel({Verbosity.DEFAULT: logging.WARNING, Verbosity.VERBOSE: logging.INFO,
                   Verbosity.DEBUG: logging.DEBUG}[verbosity])
    project_level = logging.DEBUG if verbosity is Verbosity.DEBUG else logging.INFO
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(project_level)
    logging.captureWarnings(True)
    if verbosity is Verbosity.DEFAULT:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The temporary Prefect server of a local run has no use for usage telemetry (its failures
    # print tracebacks on machines without internet).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def quiet_ray_logs(verbosity: Verbosity) -> None:
    """At the default level, Ray's and Ray Serve's driver-side loggers show errors only. Both set
    their own handler and level INFO when imported, so this imports them first."""
    if verbosity is not Verbosity.DEFAULT:
        return
    import ray.serve  # noqa: F401 - importing configures the `ray` and `ray.serve` loggers

    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)
