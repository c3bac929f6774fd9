"""Configuration of the retraining pipeline: one `PipelineConfig` reconciled from every stage's section.

A config file has one section per stage (`prepare`, `train`, `evaluate`, `registry`, `serve`) plus
`pipeline`; `load_pipeline_config` folds the stage sections into PipelineConfig, and the `*_config`
methods hand each stage its own configuration. Settings that several stages share (the MLflow
store, the model name, the Ray address) have one value: set in two sections of the file, they must
agree; the environment and flags then override that value (`SHARED_SETTINGS`).

Every command resolves its defaults here, so that they agree with `run`: the work directory
(`work_path`), the MLflow store in it (`resolved_tracking_uri`), the registered model's name
(`resolved_model_name`, derived from the dataset) and, for training, the UNet, batch and worker
CPUs that fit the dataset and the machine (`train_defaults_for`). The precedence of the layers is
documented once, in `flows.config`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
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
from flows.config import CONFIG_ENV, DEFAULT_WORK_DIR, build_config, read_config_file
from serving.config import RayTarget, ServeSettings

# TrainConfig fields that the pipeline derives (the dataset it prepared, a run name from the
# training key, the champion's weights for a warm start).
_PIPELINE_OWNED_TRAIN_FIELDS = frozenset({"dataset", "run_name", "warm_start"})

MODEL_NAME_PREFIX = "diffusion-"

# Settings several stages share -> the stage sections of a config file that may also set them.
SHARED_SETTINGS: dict[str, tuple[str, ...]] = {
    "tracking_uri": ("registry", "serve", "train"),
    "model_name": ("registry", "serve"),
    "ray_address": ("train",),
}

# Images up to this side train with the digits defaults (UNetConfig.digits_default, TrainConfig).
DIGITS_SIZE = 8
# Global batch of larger images on CPU workers: with the CPU UNet of `unet_fields_for` a 32x32 RGB
# step then costs about as much as a digits step, so `run` stays within minutes.
CPU_BATCH_SIZE = 64
# Global batch on GPU workers, which a batch of 64 small images leaves mostly idle.
GPU_BATCH_SIZE = 128


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
    work_dir: str = Field(DEFAULT_WORK_DIR, min_length=1)
    dataset_uri: str | None = Field(None, description="where the prepared dataset goes (path or URI)")
    model_name: str | None = Field(None, description="registered model name; None: derived from the "
                                   "dataset (diffusion-<dataset name>)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None: SQLite in work_dir")
    ray_address: str | None = Field(None, description="Ray cluster address; None: a local Ray. A "
                                    "dashboard URL (http://head:8265) trains as a Ray Job there")
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
        """The registered model: `model_name` (or the same field of a stage section), else
        `diffusion-<dataset name>`, so that models of different data never share a name by default
        (the built-in digits give `diffusion-digits`)."""
        given = _single_value("model_name", {
            "pipeline.model_name": self.model_name,
            "registry.model_name": _explicit(self.registry, "model_name"),
            "serving.model_name": _explicit(self.serving, "model_name"),
        })
        return given or MODEL_NAME_PREFIX + _slug(self.dataset_name())

    def model_name_is_derived(self) -> bool:
        return self.resolved_model_name() == MODEL_NAME_PREFIX + _slug(self.dataset_name())

    def resolved_ray_address(self) -> str | None:
        return _single_value("ray_address", {"pipeline.ray_address": self.ray_address,
                                             "train.ray_address": self.train.get("ray_address")})

    def dataset_name(self) -> str:
        """The dataset's short name: the last part of `dataset_uri`, else of the source ('digits')."""
        if self.dataset_uri:
            return Path(self.dataset_uri.rstrip("/")).name or "images"
        return "digits" if self.source == "digits" else Path(self.source).stem or "images"

    def resolved_dataset_uri(self) -> str:
        return self.dataset_uri or str(self.work_path() / "datasets" / self.dataset_name())

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
        """Serve the registered model this pipeline registers, from the same tracking store. With a
        cluster's dashboard URL as the Ray address and no `serving.targets`, the apps to switch are
        those of that cluster."""
        from diffusion_core.adapters.ray_cluster import job_submission_url  # imports Ray

        update: dict[str, Any] = {"model_name": self.resolved_model_name(),
                                  "tracking_uri": self.resolved_tracking_uri()}
        dashboard_url = job_submission_url(self.resolved_ray_address())
        if dashboard_url is not None and not self.serving.targets:
            update["targets"] = [RayTarget(dashboard_url=dashboard_url)]
        return self.serving.model_copy(update=update)

    def trains_locally(self) -> bool:
        """Whether training runs on this machine's own Ray (no Ray address here or in RAY_ADDRESS)."""
        from diffusion_core.adapters.ray_cluster import cluster_address  # imports Ray

        return cluster_address(self.resolved_ray_address()) is None

    def train_config(self, dataset: DatasetManifest, dataset_uri: str, run_name: str,
                     warm_start: str | None) -> TrainConfig:
        """TrainConfig for `dataset`: checkpoints under the work dir, the pipeline's MLflow store and
        Ray address, the UNet, batch and worker CPUs of `train_defaults_for` unless `train` sets
        them."""
        fields: dict[str, Any] = {
            "storage_path": str(self.work_path() / "ray_results"),
            **train_defaults_for(dataset, self.train, local=self.trains_locally()),
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
                         overrides: Mapping[str, Any] | None = None,
                         environ: Mapping[str, str] | None = None) -> PipelineConfig:
    """PipelineConfig the way every command builds it: the config file (section `pipeline` plus the
    stage sections it embeds; `path`, else the file named by DIFFUSION_PIPELINE_CONFIG), then the
    environment, then `overrides` (dotted keys; None values ignored)."""
    path = path or os.environ.get(CONFIG_ENV) or None
    return build_config(PipelineConfig, pipeline_file_data(path), "pipeline", overrides, environ)


