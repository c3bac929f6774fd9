"""Configuration of the retraining pipeline: one `PipelineConfig` reconciled from every stage's section.

A config file has one section per stage (`prepare`, `train`, `evaluate`, `registry`, `serve`) plus
`pipeline`; `load_pipeline_config` folds the stage sections into PipelineConfig, and the `*_config`
methods hand each stage its own configuration. Settings that several stages share (the MLflow
store, the model name, the Ray address) have one value: set in two places, they must agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from diffusion_core.adapters.mlflow_registry import RegistryConfig
from diffusion_core.data.config import PrepareConfig, PrepareParameters
from diffusion_core.data.manifest import DatasetManifest
from diffusion_core.errors import ConfigError, config_error_from
from diffusion_core.metrics import EvalConfig
from diffusion_core.redact import redact_uri
from diffusion_core.training import TrainConfig
from diffusion_core.unet import UNetConfig
from flows.config import CONFIG_ENV, build_config, read_config_file
from serving.config import ServeSettings

# TrainConfig fields that the pipeline derives (the dataset it prepared, a run name from the
# training key, the champion's weights for a warm start).
_PIPELINE_OWNED_TRAIN_FIELDS = frozenset({"dataset", "run_name", "warm_start"})


def _explicit(model: BaseModel, field: str) -> Any:
    """The field's value if it was set explicitly (file, env or flag), else None."""
    return getattr(model, field) if field in model.model_fields_set else None


def _single_value(name: str, candidates: dict[str, Any]) -> Any:
    """The one value set among `candidates` (None = unset); ConfigError when two disagree."""
    given = {where: value for where, value in candidates.items() if value is not None}
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{where}={_shown(value)!r}" for where, value in given.items())
        raise ConfigError(f"{name}: set to different values ({listed}); accepted: one value, set once")
    return next(iter(given.values()), None)


def _shown(value: Any) -> Any:
    """A value as an error message may show it: URIs without their credentials."""
    return redact_uri(value) if isinstance(value, str) else value


