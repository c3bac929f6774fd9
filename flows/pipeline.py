"""The retraining pipeline: prepare -> train -> evaluate and register -> deploy.

    prepare_dataset (cached on the source's fingerprint and parameters)
      -> train with Ray Train (skipped when the data and training config are those of the current
         champion, unless forced; optional warm start from the champion)
      -> evaluate_and_register (MLflow registry: candidate, promotion gate, champion)
      -> deploy (switch a running Ray Serve app to the new champion, or start one)

Each stage is a Prefect task or subflow; a failure names its stage, and everything an earlier stage
wrote (the dataset, checkpoints, MLflow runs and versions) stays usable for the next attempt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from diffusion_core.adapters.mlflow_registry import (
    CHAMPION,
    ModelVersionInfo,
    RegistryConfig,
    RegistryError,
    download_checkpoint,
    list_versions,
    numeric_tags,
    resolve_version,
)
from diffusion_core.adapters.ray_train import TrainResult
from diffusion_core.data.config import PrepareConfig, PrepareParameters
from diffusion_core.data.manifest import DatasetManifest
from diffusion_core.data.prepare import PrepareResult
from diffusion_core.errors import ConfigError, DiffusionPipelineError, config_error_from
from diffusion_core.metrics import EvalConfig, EvalResult
from diffusion_core.training import TrainConfig
from diffusion_core.unet import UNetConfig
from flows.config import CONFIG_ENV, build_config, read_config_file
from flows.deploy import DeployResult, deploy
from flows.evaluate import EvaluateOutcome, evaluate_and_register
from flows.prepare import prepare_dataset
from flows.train import prefect_tags, train_task
from serving.config import ServeSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRAIN_KEY_TAG = "pipeline.train_key"
# TrainConfig fields that say where or how a run executes, not what it learns: they do not change
# the training key, so moving the same job to a cluster does not force a retrain.
_PLACEMENT_FIELDS = frozenset({
    "dataset", "run_name", "storage_path", "experiment_name", "tracking_uri", "artifact_location",
    "ray_address", "num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker",
    "placement_strategy", "max_failures", "num_to_keep", "checkpoint_every", "log_every",
    "sample_every", "num_sample_images", "warm_start", "fault_injection", "compile",
})


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
        listed = ", ".join(f"{where}={value!r}" for where, value in given.items())
        raise ConfigError(f"{name}: set to different values ({listed}); accepted: one value, set once")
    return next(iter(given.values()), None)


class PipelineStageError(DiffusionPipelineError):
    """A stage of `retrain` failed; `stage` names it. Earlier stages' outputs are kept."""

    def __init__(self, stage: str, err: BaseException) -> None:
        hint = getattr(err, "hint", None) or "earlier stages' results are kept: fix the cause and rerun"
        super().__init__(f"stage {stage!r} failed: {type(err).__name__}: {err}", hint=hint)
        self.stage = stage


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


