"""One configuration system for every command: defaults, config file, environment, flags.

This docstring is where the precedence is documented; `diffusion-pipeline config show` prints the
effective values and, for each, the layer it came from. Lowest to highest:

1. default: the config models' field defaults (PrepareConfig, TrainConfig, EvalConfig,
   RegistryConfig, ServeSettings, PipelineConfig), the one source of defaults; plus the values the
   pipeline derives (`flows.pipeline_config`): the work directory `./diffusion-pipeline-work`, the
   MLflow store `sqlite:///<work_dir>/mlflow.db` in it, the model name `diffusion-<dataset>`, and
   the UNet and batch of a dataset.
2. file: the section of a YAML or TOML config file (`diffusion-pipeline --config FILE`, else the file
   named by DIFFUSION_PIPELINE_CONFIG). The settings several stages share (tracking_uri, model_name,
   ray_address) may be set in any section that has them; set twice, the values must agree.
3. env: the environment variables in `ENV_FIELDS` (MLFLOW_TRACKING_URI, RAY_ADDRESS).
4. flag: explicit command-line flags.

`diffusion-pipeline serve` adds one layer below the file: the Serve config file's application args
(`--serve-config`, default serving/serve_config.yaml), except for which model and which store, which
come from the pipeline like for every other command. Nested fields are addressed with dotted keys
(`unet.base_channels`).
"""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from diffusion_core.errors import ConfigError, config_error_from

M = TypeVar("M", bound=BaseModel)

DEFAULT_WORK_DIR = "diffusion-pipeline-work"

# The environment variable naming the config file (the CLI's --config, and `retrain` runs started
# by a Prefect deployment, read it).
CONFIG_ENV = "DIFFUSION_PIPELINE_CONFIG"

# Environment variables that users of Ray and MLflow already set, mapped to the field they fill
# wherever a config model has that field.
ENV_FIELDS: dict[str, str] = {
    "MLFLOW_TRACKING_URI": "tracking_uri",
    "RAY_ADDRESS": "ray_address",
}


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The whole config file as a dict; {} when no path is given."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config: file {str(p)!r} does not exist", hint="pass --config PATH to a .yaml/.toml file"
        )
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text) or {}
    elif p.suffix == ".toml":
        data = tomllib.loads(text)
    else:
        raise ConfigError(f"config: unsupported file type {p.suffix!r}; accepted: .yaml, .yml, .toml")
    if not isinstance(data, dict):
        raise ConfigError(f"config: {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def env_overrides(model: type[BaseModel], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    fields = model.model_fields
    return {field: environ[var] for var, field in ENV_FIELDS.items() if field in fields and environ.get(var)}


def load_config(
    model: type[M],
    section: str,
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> M:
    """Build `model` from `section` of the config file, the environment and flag `overrides`.

    `overrides` values of None mean "flag not given" and are ignored.
    """
    data = read_config_file(path).get(section) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: section {section!r} must be a mapping")
    return build_config(model, data, section, overrides, environ)


def build_config(
    model: type[M],
    data: Mapping[str, Any],
    section: str,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> M:
    """`model` from already-read file `data`, then the environment, then flag `overrides`."""
    merged = copy.deepcopy(dict(data))
    merged.update(env_overrides(model, environ))
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(merged, key, value)
    try:
        return model.model_validate(merged)
    except ValidationError as err:
        raise config_error_from(err, prefix=section) from None


def dotted_keys(data: Mapping[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys of the leaves of a nested mapping: {"a": {"b": 1}} -> {"a.b"}."""
    keys: set[str] = set()
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            keys |= dotted_keys(value, f"{name}.")
        else:
            keys.add(name)
    return keys


def value_source(key: str, layers: Mapping[str, Mapping[str, Any]]) -> str:
    """The name of the highest layer (in `layers`' order, lowest first) that sets dotted `key` or
    one of its parents; "default" when none does."""
    parents = {".".join(key.split(".")[: i + 1]) for i in range(key.count(".") + 1)}
    found = "default"
    for name, data in layers.items():
        keys = dotted_keys(data)
        if keys & parents or any(k.startswith(f"{key}.") for k in keys):
            found = name
    return found
