"""What every subcommand shares: the global options, and each stage's configuration built from them.

The app callback fills one `CliContext` per invocation and typer hands it to every command as
`ctx.obj`; commands get it with `cli_context(ctx)`. Each stage's configuration is layered the same
way (`flows.config` documents the precedence): model defaults, the config file's section
(`--config`), the environment, then the command's flags (`overrides`; None means the flag was not
given). The defaults that must agree across commands (the work directory, the MLflow store in it,
the registered model's name) are resolved by `PipelineConfig` for every command, so that `serve`,
`promote` or `train` after `run` in the same folder find what `run` wrote.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from pydantic import BaseModel

from flows.cli.console import Verbosity, quiet_ray_logs
from flows.config import DEFAULT_WORK_DIR, build_config, load_config
from serving.config import SERVE_CONFIG_PATH

if TYPE_CHECKING:  # MLflow, Ray and torch load only when a command needs them
    from diffusion_core.adapters.mlflow_registry import RegistryConfig
    from diffusion_core.adapters.ray_cluster import RayConnection
    from diffusion_core.metrics import EvalConfig
    from flows.pipeline_config import PipelineConfig
    from serving.config import ServeSettings

M = TypeVar("M", bound=BaseModel)

# Flags that choose the shared defaults; every command that reads or writes the MLflow store or
# the work directory takes them (`shared_overrides`).
SHARED_FLAGS = ("work_dir", "model_name", "tracking_uri")

MODEL_NAME_HELP = "Registered model name (default: the one `run` registers, diffusion-<dataset name>)."
WORK_DIR_HELP = (f"Working directory: datasets, checkpoints and the MLflow store (default "
                 f"./{DEFAULT_WORK_DIR}); the same default for every command.")


@dataclass
class CliContext:
    """Options given before the subcommand: the config file and how much to show."""

    config: Path | None = None
    config_from_flag: bool = False  # --config, not DIFFUSION_PIPELINE_CONFIG: printed commands repeat it
    verbosity: Verbosity = Verbosity.DEFAULT
    interruption_reported: bool = False  # a command said what Ctrl-C stopped and how to go on

    @property
    def debug(self) -> bool:
        return self.verbosity is Verbosity.DEBUG

    def load(self, model: type[M], section: str, overrides: Mapping[str, Any] | None = None) -> M:
        return load_config(model, section, self.config, overrides)

    def eval_config(self, overrides: Mapping[str, Any] | None = None) -> EvalConfig:
        from diffusion_core.metrics import EvalConfig

        return self.load(EvalConfig, "evaluate", overrides)

    def pipeline_config(self, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
        """The pipeline's configuration: also where every command takes its shared defaults."""
        from flows.pipeline_config import load_pipeline_config

        return load_pipeline_config(self.config, overrides)

    def registry_config(self, overrides: Mapping[str, Any] | None = None) -> RegistryConfig:
        """The `registry` section with the store and model name `run` uses (work dir, model name,
        tracking URI flags in `overrides`)."""
        return self.pipeline_config(shared_overrides(overrides)).registry_config()

    def serve_settings(self, serve_config: str | Path = SERVE_CONFIG_PATH,
                       overrides: Mapping[str, Any] | None = None) -> tuple[ServeSettings, dict[str, Any]]:
        """(settings, Serve config file). Lowest to highest precedence: the Serve config file's
        application args, name, route_prefix and http_options host/port; the config file's `serve`
        section; the command's flags. Which model and which MLflow store come from the pipeline's
        resolution, as for every command (`flows.config`); the Serve config file's `model_name` and
        `tracking_uri` serve Ray's own `serve run`."""
        from serving import control
        from serving.config import ServeSettings

        overrides = dict(overrides or {})
        pipeline = self.pipeline_config(shared_overrides(overrides))
        flags = {key: value for key, value in overrides.items() if key not in SHARED_FLAGS}
        base = control.load_serve_config(serve_config)
        data = {**control.settings_fields(base), **pipeline.serving.model_dump(exclude_unset=True)}
        settings = build_config(ServeSettings, data, "serve", flags, environ={})
        chosen = pipeline.serve_settings()
        resolved = {"model_name": chosen.model_name, "tracking_uri": chosen.tracking_uri}
        return ServeSettings.model_validate({**settings.model_dump(), **resolved}), base

    def connect_ray(self, address: str | None = None, **start_options: Any) -> RayConnection:
        """`connect_ray` with this invocation's verbosity: Ray workers' output reaches the terminal
        only with --verbose/--debug (`flows.cli.console`)."""
        from diffusion_core.adapters.ray_cluster import connect_ray

        quiet_ray_logs(self.verbosity)
        return connect_ray(address, log_to_driver=self.verbosity is not Verbosity.DEFAULT, **start_options)

    @contextmanager
    def flow_runs(self) -> Iterator[None]:
        """Around commands that run Prefect flows: the Prefect API they report to
        (`flows.cli.prefect_api`)."""
        from flows.cli.prefect_api import prefect_api

        with prefect_api():
            yield


def shared_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The shared-default flags among `overrides` (work dir, model name, tracking URI)."""
    return {key: value for key, value in (overrides or {}).items() if key in SHARED_FLAGS}


def cli_context(ctx: typer.Context) -> CliContext:
    """This invocation's CliContext (a default one when a command runs without the app callback)."""
    return ctx.ensure_object(CliContext)


def help_with_default(model: type[BaseModel], field: str, text: str) -> str:
    """Help text quoting the model's default, so that the default lives only in the model."""
    return f"{text} (default {model.model_fields[field].default})"
