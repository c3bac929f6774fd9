"""The retraining pipeline: prepare -> train -> evaluate and register -> deploy.

    prepare_dataset (reuses the dataset when its manifest matches the source and parameters)
      -> train with Ray Train (skipped when the data and training config are those of a registered
         version, unless forced; optional warm start from the champion)
      -> evaluate_and_register (MLflow registry: candidate, promotion gate, champion)
      -> deploy (switch a running Ray Serve app to the new champion, or start one)

Each stage is a Prefect task or subflow; a failure names its stage, and everything an earlier stage
wrote (the dataset, checkpoints, MLflow runs and versions) stays usable for the next attempt. Each
stage announces itself (`[2/4] train: ...`) and logs its progress through the project's loggers,
which reach the terminal and, for the duration of the flow run, the Prefect UI
(`flows.prefect_logs`). The flow run ends with two artifacts: a summary, and links to the MLflow
run and model version. The configuration (`PipelineConfig`) lives in `flows.pipeline_config`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from diffusion_core.adapters.mlflow_registry import (
    CHAMPION,
    DataSpecKey,
    ModelVersionInfo,
    RegistryConfig,
    RegistryError,
    list_versions,
    numeric_tags,
    require_same_lineage,
    resolve_version,
)
from diffusion_core.adapters.ray_cluster import ray_is_reachable
from diffusion_core.adapters.ray_train import TrainResult
from diffusion_core.data.prepare import PrepareResult
from diffusion_core.errors import DiffusionPipelineError
from diffusion_core.metrics import EvalResult
from diffusion_core.redact import redact_uri
from flows.checkpoints import champion_copy, training_checkpoint_copy
from flows.deploy import deploy
from flows.evaluate import evaluate_and_register
from flows.mlflow_ui import mlflow_ui
from flows.pipeline_config import PipelineConfig, load_pipeline_config, training_key
from flows.prefect_logs import project_logs_to_prefect
from flows.prepare import prepare_dataset
from flows.train import prefect_tags, train_task

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRAIN_KEY_TAG = "pipeline.train_key"


class PipelineStageError(DiffusionPipelineError):
    """A stage of `retrain` failed; `stage` names it. Earlier stages' outputs are kept."""

    def __init__(self, stage: str, err: BaseException) -> None:
        hint = getattr(err, "hint", None) or "earlier stages' results are kept: fix the cause and rerun"
        super().__init__(f"stage {stage!r} failed: {type(err).__name__}: {err}", hint=hint)
        self.stage = stage


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
    is_champion: bool
    decision: str
    metrics: dict[str, float]
    resumed_at_step: int | None = None
    served_url: str | None = None


STAGES = ("prepare", "train", "evaluate", "deploy")


def announce(stage: str, what: str) -> None:
    """`[2/4] train: <what>`: which stage the pipeline is in, in the terminal and the Prefect UI."""
    logger.info("[%d/%d] %s: %s", STAGES.index(stage) + 1, len(STAGES), stage, what)


@flow(name="retrain", log_prints=False)
def retrain(config: PipelineConfig | None = None) -> PipelineResult:
    """prepare -> train -> evaluate_and_register -> deploy; see the module docstring.

    With no `config` (a scheduled run whose deployment sets no parameters), the configuration is
    read like the CLI reads it: the file named by DIFFUSION_PIPELINE_CONFIG, then the environment.
    """
    with project_logs_to_prefect():
        config = config or load_pipeline_config()
        result = _retrain(config)
        _publish_summary(result, config.resolved_tracking_uri())
        return result


def _retrain(config: PipelineConfig) -> PipelineResult:
    registry = config.registry_config()
    announce("prepare", f"{redact_uri(config.source)} -> {redact_uri(config.resolved_dataset_uri())}")
    dataset: PrepareResult = run_stage("prepare", prepare_dataset, config.prepare_config())
    champion = run_stage("registry", current_champion, registry)
    key = training_key(dataset.manifest.fingerprint,
                       config.train_config(dataset.manifest, dataset.uri, "key", None))
    previous = (champion if champion is not None and champion.tags.get(TRAIN_KEY_TAG) == key
                else run_stage("registry", registered_with_key, registry, key))
    if previous is not None and not config.force_train:
        announce("train", f"skipped: data {dataset.manifest.fingerprint[:12]} and training config match "
                 f"{previous.name} version {previous.version}"
                 f"{' (the champion)' if previous == champion else ''}; --force-train retrains")
        announce("evaluate", f"skipped: version {previous.version} was evaluated when it was registered")
        result = _unchanged_result(dataset, previous, is_champion=previous == champion)
    else:
        result = _train_and_register(config, registry, dataset, champion, key)

    if _should_deploy(config, result):
        result = _deploy(config, result)
    else:
        announce("deploy", "skipped: serving not requested and no Serve app to switch")
    return result


