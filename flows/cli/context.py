"""What every subcommand shares: the global options, and each stage's configuration built from them.

The app callback fills one `CliContext` per invocation and typer hands it to every command as
`ctx.obj`; commands get it with `cli_context(ctx)`. Each stage's configuration is layered the same
way (`flows.config`): model defaults, the config file's section (`--config`), the environment, then
the command's flags (`overrides`; None means the flag was not given).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from pydantic import BaseModel

from flows.config import build_config, load_config, read_config_file
from serving.config import SERVE_CONFIG_PATH

if TYPE_CHECKING:  # MLflow, Ray and torch load only when a command needs them
    from diffusion_core.adapters.mlflow_registry import RegistryConfig
    from diffusion_core.metrics import EvalConfig
    from flows.pipeline_config import PipelineConfig
    from serving.config import ServeSettings

M = TypeVar("M", bound=BaseModel)


@dataclass
class CliContext:
    """Options given before the subcommand: the config file and whether to show debug output."""

    config: Path | None = None
    debug: bool = False

    def load(self, model: type[M], section: str, overrides: Mapping[str, Any] | None = None) -> M:
        return load_config(model, section, self.config, overrides)

    def eval_config(self, overrides: Mapping[str, Any] | None = None) -> EvalConfig:
        from diffusion_core.metrics import EvalConfig

        return self.load(EvalConfig, "evaluate", overrides)

    def registry_config(self, overrides: Mapping[str, Any] | None = None) -> RegistryConfig:
        from diffusion_core.adapters.mlflow_registry import RegistryConfig

        return self.load(RegistryConfig, "registry", overrides)

    def pipeline_config(self, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
        from flows.pipeline_config import load_pipeline_config

        return load_pipeline_config(self.config, dict(overrides or {}))

    def serve_settings(self, serve_config: str | Path = SERVE_CONFIG_PATH,
                       overrides: Mapping[str, Any] | None = None) -> tuple[ServeSettings, dict[str, Any]]:
        """(settings, Serve config file). Lowest to highest precedence: the Serve config file's
        application args, name, route_prefix and http_options host/port; the config file's `serve`
        section; the environment; `overrides`."""
        from diffusion_core.errors import ConfigError
        from serving import control
        from serving.config import ServeSettings

        base = control.load_serve_config(serve_config)
        section = read_config_file(self.config).get("serve") or {}
        if not isinstance(section, dict):
            raise ConfigError("config: section 'serve' must be a mapping")
        data = {**control.settings_fields(base), **section}
        return build_config(ServeSettings, data, "serve", overrides), base


def cli_context(ctx: typer.Context) -> CliContext:
    """This invocation's CliContext (a default one when a command runs without the app callback)."""
    return ctx.ensure_object(CliContext)


def help_with_default(model: type[BaseModel], field: str, text: str) -> str:
    """Help text quoting the model's default, so that the default lives only in the model."""
    return f"{text} (default {model.model_fields[field].default})"
