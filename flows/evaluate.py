"""Prefect flow `evaluate_and_register`: checkpoint -> evaluation -> registered version -> gate.

    load the dataset's splits  ->  feature classifier (trained once per fingerprint, cached)
    ->  evaluate the checkpoint (the default request, the headline; the null label and guidance
    beside it; memorisation; the feature classifier's held-out check)  ->  log + register it
    (alias `candidate`, eval numbers as version tags and as metrics of the logged model on the
    validation split, classifier as an artifact, a grid of the headline's first samples as the
    run's `evaluation` image)  ->  promotion gate against `champion` (the champion's headline is
    re-evaluated with the same data, sample count and seed unless its recorded number matches)

`evaluate_and_register(checkpoint_dir, dataset_uri, eval_config, registry_config)` returns the
evaluation, the registered version and the gate's decision (`EvaluateOutcome`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from diffusion_core.adapters.mlflow_registry import (
    EVAL_KEY_TAG,
    GUIDED_SCALE_TAG,
    EvaluationDataset,
    ModelVersionInfo,
    PromotionDecision,
    RegistryConfig,
    log_and_register,
    log_directory,
    promote_if_better,
)
from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.metrics import (
    EvalConfig,
    EvalResult,
    ReferenceData,
    eval_seeds,
    evaluate_model,
    feature_extractor_for,
    generate_eval_samples,
    reference_from_dataset,
)
from diffusion_core.metrics_features import FeatureExtractor
from diffusion_core.training import read_training_step
from flows.checkpoints import registry_checkpoint
from flows.prefect_logs import project_logs_to_prefect

logger = logging.getLogger(__name__)

EVALUATION_IMAGE_KEY = "evaluation"  # the MLflow image series of evaluation grids
EVALUATION_GRID_ROWS = 4             # images per label (or 8-wide rows) in the evaluation grid
EVALUATION_GRID_MAX = 64


class EvaluateOutcome(BaseModel):
    """What the pipeline gets back: the evaluation, the registered version and the gate decision."""

    model_config = ConfigDict(frozen=True)

    evaluation: EvalResult
    version: ModelVersionInfo
    decision: PromotionDecision | None


def eval_tags(result: EvalResult, config: EvalConfig) -> dict[str, str]:
    """Version tags that make an FD reproducible and comparable (the gate reads `eval_key`) and say
    what was measured (the headline is the default request: no labels)."""
    tags = {
        EVAL_KEY_TAG: result.eval_key, "eval_request": "default (no labels)",
        "eval_num_samples": str(config.num_samples), "eval_sampler": config.sampler,
        "eval_steps": str(config.steps), "eval_seed": str(config.seed),
        "eval_guidance_scale": repr(config.guidance_scale), "eval_feature_kind": result.feature_kind,
        "eval_class_histogram": json.dumps([round(p, 4) for p in result.class_histogram]),
    }
    if result.guided_scale is not None:
        tags[GUIDED_SCALE_TAG] = f"{result.guided_scale:g}"
    return tags


# Tensors and modules flow between these tasks in memory: NO_CACHE keeps Prefect from hashing them.
@task(name="load-reference-data", cache_policy=NO_CACHE)
def load_reference(dataset_uri: str) -> ReferenceData:
    return reference_from_dataset(dataset_uri)


@task(name="feature-classifier", cache_policy=NO_CACHE)
def feature_extractor_task(reference: ReferenceData, config: EvalConfig) -> FeatureExtractor:
    return feature_extractor_for(reference, config)


@task(name="evaluate-checkpoint", cache_policy=NO_CACHE)
def evaluate_checkpoint(checkpoint_dir: Path, reference: ReferenceData, extractor: FeatureExtractor,
                        config: EvalConfig) -> EvalResult:
    loaded = load_checkpoint(checkpoint_dir, use_ema=config.use_ema, device=config.device)
    return evaluate_model(loaded, reference, config, extractor)


@task(name="register-version", cache_policy=NO_CACHE)
def register_version(checkpoint_dir: Path, evaluation: EvalResult, eval_config: EvalConfig,
                     registry: RegistryConfig, extractor: FeatureExtractor,
                     training_run_id: str | None, extra_tags: dict[str, str] | None = None,
                     evaluation_dataset: EvaluationDataset | None = None) -> ModelVersionInfo:
    version = log_and_register(
        checkpoint_dir, model_name=registry.model_name, tracking_uri=registry.tracking_uri,
        run_id=training_run_id, tags={**eval_tags(evaluation, eval_config), **(extra_tags or {})},
        metrics=evaluation.as_metrics(), evaluation_dataset=evaluation_dataset,
        allow_new_data_spec=registry.allow_new_data_spec,
        experiment_name=registry.experiment_name, device=registry.device, lock_dir=registry.lock_dir,
        lock_timeout_s=registry.lock_timeout_s)
    if extractor.directory is not None and version.run_id:
        log_directory(version.run_id, extractor.directory, "feature_classifier", registry.tracking_uri)
    return version


@task(name="evaluation-grid", cache_policy=NO_CACHE)
def log_evaluation_grid(checkpoint_dir: Path, config: EvalConfig, version: ModelVersionInfo,
                        registry: RegistryConfig) -> None:
    """The headline's first images (the default request), one column per drawn label, as the
    `evaluation` image of the version's run at the checkpoint's training step. Sample i of an
    evaluation depends only on seed config.seed + i (its label is drawn from that seed), so
    generating the first few again gives exactly those images. A picture is not worth failing a
    registration for: errors become a warning."""
    from diffusion_core.adapters.mlflow_tracking import log_sample_grid

    if not version.run_id:
        return
    loaded = load_checkpoint(checkpoint_dir, use_ema=config.use_ema, device=config.device)
    count = min(config.num_samples, EVALUATION_GRID_ROWS * (loaded.spec.unet.num_classes or 8),
                EVALUATION_GRID_MAX)
    first = config.model_copy(update={"num_samples": count})
    labels = loaded.default_labels(eval_seeds(first))
    images = generate_eval_samples(loaded, first, "evaluation grid", config.guidance_scale)
    log_sample_grid(registry.tracking_uri, version.run_id, images, labels, loaded.spec.data.label_names,
                    key=EVALUATION_IMAGE_KEY, step=_training_step(checkpoint_dir))


def _training_step(checkpoint_dir: Path) -> int:
    """The step a training checkpoint was written at; 0 for a checkpoint without training state."""
    try:
        return read_training_step(checkpoint_dir)
    except (OSError, ValueError, KeyError):
        return 0


def champion_reevaluator(reference: ReferenceData, extractor: FeatureExtractor, config: EvalConfig,
                         registry: RegistryConfig) -> Callable[[str], float]:
    """reevaluate(model_uri) -> fd: download a registered version and evaluate its headline like the
    candidate's (the side passes are not needed for the comparison)."""
    def reevaluate(model_uri: str) -> float:
        with registry_checkpoint(model_uri, registry.tracking_uri) as directory:
            return evaluate_checkpoint.fn(directory, reference, extractor, config.headline_only()).fd
    return reevaluate