def _train_and_register(config: PipelineConfig, registry: RegistryConfig, dataset: PrepareResult,
                        champion: ModelVersionInfo | None, key: str) -> PipelineResult:
    # Registration refuses a model of other data than the champion's: refuse it before training.
    run_stage("registry", require_same_lineage, registry.model_name,
              DataSpecKey.of_manifest(dataset.manifest), tracking_uri=registry.tracking_uri,
              allow_new_data_spec=registry.allow_new_data_spec, dataset_uri=dataset.uri)
    warm = (run_stage("warm-start", champion_checkpoint, champion, registry, config.work_path())
            if config.warm_start and champion is not None else None)
    run_name = _run_name(key, config.force_train)
    train_config = config.train_config(dataset.manifest, dataset.uri, run_name, warm)
    announce("train", f"run {run_name} (MLflow experiment {train_config.experiment_name!r})")
    trained: TrainResult = run_stage("train", train_task, train_config)
    announce("evaluate", f"{config.evaluate.num_samples} samples, then registration as "
             f"{registry.model_name} and the promotion gate")
    checkpoint = run_stage("evaluate", training_checkpoint_copy, trained.checkpoint_path, config.work_path())
    outcome = run_stage(
        "evaluate", evaluate_and_register, checkpoint, dataset.uri,
        eval_config=config.evaluate, registry_config=registry, training_run_id=trained.run_id,
        extra_tags={TRAIN_KEY_TAG: key, **prefect_tags()},
    )
    decision = outcome.decision
    promoted = bool(decision and decision.promoted)
    start_step = trained.metrics.get("start_step")
    return PipelineResult(
        dataset_uri=dataset.uri, dataset_fingerprint=dataset.manifest.fingerprint,
        dataset_reused=dataset.reused, trained=True, training_run_id=trained.run_id,
        checkpoint_path=trained.checkpoint_path, model_name=outcome.version.name,
        version=outcome.version.version, became_champion=promoted, is_champion=promoted,
        decision=decision.action if decision else "not gated",
        metrics=outcome.evaluation.as_metrics(),
        resumed_at_step=int(start_step) if start_step else None,
    )


def _should_deploy(config: PipelineConfig, result: PipelineResult) -> bool:
    """Serving requested, or a new champion that a Serve app on a reachable Ray should switch to.
    Without a Ray to look at there is no app to switch, so no local Ray is started for nothing."""
    if config.serve:
        return True
    return result.became_champion and ray_is_reachable(config.resolved_ray_address())


def _deploy(config: PipelineConfig, result: PipelineResult) -> PipelineResult:
    settings = config.serve_settings()
    announce("deploy", f"the champion of {result.model_name} behind Ray Serve at {settings.url}")
    deployed = run_stage("deploy", deploy, result.model_name, CHAMPION, settings=settings,
                         start_if_not_running=config.serve, ray_address=config.resolved_ray_address())
    if deployed.action == "not_running":
        return result
    return result.model_copy(update={"served_url": deployed.url})


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
    """The champion's checkpoint under work_dir, downloaded once. On a multi-node cluster work_dir
    must be shared storage: the workers read this path."""
    dst = work_dir / "warm_start" / f"{champion.name}-v{champion.version}"
    return str(champion_copy(champion.model_uri, registry.tracking_uri, dst))


def _run_name(key: str, force: bool) -> str:
    """The same inputs reuse the run name, so a crashed pipeline resumes its Ray Train run; a
    forced retrain starts a fresh run."""
    if not force:
        return f"retrain-{key[:12]}"
    return f"retrain-{key[:12]}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"


def _unchanged_result(dataset: PrepareResult, version: ModelVersionInfo, is_champion: bool) -> PipelineResult:
    # The version's recorded evaluation: version tags named like EvalResult.as_metrics() keys.
    names = EvalResult.metric_names()
    metrics = {k: v for k, v in numeric_tags(version.tags).items() if k in names}
    return PipelineResult(
        dataset_uri=dataset.uri, dataset_fingerprint=dataset.manifest.fingerprint,
        dataset_reused=dataset.reused, trained=False, training_run_id=None, checkpoint_path=None,
        model_name=version.name, version=version.version, became_champion=False,
        is_champion=is_champion,
        decision="unchanged" if is_champion else "unchanged (registered before, not champion)",
        metrics=metrics,
    )


def status_line(result: PipelineResult) -> str:
    """What happened to the version, in words (the run summary and the Prefect artifact)."""
    if result.became_champion:
        return "became champion"
    if result.is_champion:
        return "already the champion (data and training config unchanged)"
    if not result.trained:
        return "registered before and not champion (data and training config unchanged)"
    return f"not promoted ({result.decision})"


def _publish_summary(result: PipelineResult, tracking_uri: str) -> None:
    """The run's outcome as Prefect artifacts: a summary table and links to the MLflow run and model
    version. URIs are redacted (they can carry credentials)."""
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(result.metrics.items()))
    run_line = (f"- MLflow training run: `{result.training_run_id}` "
                f"(tracking URI `{redact_uri(tracking_uri)}`)" if result.training_run_id
                else "- training skipped: data and config match a registered version")
    create_markdown_artifact(
        f"## Retrain result\n\n- dataset `{result.dataset_fingerprint[:12]}` at "
        f"`{redact_uri(result.dataset_uri)}`\n"
        f"{run_line}\n- model `models:/{result.model_name}/{result.version}` {status_line(result)}\n"
        + (f"- served at {result.served_url}\n" if result.served_url else "")
        + f"\n| metric | value |\n|---|---|\n{rows}\n",
        key="retrain-result", description="Retraining pipeline outcome with MLflow links",
    )
    _publish_mlflow_links(result, tracking_uri)


def _publish_mlflow_links(result: PipelineResult, tracking_uri: str) -> None:
    """Link artifacts to the model version and the training run in the MLflow UI: the tracking
    server's own UI, or for a local store the UI that `mlflow ui` (the command in the description)
    serves."""
    ui = mlflow_ui(tracking_uri)
    where = f"; start it with `{ui.command}`" if ui.command else ""
    create_link_artifact(
        ui.version_url(result.model_name, result.version),
        link_text=f"{result.model_name} version {result.version}", key="mlflow-model-version",
        description=f"The model version in the MLflow UI at {ui.url}{where}",
    )
    if result.training_run_id is None:
        return
    create_link_artifact(
        ui.run_url(result.training_run_id), link_text=f"training run {result.training_run_id}",
        key="mlflow-training-run",
        description=f"The training run (metrics, sample grids) in the MLflow UI at {ui.url}{where}",
    )
