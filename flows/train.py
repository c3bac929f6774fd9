"""Prefect task and flow `train`: one Ray Train run, tracked in MLflow, linked to the flow run.

`train_interruptibly` is how the CLI and the flows train. Where the Ray address is a cluster's
dashboard URL (`ray_cluster.job_submission_url`), the run goes to that cluster as a Ray Job
(`flows.train_job`), whose log lines are logged here as they arrive; otherwise it runs in this
process (`flows.train_local.train_in_process`: an estimate of the time, then Ray Train with its
progress logged). The Ray Job runs the same `train_in_process` on the cluster. Either way the
MLflow run is tagged with the Prefect flow run id so that a run in the MLflow UI leads back to the
pipeline run that produced it.
"""

from __future__ import annotations

import logging

from prefect import flow, task
from prefect.runtime import flow_run

from diffusion_core.adapters.ray_cluster import job_submission_url
from diffusion_core.adapters.ray_train import TrainResult, default_run_name
from diffusion_core.training import TrainConfig
from flows.prefect_logs import project_logs_to_prefect
from flows.train_job import train_as_ray_job
from flows.train_local import train_in_process

logger = logging.getLogger(__name__)

PREFECT_FLOW_RUN_TAG = "prefect.flow_run_id"
def prefect_tags() -> dict[str, str]:
    """{"prefect.flow_run_id": id} inside a flow run, {} outside one."""
    run_id = flow_run.id
    return {PREFECT_FLOW_RUN_TAG: str(run_id)} if run_id else {}


def train_interruptibly(config: TrainConfig, tags: dict[str, str] | None = None) -> TrainResult:
    """Train `config` (a run name is chosen when it has none): as a Ray Job when its Ray address is
    a dashboard URL, else in this process. Ctrl-C, or the cancellation of the Prefect flow run,
    stops the run either way (`ray_jobs` stops the job); a rerun resumes it from its checkpoint."""
    run_name = config.run_name or default_run_name()
    config = config.model_copy(update={"run_name": run_name})
    dashboard_url = job_submission_url(config.ray_address)
    if dashboard_url is not None:
        return train_as_ray_job(config, dashboard_url, tags)
    return train_in_process(config, tags)


@task(name="train-model")
def train_task(config: TrainConfig) -> TrainResult:
    """Train with Ray Train (as a Ray Job on a dashboard URL); returns the final checkpoint path,
    MLflow run id and last metrics."""
    return train_interruptibly(config, tags=prefect_tags())


@flow(name="train")
def train(config: TrainConfig) -> TrainResult:
    """Flow wrapper around `train_task`, for running training on its own."""
    with project_logs_to_prefect():
        result = train_task(config)
    logger.info("trained %s -> %s (MLflow run %s)", config.dataset, result.checkpoint_path, result.run_id)
    return result
