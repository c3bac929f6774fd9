"""`diffusion-pipeline config show`: the effective configuration and where each value came from.

The layers and their precedence are documented once, in `flows.config`: default < file < env <
flag, plus the values the pipeline derives (the MLflow store from the work directory, the model
name and the dataset's location from the dataset, the UNet and batch from the dataset at training
time). Values that can carry credentials are shown redacted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from flows.cli.context import WORK_DIR_HELP, cli_context

# PipelineConfig field -> the config file's section of the same settings.
_SECTION_OF_FIELD = {"serving": "serve"}
# TrainConfig fields the pipeline fills in for each run.
_RUN_FIELDS = frozenset({"dataset", "run_name", "warm_start", "unet"})


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="Inspect the configuration every command reads.", no_args_is_help=True)
    config_app.command("show")(show_command)
    app.add_typer(config_app, name="config")


def show_command(
    ctx: typer.Context,
    work_dir: str | None = typer.Option(None, "--work-dir", help=WORK_DIR_HELP),
    source: str | None = typer.Option(None, "--source", help="Data source: 'digits' or a path."),
    model_name: str | None = typer.Option(None, "--model-name", help="Registered model name."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow tracking URI."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address."),
) -> None:
    """Print every setting with its value and its source: default, file, env, flag or derived."""
    flags = {"work_dir": work_dir, "source": source, "model_name": model_name,
             "tracking_uri": tracking_uri, "ray_address": ray_address}
    rows = effective_rows(cli_context(ctx).config, {k: v for k, v in flags.items() if v is not None})
    width = max(len(key) for key, _, _ in rows)
    typer.echo("# precedence: default < file < env < flag (see `diffusion-pipeline --help`)")
    for key, value, origin in rows:
        typer.echo(f"{key:<{width}}  {value}  [{origin}]")


def effective_rows(path: Path | None, flags: dict[str, Any],
                   environ: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(dotted key as in the config file, shown value, source) for every setting of the pipeline."""
    from diffusion_core.redact import redact_uri
    from flows.config import CONFIG_ENV, dotted_keys, env_overrides, value_source
    from flows.pipeline_config import (
        SHARED_SETTINGS,
        PipelineConfig,
        load_pipeline_config,
        pipeline_file_data,
    )

    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(CONFIG_ENV) or None
    config = load_pipeline_config(path, flags, environ)
    layers = {"file": pipeline_file_data(path), "env": env_overrides(PipelineConfig, environ), "flag": flags}
    derived = {
        "dataset_uri": config.resolved_dataset_uri(), "model_name": config.resolved_model_name(),
        "tracking_uri": config.resolved_tracking_uri(), "work_dir": str(config.work_path()),
    }
    rows: list[tuple[str, str, str]] = []

    def add(key: str, value: Any, origin: str) -> None:
        shown = redact_uri(value) if isinstance(value, str) else value
        section, _, rest = key.partition(".")
        rows.append((f"{_SECTION_OF_FIELD.get(section, section)}.{rest}" if rest else f"pipeline.{key}",
                     "-" if shown is None else str(shown), origin))

    dumped = config.model_dump(mode="json")
    for field, value in dumped.items():
        if isinstance(value, dict):
            continue
        origin = value_source(field, layers)
        if origin == "default" and field in derived and derived[field] != value:
            value, origin = derived[field], _derivation(field)
        elif field == "ray_address" and value is None:
            value = "- (a local Ray, started and stopped by each command)"
        add(field, value, origin)
    # The stage sections, without the shared settings (one value each, in the pipeline.* rows).
    sections = {"prepare": dumped["prepare"], "evaluate": dumped["evaluate"],
                "registry": dumped["registry"], "serving": dumped["serving"],
                "train": _train_values(config)}
    for field, value in sections.items():
        for key in sorted(dotted_keys(value)):
            top = key.split(".", 1)[0]
            if top in SHARED_SETTINGS or (field == "train" and top in _RUN_FIELDS):
                continue
            add(f"{field}.{key}", _get(value, key), _train_origin(key, config, layers) if field == "train"
                else value_source(f"{field}.{key}", layers))
    add("train.unet", config.train.get("unet") or "from the dataset when training starts",
        value_source("train.unet", layers) if "unet" in config.train else "derived")
    return rows


def _train_values(config: Any) -> dict[str, Any]:
    from diffusion_core.training import TrainConfig

    storage = str(config.work_path() / "ray_results")
    return TrainConfig(**{"dataset": "-", "storage_path": storage, **config.train}).model_dump(mode="json")


def _train_origin(key: str, config: Any, layers: dict[str, Any]) -> str:
    from flows.config import value_source
    from flows.pipeline_config import CPU_BATCH_SIZE, DIGITS_SIZE

    origin = value_source(f"train.{key}", layers)
    if key == "storage_path" and origin == "default":
        return "derived: <work_dir>/ray_results"
    if key == "batch_size" and origin == "default":
        return f"default; {CPU_BATCH_SIZE} for images over {DIGITS_SIZE} pixels on CPU"
    return origin


def _derivation(field: str) -> str:
    return {"dataset_uri": "derived from work_dir and the source",
            "model_name": "derived: diffusion-<dataset name>",
            "tracking_uri": "derived: SQLite store in work_dir",
            "work_dir": "default, made absolute"}[field]


def _get(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data
