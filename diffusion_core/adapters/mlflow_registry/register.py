"""Registering a checkpoint: log it as a pyfunc, create a version, alias it `candidate`."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException

from diffusion_core.adapters.mlflow_registry.config import CANDIDATE, DEFAULT_LOCK_TIMEOUT_S
from diffusion_core.adapters.mlflow_registry.lock import registry_lock
from diffusion_core.adapters.mlflow_registry.packaging import current_git_commit, log_pyfunc
from diffusion_core.adapters.mlflow_registry.promotion import repair_pending_promotion
from diffusion_core.adapters.mlflow_registry.versions import ModelVersionInfo, version_info
from diffusion_core.adapters.mlflow_store import client_for, ensure_experiment, with_retries
from diffusion_core.checkpoint import ModelSpec, read_spec

logger = logging.getLogger(__name__)


def log_and_register(
    checkpoint_dir: str | Path,
    *,
    model_name: str,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    experiment_name: str = "diffusion-registry",
    device: str = "cpu",
    lock_dir: Path | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> ModelVersionInfo:
    """Log `checkpoint_dir` as a pyfunc, register it as a new version of `model_name`, alias it
    `candidate`.

    run_id: the training run to log into (its id becomes the `training_run_id` tag); None creates
    a run in `experiment_name`. metrics (e.g. EvalResult.as_metrics()) are logged to the run and
    copied to version tags; tags (e.g. eval settings, `eval_key`) are added to the version
    (overriding the defaults: dataset_fingerprint from spec.json, training_run_id, git_commit).
    """
    checkpoint_dir = Path(checkpoint_dir)
    spec = read_spec(checkpoint_dir)
    client = client_for(tracking_uri)
    own_run = run_id is None
    if own_run:
        experiment_id = with_retries(lambda: ensure_experiment(client, experiment_name), "experiment")
        run_id = client.create_run(experiment_id, run_name="register").info.run_id
    try:
        model_id = log_pyfunc(client, client.get_run(run_id).info.experiment_id, run_id, checkpoint_dir,
                              spec, device)
        _log_metrics(client, run_id, metrics or {})
    finally:
        if own_run:
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    # The version's source is the logged model's artifact location, not `models:/<model id>`: the
    # registry store would resolve that URI through MLflow's process-wide tracking URI.
    source = client.get_logged_model(model_id).artifact_location
    version_tags = _version_tags(spec, run_id, tags, metrics)
    with registry_lock(client.tracking_uri, lock_dir, lock_timeout_s):
        repair_pending_promotion(client, model_name)
        with_retries(lambda: _ensure_registered_model(client, model_name), "create_registered_model")
        mv = version_info(with_retries(lambda: client.create_model_version(
            model_name, source, run_id=run_id, tags=version_tags, model_id=model_id), "create_model_version"))
        with_retries(lambda: client.set_registered_model_alias(model_name, CANDIDATE, mv.version), "alias")
    logger.info("registered %s version %s (candidate) from %s", model_name, mv.version, checkpoint_dir)
    return version_info(client.get_model_version(model_name, mv.version))


def _log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float]) -> None:
    now = int(time.time() * 1000)
    if metrics:
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="Denoising diffusion models (diffusion_core)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _version_tags(spec: ModelSpec, run_id: str, tags: Mapping[str, str] | None,
                  metrics: Mapping[str, float] | None) -> dict[str, str]:
    base = {"dataset_fingerprint": spec.data.dataset_fingerprint or "unknown", "training_run_id": run_id,
            "git_commit": current_git_commit()}
    base.update({k: repr(float(v)) for k, v in (metrics or {}).items()})
    base.update({k: str(v) for k, v in (tags or {}).items()})
    return base


def log_directory(run_id: str, local_dir: Path, artifact_path: str, tracking_uri: str | None = None) -> None:
    """Upload `local_dir` as artifacts of `run_id` (e.g. the cached feature classifier)."""
    client = client_for(tracking_uri)
    with_retries(lambda: client.log_artifacts(run_id, str(local_dir), artifact_path), "log_artifacts")
