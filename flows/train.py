"""Prefect task and flow `train`: one Ray Train run, tracked in MLflow, linked to the flow run.

The task calls `diffusion_core.adapters.ray_train.run_training` (TorchTrainer.fit() inside an
ordinary task) and tags the MLflow run with the Prefect flow run id so that a run in the MLflow UI
leads back to the pipeline run that produced it.
"""

from __future__ import annotations

import logging

from prefect import flow, task
from prefect.runtime import flow_run

from diffusion_core.adapters.ray_train import TrainResult, run_training
from diffusion_core.training import TrainConfig

logger = logging.getLogger(__name__)

PREFECT_FLOW_RUN_TAG = "prefect.flow_run_id"


def prefect_tags() -> dict[str, str]:
    """{"prefect.flow_run_id": id} inside a flow run, {} outside one."""
    run_id = flow_run.id
    return {PREFECT_FLOW_RUN_TAG: str(run_id)} if run_id else {}


@task(name="train-model")
def train_task(config: TrainConfig) -> TrainResult:
    """Train with Ray Train; returns the final checkpoint path, MLflow run id and last metrics."""
    return run_training(config, tags=prefect_tags())


@flow(name="train")
def train(config: TrainConfig) -> TrainResult:
    """Flow wrapper around `train_task`, for running training on its own."""
    result = train_task(config)
    logger.info("trained %s -> %s (MLflow run %s)", config.dataset, result.checkpoint_path, result.run_id)
    return result