def pipeline_file_data(path: str | Path | None) -> dict[str, Any]:
    """The config file folded into PipelineConfig's fields: the stage sections become the embedded
    fields, and a shared setting set in any section becomes the one pipeline-level value (sections
    that disagree are an error), which the environment and flags then override."""
    sections = read_config_file(path)
    data: dict[str, Any] = dict(sections.get("pipeline") or {})
    stages = {section: dict(sections.get(section) or {}) for section in _EMBEDDED_SECTIONS}
    prepare = stages["prepare"]  # the pipeline owns where data comes from and goes
    if "source" in prepare:
        data.setdefault("source", prepare.pop("source"))
    if "output" in prepare:
        data.setdefault("dataset_uri", prepare.pop("output"))
    stages["train"].pop("dataset", None)  # the `train` command's input; the pipeline prepares its own
    for setting, holders in SHARED_SETTINGS.items():
        value = _single_value(setting, {f"pipeline.{setting}": data.get(setting),
                                        **{f"{s}.{setting}": stages[s].pop(setting, None) for s in holders}})
        if value is not None:
            data[setting] = value
    for section, field in _EMBEDDED_SECTIONS.items():
        if stages[section]:
            data[field] = {**stages[section], **(data.get(field) or {})}
    return data


def train_defaults_for(dataset: DatasetManifest, given: Mapping[str, Any],
                       local: bool = False) -> dict[str, Any]:
    """TrainConfig fields for `dataset`: `given`, over the UNet of `unet_fields_for`, a global
    batch of GPU_BATCH_SIZE on GPU workers and of CPU_BATCH_SIZE for images larger than the digits
    on CPU workers, and, for CPU workers on this machine's own Ray (`local`), its cores shared
    among the workers (`local_worker_cpus`: each worker runs torch with that many threads). On a
    cluster a CPU worker keeps TrainConfig's one CPU, as Ray's own default; the digits on CPU keep
    TrainConfig's recipe."""
    use_gpu = bool(given.get("use_gpu", False))
    derived: dict[str, Any] = {}
    if use_gpu:
        derived["batch_size"] = GPU_BATCH_SIZE
    elif dataset.image_size > DIGITS_SIZE:
        derived["batch_size"] = CPU_BATCH_SIZE
    if local and not use_gpu:
        from diffusion_core.adapters.ray_cluster import local_worker_cpus  # imports Ray

        derived["cpus_per_worker"] = local_worker_cpus(int(given.get("num_workers", 1)))
    return {**derived, **given, "unet": unet_fields_for(dataset, given.get("unet") or {}, use_gpu)}


def unet_fields_for(dataset: DatasetManifest, given: Mapping[str, Any],
                    use_gpu: bool = False) -> dict[str, Any]:
    """UNet settings for `dataset`, the one place a UNet is derived from data: the image size,
    channels and classes come from its manifest, the width and depth from `_unet_shape_for`, and
    `given` overrides any of them. So `run --source my_images --size 32` needs no UNet config."""
    num_classes = len(dataset.label_names) if dataset.label_names else None
    derived = {"image_size": dataset.image_size, "in_channels": dataset.channels, "num_classes": num_classes}
    return {**_unet_shape_for(dataset.image_size, num_classes, use_gpu), **derived, **dict(given)}


def _unet_shape_for(size: int, num_classes: int | None, use_gpu: bool) -> dict[str, Any]:
    """Width, depth and attention of the UNet for `size`-pixel images.

    Up to DIGITS_SIZE: UNetConfig.digits_default. Larger: levels halve the side down to 4 pixels (at
    most four levels, channel_mult 1, 2, 2, 2). On CPU the net is narrow and shallow (32 base
    channels, one residual block per level, attention only at the 4-pixel level and in the middle):
    at 32x32 RGB it trains at about the digits' images/s, where UNetConfig's defaults are some eight
    times slower. On GPU: 64 base channels, two blocks, attention at every side of 16 or less.
    """
    if size <= DIGITS_SIZE:
        return UNetConfig.digits_default(num_classes).model_dump()
    levels = min(4, int(math.log2(size / 4)) + 1)
    while levels > 1 and size % 2 ** (levels - 1):
        levels -= 1
    sides = [size // 2**level for level in range(levels)]
    attention = (sides[-1],) if not use_gpu else tuple(side for side in sides[1:] if side <= 16)
    return {"base_channels": 64 if use_gpu else 32, "channel_mult": (1, 2, 2, 2)[:levels],
            "num_res_blocks": 2 if use_gpu else 1, "attention_resolutions": attention or (sides[-1],)}


def _slug(name: str) -> str:
    """`name` with characters other than letters, digits, `_`, `.` and `-` replaced by `-`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "images"


def training_key(dataset_fingerprint: str, train: TrainConfig) -> str:
    """Identity of what a training run learns: the data's fingerprint plus the config's recipe
    (TrainConfig.recipe; placement and tracking are not part of it). Equal keys mean retraining
    would redo work."""
    learned = train.recipe.model_dump(mode="json")
    blob = json.dumps({"dataset": dataset_fingerprint, "train": learned}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