class PipelineResult(BaseModel):
    """What one `retrain` produced."""

    model_config = ConfigDict(frozen=True)

    dataset_uri: str
    dataset_fingerprint: str
    dataset_reused: bool
    trained: bool
    training_run_id: str | None
    checkpoint_path: str | None
    model_name: str
    version: str
    became_champion: bool
    decision: str
    metrics: dict[str, float]
    served_url: str | None = None


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
    """Identity of what a training run learns: the data's fingerprint plus every config field that
    changes the weights (placement fields excluded). Equal keys mean retraining would redo work."""
    learned = train.model_dump(mode="json", exclude=set(_PLACEMENT_FIELDS))
    blob = json.dumps({"dataset": dataset_fingerprint, "train": learned}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_stage(stage: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one stage; any failure becomes a PipelineStageError naming it."""
    try:
        return fn(*args, **kwargs)
    except PipelineStageError:
        raise
    except Exception as err:
        raise PipelineStageError(stage, err) from err


@task(name="current-champion", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def current_champion(registry: RegistryConfig) -> ModelVersionInfo | None:
    try:
        return resolve_version(registry.model_name, CHAMPION, registry.tracking_uri)
    except RegistryError:
        return None


@task(name="registered-with-key", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def registered_with_key(registry: RegistryConfig, key: str) -> ModelVersionInfo | None:
    """The newest version trained from the same data and config (any alias), or None. A rejected or
    rolled-back version counts too, so the pipeline does not retrain and re-promote it."""
    versions = list_versions(registry.model_name, registry.tracking_uri)
    matching = [v for v in versions if v.tags.get(TRAIN_KEY_TAG) == key]
    return max(matching, key=lambda v: int(v.version), default=None)


@task(name="warm-start-checkpoint", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def champion_checkpoint(champion: ModelVersionInfo, registry: RegistryConfig, work_dir: Path) -> str:
    """The champion's checkpoint under work_dir (downloaded once; a partial download never counts).
    On a multi-node cluster work_dir must be shared storage: the workers read this path."""
    dst = work_dir / "warm_start" / f"{champion.name}-v{champion.version}"
    if not (dst / "spec.json").is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".download-") as tmp:
            download_checkpoint(champion.model_uri, Path(tmp) / "ckpt", registry.tracking_uri)
            os.replace(Path(tmp) / "ckpt", dst)
    return str(dst)


def local_checkpoint(checkpoint: str, work_dir: Path) -> Path:
    """A local directory holding `checkpoint`, copied from remote storage (s3://, gs://, ...)
    into work_dir when Ray Train wrote it there; evaluation and registration read local files."""
    if "://" not in checkpoint or checkpoint.startswith("file://"):
        return Path(checkpoint.removeprefix("file://"))
    from pyarrow import fs

    dst = work_dir / "checkpoints" / Path(checkpoint.rstrip("/")).name
    if not (dst / "spec.json").is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".download-") as tmp:
            source, path = fs.FileSystem.from_uri(checkpoint)
            fs.copy_files(path, str(Path(tmp) / "ckpt"), source_filesystem=source,
                          destination_filesystem=fs.LocalFileSystem())
            os.replace(Path(tmp) / "ckpt", dst)
    return dst


def _run_name(key: str, force: bool) -> str:
    """The same inputs reuse the run name, so a crashed pipeline resumes its Ray Train run; a
    forced retrain starts a fresh run."""
    if not force:
        return f"retrain-{key[:12]}"
    from datetime import UTC, datetime

    return f"retrain-{key[:12]}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"


def _publish_summary(result: PipelineResult, tracking_uri: str) -> None:
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(result.metrics.items()))
    status = "became **champion**" if result.became_champion else f"not promoted ({result.decision})"
    run_line = (f"- MLflow training run: `{result.training_run_id}` (tracking URI `{tracking_uri}`)"
                if result.training_run_id else "- training skipped: data and config match the champion")
    create_markdown_artifact(
        f"## Retrain result\n\n- dataset `{result.dataset_fingerprint[:12]}` at `{result.dataset_uri}`\n"
        f"{run_line}\n- model `models:/{result.model_name}/{result.version}` {status}\n"
        + (f"- served at {result.served_url}\n" if result.served_url else "")
        + f"\n| metric | value |\n|---|---|\n{rows}\n",
        key="retrain-result", description="Retraining pipeline outcome with MLflow links",
    )


@flow(name="retrain", log_prints=False)
def retrain(config: PipelineConfig | None = None) -> PipelineResult:
    """prepare -> train -> evaluate_and_register -> deploy; see the module docstring.

    With no `config` (a scheduled run whose deployment sets no parameters), the configuration is
    read like the CLI reads it: the file named by DIFFUSION_PIPELINE_CONFIG, then the environment.
    """
    config = config or load_pipeline_config()
    log = get_run_logger()
    registry = config.registry_config()

    dataset: PrepareResult = run_stage("prepare", prepare_dataset, config.prepare_config())
    fingerprint = dataset.manifest.fingerprint

    champion = run_stage("registry", current_champion, registry)
    key = training_key(fingerprint, config.train_config(dataset.manifest, dataset.uri, "key", None))
    previous = (champion if champion is not None and champion.tags.get(TRAIN_KEY_TAG) == key
                else run_stage("registry", registered_with_key, registry, key))
    if previous is not None and not config.force_train:
        log.info("data %s and training config match v%s%s: skipping training", fingerprint[:12],
                 previous.version, " (champion)" if previous == champion else "")
        result = _unchanged_result(dataset, previous, is_champion=previous == champion)
    else:
        warm = (run_stage("warm-start", champion_checkpoint, champion, registry, config.work_path())
                if config.warm_start and champion is not None else None)
        run_name = _run_name(key, config.force_train)
        train_cfg = config.train_config(dataset.manifest, dataset.uri, run_name, warm)
        trained: TrainResult = run_stage("train", train_task, train_cfg)
        checkpoint = run_stage("evaluate", local_checkpoint, trained.checkpoint_path, config.work_path())
        outcome: EvaluateOutcome = run_stage(
            "evaluate", evaluate_and_register, checkpoint, dataset.uri,
            eval_config=config.evaluate, registry_config=registry, training_run_id=trained.run_id,
            extra_tags={TRAIN_KEY_TAG: key, **prefect_tags()},
        )
        result = _trained_result(config, dataset, trained, outcome)

    if _should_deploy(config, result):
        deployed: DeployResult = run_stage(
            "deploy", deploy, result.model_name, "champion", settings=config.serve_settings(),
            start_if_not_running=config.serve, ray_address=config.resolved_ray_address())
        log.info("deploy: %s (%s v%s at %s)", deployed.action, deployed.model_name, deployed.version,
                 deployed.url)
        if deployed.action != "not_running":
            result = result.model_copy(update={"served_url": deployed.url})
    _publish_summary(result, config.resolved_tracking_uri())
    return result


def _unchanged_result(dataset: PrepareResult, version: ModelVersionInfo, is_champion: bool) -> PipelineResult:
    # The version's recorded evaluation: version tags named like EvalResult.as_metrics() keys.
    names = {f"eval_{field}" for field in EvalResult.model_fields}
    metrics = {k: v for k, v in numeric_tags(version.tags).items() if k in names}
    return PipelineResult(
        dataset_uri=dataset.uri, dataset_fingerprint=dataset.manifest.fingerprint,
        dataset_reused=dataset.reused, trained=False, training_run_id=None, checkpoint_path=None,
        model_name=version.name, version=version.version, became_champion=False,
        decision="unchanged" if is_champion else "unchanged (registered before, not champion)",
        metrics=metrics,
    )


def _trained_result(config: PipelineConfig, dataset: PrepareResult, trained: TrainResult,
                    outcome: EvaluateOutcome) -> PipelineResult:
    decision = outcome.decision
    return PipelineResult(
        dataset_uri=dataset.uri, dataset_fingerprint=dataset.manifest.fingerprint,
        dataset_reused=dataset.reused, trained=True, training_run_id=trained.run_id,
        checkpoint_path=trained.checkpoint_path, model_name=outcome.version.name,
        version=outcome.version.version, became_champion=bool(decision and decision.promoted),
        decision=decision.action if decision else "not gated",
        metrics=outcome.evaluation.as_metrics(),
    )


def _should_deploy(config: PipelineConfig, result: PipelineResult) -> bool:
    """Serving requested, or a new champion that a Serve app on a reachable Ray should switch to.
    Without a Ray to look at there is no app to switch, so no local Ray is started for nothing."""
    if config.serve:
        return True
    if not result.became_champion:
        return False
    import ray

    return ray.is_initialized() or bool(config.resolved_ray_address() or os.environ.get("RAY_ADDRESS"))
