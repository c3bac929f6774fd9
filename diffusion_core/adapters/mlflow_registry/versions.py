"""Reading registered versions: by number, by alias, all of a model."""

from __future__ import annotations

import math
from collections.abc import Mapping

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict

from diffusion_core.adapters.mlflow_registry.config import CANDIDATE, CHAMPION, PREVIOUS_CHAMPION
from diffusion_core.adapters.mlflow_registry.errors import RegistryError
from diffusion_core.adapters.mlflow_store import client_for

_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


class ModelVersionInfo(BaseModel):
    """A registered model version as the rest of the project sees it."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    run_id: str | None

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def version_info(mv: ModelVersion) -> ModelVersionInfo:
    return ModelVersionInfo(name=mv.name, version=str(mv.version), aliases=list(mv.aliases or []),
                            tags=dict(mv.tags or {}), run_id=mv.run_id)


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersionInfo | None:
    """The version `alias` points to, or None when the model or the alias does not exist."""
    try:
        return version_info(client.get_model_version_by_alias(name, alias))
    except MlflowException as err:
        if err.error_code in _NOT_FOUND:
            return None
        raise


def resolve_version(name: str, alias: str, tracking_uri: str | None = None) -> ModelVersionInfo:
    """The version that `models:/<name>@<alias>` points to; RegistryError when there is none."""
    info = version_by_alias(client_for(tracking_uri), name, alias)
    if info is None:
        raise RegistryError(f"alias: model {name!r} has no version with alias {alias!r}",
                            hint=f"register a version (diffusion-pipeline register) or check the name; "
                                 f"aliases used here: {CANDIDATE}, {CHAMPION}, {PREVIOUS_CHAMPION}")
    return info


def get_version(name: str, version: str, tracking_uri: str | None = None) -> ModelVersionInfo:
    return version_info(client_for(tracking_uri).get_model_version(name, str(version)))


def list_versions(name: str, tracking_uri: str | None = None) -> list[ModelVersionInfo]:
    """All versions of `name`, oldest first."""
    if "'" in name:  # it would end the filter's string literal
        raise RegistryError("model_name: must not contain a quote (')")
    versions = client_for(tracking_uri).search_model_versions(f"name = '{name}'")
    return sorted((version_info(mv) for mv in versions), key=lambda v: int(v.version))


def numeric_tags(tags: Mapping[str, str]) -> dict[str, float]:
    """The tags whose values are finite numbers (log_and_register stores evaluation metrics as tags)."""
    metrics = {}
    for key, value in tags.items():
        try:
            number = float(value)
        except ValueError:
            continue
        if math.isfinite(number):
            metrics[key] = number
    return metrics