class PipelineConfig(BaseModel):
    """Parameters of `retrain` (config sections `pipeline`, plus the stage sections it embeds).

    Everything lives under `work_dir` unless given: the dataset (`<work_dir>/datasets/<name>`),
    Ray Train checkpoints (`<work_dir>/ray_results`), and the MLflow store
    (`sqlite:///<work_dir>/mlflow.db`, artifacts in `<work_dir>/mlartifacts`). `train` holds
    TrainConfig fields (all but `dataset`, which the pipeline fills in); `prepare` the dataset
    parameters; `evaluate` and `registry` the evaluation and registry settings.
    `promotion_margin`, when set, overrides `registry.gate_margin`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field("digits", min_length=1, description="'digits' or a path to images/.npy/.npz/.parquet")
    work_dir: str = Field("diffusion-pipeline-work", min_length=1)
    dataset_uri: str | None = Field(None, description="where the prepared dataset goes (path or URI)")
    model_name: str | None = Field(None, description="registered model name; None: registry.model_name")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None: SQLite in work_dir")
    ray_address: str | None = Field(None, description="Ray cluster address; None: a local Ray")
    promotion_margin: float | None = Field(None, ge=0.0, lt=1.0)
    serve: bool = Field(False, description="deploy the champion to Ray Serve after registration")
    warm_start: bool = Field(False, description="start training from the current champion's weights")
    force_train: bool = Field(False, description="train even if data and config match the champion's")
    prepare: PrepareParameters = Field(default_factory=PrepareParameters)
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields")
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serving: ServeSettings = Field(default_factory=ServeSettings)

    @model_validator(mode="after")
    def _train_fields_are_valid(self) -> PipelineConfig:
        for field in _PIPELINE_OWNED_TRAIN_FIELDS & self.train.keys():
            raise ConfigError(f"train.{field}: set by the pipeline; accepted: leave it out "
                              f"(use pipeline.source / pipeline.dataset_uri / --force-train instead)")
        try:
            TrainConfig(dataset="<set by the pipeline>", **self.train)
        except ValidationError as err:
            raise config_error_from(err, prefix="train") from None
        self.resolved_tracking_uri(), self.resolved_model_name(), self.resolved_ray_address()
        return self

    # -- resolved stage configs ---------------------------------------------------------------

    def work_path(self) -> Path:
        return Path(self.work_dir).expanduser().resolve()

    def resolved_tracking_uri(self) -> str:
        """The one MLflow store of the whole pipeline: `tracking_uri`, or the same field of a stage
        section (registry, serving, train) when only that one is set, else MLFLOW_TRACKING_URI
        (also in runs that a Prefect deployment starts), else a SQLite store in work_dir."""
        given = _single_value("tracking_uri", {
            "pipeline.tracking_uri": self.tracking_uri,
            "registry.tracking_uri": self.registry.tracking_uri,
            "serving.tracking_uri": self.serving.tracking_uri,
            "train.tracking_uri": self.train.get("tracking_uri"),
        })
        return (given or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{self.work_path() / 'mlflow.db'}")

    def resolved_model_name(self) -> str:
        given = _single_value("model_name", {
            "pipeline.model_name": self.model_name,
            "registry.model_name": _explicit(self.registry, "model_name"),
            "serving.model_name": _explicit(self.serving, "model_name"),
        })
        return given or self.registry.model_name

    def resolved_ray_address(self) -> str | None:
        return _single_value("ray_address", {"pipeline.ray_address": self.ray_address,
                                             "train.ray_address": self.train.get("ray_address")})

    def resolved_dataset_uri(self) -> str:
        if self.dataset_uri:
            return self.dataset_uri
        name = "digits" if self.source == "digits" else Path(self.source).stem or "images"
        return str(self.work_path() / "datasets" / name)

    def prepare_config(self) -> PrepareConfig:
        return PrepareConfig(source=self.source, output=self.resolved_dataset_uri(),
                             **self.prepare.model_dump())

    def registry_config(self) -> RegistryConfig:
        update: dict[str, Any] = {"tracking_uri": self.resolved_tracking_uri(),
                                  "model_name": self.resolved_model_name()}
        if self.promotion_margin is not None:
            update["gate_margin"] = self.promotion_margin
        return self.registry.model_copy(update=update)

    def serve_settings(self) -> ServeSettings:
        """Serve the registered model this pipeline registers, from the same tracking store."""
        return self.serving.model_copy(update={"model_name": self.resolved_model_name(),
                                               "tracking_uri": self.resolved_tracking_uri()})

    def train_config(self, dataset: DatasetManifest, dataset_uri: str, run_name: str,
                     warm_start: str | None) -> TrainConfig:
        fields: dict[str, Any] = {
            "storage_path": str(self.work_path() / "ray_results"),
            **self.train,
            "unet": unet_fields_for(dataset, self.train.get("unet") or {}),
            "dataset": dataset_uri,
            "run_name": run_name,
            "tracking_uri": self.resolved_tracking_uri(),
            "ray_address": self.resolved_ray_address(),
        }
        if warm_start:
            fields["warm_start"] = warm_start
        return TrainConfig(**fields)


# Config-file sections that PipelineConfig embeds, and the field each fills.
_EMBEDDED_SECTIONS = {"prepare": "prepare", "train": "train", "evaluate": "evaluate",
                      "registry": "registry", "serve": "serving"}


def load_pipeline_config(path: str | Path | None = None,
                         overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """PipelineConfig the way every command builds it: the config file (section `pipeline` plus the
    stage sections it embeds; `path`, else the file named by DIFFUSION_PIPELINE_CONFIG), then the
    environment, then `overrides` (dotted keys; None values ignored)."""
    path = path or os.environ.get(CONFIG_ENV) or None
    sections = read_config_file(path)
    data: dict[str, Any] = dict(sections.get("pipeline") or {})
    for section, field in _EMBEDDED_SECTIONS.items():
        stage = dict(sections.get(section) or {})
        if section == "prepare":  # the pipeline owns where data comes from and goes
            if "source" in stage:
                data.setdefault("source", stage.pop("source"))
            if "output" in stage:
                data.setdefault("dataset_uri", stage.pop("output"))
        if section == "train":
            stage.pop("dataset", None)  # the `train` command's input; the pipeline prepares its own
        if stage:
            data[field] = {**stage, **(data.get(field) or {})}
    return build_config(PipelineConfig, data, "pipeline", overrides)


def unet_fields_for(dataset: DatasetManifest, given: dict[str, Any]) -> dict[str, Any]:
    """UNet settings for `dataset`: the image size, channels and classes come from its manifest
    unless `given` sets them; the rest from `given`, else the digits default for 8-pixel images
    and UNetConfig's defaults otherwise. So `run --source my_images --size 32` needs no UNet config."""
    num_classes = len(dataset.label_names) if dataset.label_names else None
    base = UNetConfig.digits_default(num_classes).model_dump() if dataset.image_size <= 8 else {}
    derived = {"image_size": dataset.image_size, "in_channels": dataset.channels, "num_classes": num_classes}
    return {**base, **derived, **given}


def training_key(dataset_fingerprint: str, train: TrainConfig) -> str:
    """Identity of what a training run learns: the data's fingerprint plus the config's recipe
    (TrainConfig.recipe; placement and tracking are not part of it). Equal keys mean retraining
    would redo work."""
    learned = train.recipe.model_dump(mode="json")
    blob = json.dumps({"dataset": dataset_fingerprint, "train": learned}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