@task(name="promotion-gate", cache_policy=NO_CACHE)
def gate(version: ModelVersionInfo, evaluation: EvalResult, reference: ReferenceData,
         extractor: FeatureExtractor, config: EvalConfig, registry: RegistryConfig,
         force: bool) -> PromotionDecision:
    return promote_if_better(
        version.name, version.version, policy=registry.gate_policy(), candidate_fd=evaluation.fd,
        eval_key=evaluation.eval_key, force=force, tracking_uri=registry.tracking_uri,
        lock_dir=registry.lock_dir, lock_timeout_s=registry.lock_timeout_s,
        reevaluate_champion=champion_reevaluator(reference, extractor, config, registry))


@flow(name="evaluate-and-register")
def evaluate_and_register(
    checkpoint_dir: Path,
    dataset_uri: str,
    eval_config: EvalConfig | None = None,
    registry_config: RegistryConfig | None = None,
    training_run_id: str | None = None,
    run_gate: bool = True,
    force: bool = False,
    extra_tags: dict[str, str] | None = None,
) -> EvaluateOutcome:
    """Evaluate `checkpoint_dir` on `dataset_uri`, register it, and (run_gate) try to promote it.

    extra_tags are added to the version (the pipeline adds its training key and flow run id).
    """
    with project_logs_to_prefect():
        return _evaluate_and_register(Path(checkpoint_dir), dataset_uri, eval_config or EvalConfig(),
                                      registry_config or RegistryConfig(), training_run_id, run_gate,
                                      force, extra_tags)


def _evaluate_and_register(checkpoint_dir: Path, dataset_uri: str, eval_config: EvalConfig,
                           registry_config: RegistryConfig, training_run_id: str | None, run_gate: bool,
                           force: bool, extra_tags: dict[str, str] | None) -> EvaluateOutcome:
    reference = load_reference(dataset_uri)
    extractor = feature_extractor_task(reference, eval_config)
    evaluation = evaluate_checkpoint(checkpoint_dir, reference, extractor, eval_config)
    version = register_version(checkpoint_dir, evaluation, eval_config, registry_config, extractor,
                               training_run_id, extra_tags,
                               EvaluationDataset.split_of(dataset_uri, reference.fingerprint, "val"))
    log_evaluation_grid(checkpoint_dir, eval_config, version, registry_config)
    decision = None
    if run_gate:
        decision = gate(version, evaluation, reference, extractor, eval_config, registry_config, force)
        logger.info("version %s: %s (%s)", version.version, decision.action, decision.reason)
    return EvaluateOutcome(evaluation=evaluation, version=version, decision=decision)
