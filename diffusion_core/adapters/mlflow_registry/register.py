"""Registering a checkpoint: log it as a pyfunc, create a version, alias it `candidate`.

A version is refused when its data spec differs from the champion's (lineage.py), before anything
is uploaded and again under the registry lock. Its evaluation is recorded on the logged model and
tied to the evaluation split (evaluation_record.py); its description says what it is
(description.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from diffusion_core.adapters.mlflow_registry.config import (
    CANDIDATE,
    DATA_SPEC_TAG,
    DEFAULT_LOCK_TIMEOUT_S,
    GUIDED_SCALE_TAG,
    SUMMARY_TAG,
)
from diffusion_core.adapters.mlflow_registry.description import NOT_GATED, model_summary, version_description
from diffusion_core.adapters.mlflow_registry.evaluation_record import EvaluationDataset, log_evaluation
from diffusion_core.adapters.mlflow_registry.lineage import DataSpecKey, check_lineage
from diffusion_core.adapters.mlflow_registry.lock import registry_lock
from diffusion_core.adapters.mlflow_registry.packaging import current_git_commit, log_pyfunc
from diffusion_core.adapters.mlflow_registry.promotion import repair_pending_promotion
from diffusion_core.adapters.mlflow_registry.versions import ModelVersionInfo, version_info
from diffusion_core.adapters.mlflow_store import client_for, ensure_experiment, with_retries
from diffusion_core.checkpoint import ModelSpec, read_spec

logger = logging.getLogger(__name__)

MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS


def log_and_register(
    checkpoint_dir: str | Path,
    *,
    model_name: str,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    evaluation_dataset: EvaluationDataset | None = None,
    allow_new_data_spec: bool = False,
    experiment_name: str = "diffusion-registry",
    device: str = "cpu",
    lock_dir: Path | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> ModelVersionInfo:
    """Log `checkpoint_dir` as a pyfunc, register it as a new version of `model_name`, alias it
    `candidate`.

    run_id: the training run to log into (its id becomes the `training_run_id` tag); None creates
    a run in `experiment_name`. metrics (e.g. EvalResult.as_metrics()) are logged to the run as
    metrics of the logged model on `evaluation_dataset` (also logged as an evaluation input of the
    run) and copied to version tags; tags (e.g. eval settings, `eval_key`) are added to the version
    (overriding the defaults: dataset_fingerprint from spec.json, training_run_id, git_commit,
    data_spec, model_summary).

    RegistryError when the checkpoint's data spec differs from the champion's, unless
    `allow_new_data_spec` (set it when the user named `model_name` explicitly).
    """
    checkpoint_dir = Path(checkpoint_dir)
    spec = read_spec(checkpoint_dir)
    data_key = DataSpecKey.of(spec.data)
    client = client_for(tracking_uri)
    trained_on = _trained_on(spec, evaluation_dataset)
    check_lineage(client, model_name, data_key, allow_new_data_spec, trained_on)  # before any upload
    own_run = run_id is None
    if own_run:
        experiment_id = with_retries(lambda: ensure_experiment(client, experiment_name), "experiment")
        run_id = client.create_run(experiment_id, run_name="register").info.run_id
    try:
        model_id = log_pyfunc(client, client.get_run(run_id).info.experiment_id, run_id, checkpoint_dir,
                              spec, device)
        log_evaluation(client, run_id, model_id, metrics or {}, evaluation_dataset)
    finally:
        if own_run:
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    # The version's source is the logged model's artifact location, not `models:/<model id>`: the
    # registry store would resolve that URI through MLflow's process-wide tracking URI.
    source = client.get_logged_model(model_id).artifact_location
    summary = model_summary(spec, metrics, trained_on,
                            evaluation_dataset.name if evaluation_dataset is not None else None,
                            (tags or {}).get(GUIDED_SCALE_TAG))
    derived = {DATA_SPEC_TAG: data_key.to_tag(), SUMMARY_TAG: summary}
    version_tags = _version_tags(spec, run_id, tags, metrics, derived)
    with registry_lock(client.tracking_uri, lock_dir, lock_timeout_s):
        repair_pending_promotion(client, model_name)
        # Again under the lock: the champion may have changed while the model was uploaded.
        check_lineage(client, model_name, data_key, allow_new_data_spec, trained_on)
        with_retries(lambda: _ensure_registered_model(client, model_name, data_key), "registered model")
        mv = version_info(with_retries(lambda: client.create_model_version(
            model_name, source, run_id=run_id, tags=version_tags, model_id=model_id,
            description=version_description(summary, NOT_GATED)), "create_model_version"))
        with_retries(lambda: client.set_registered_model_alias(model_name, CANDIDATE, mv.version), "alias")
    with_retries(lambda: _link_logged_model(client, model_id, model_name, mv.version), "logged model tag")
    logger.info("registered %s version %s (candidate) from %s", model_name, mv.version, checkpoint_dir)
    return version_info(client.get_model_version(model_name, mv.version))


def _trained_on(spec: ModelSpec, evaluation_dataset: EvaluationDataset | None) -> str | None:
    """The training data's name: the evaluation dataset's, when it is the data the model learned."""
    if evaluation_dataset is not None and evaluation_dataset.fingerprint == spec.data.dataset_fingerprint:
        return evaluation_dataset.dataset
    return None


def _link_logged_model(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Name the version on its logged model (MLflow's `mlflow.modelVersions` tag, a JSON list of
    {name, version}): the experiment's Models page links logged models to versions through it.
    A tracking server adds the entry itself when the version is created with `model_id`; a database
    store does not, so it is added here unless already present."""
    existing = json.loads(client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG) or "[]")
    if not any(e.get("name") == name and str(e.get("version")) == str(version) for e in existing):
        entry = {"name": name, "version": str(version)}
        client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps([*existing, entry])})


def _ensure_registered_model(client: MlflowClient, name: str, data: DataSpecKey) -> None:
    try:
        client.create_registered_model(name, description=f"Denoising diffusion models (diffusion_core) of "
                                       f"one kind of data ({data.describe()}): every version generates it")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _version_tags(spec: ModelSpec, run_id: str, tags: Mapping[str, str] | None,
                  metrics: Mapping[str, float] | None, derived: Mapping[str, str]) -> dict[str, str]:
    base = {"dataset_fingerprint": spec.data.dataset_fingerprint or "unknown", "training_run_id": run_id,
            "git_commit": current_git_commit(), **derived}
    base.update({k: repr(float(v)) for k, v in (metrics or {}).items()})
    base.update({k: str(v) for k, v in (tags or {}).items()})
    return base


def log_directory(run_id: str, local_dir: Path, artifact_path: str, tracking_uri: str | None = None) -> None:
    """Upload `local_dir` as artifacts of `run_id` (e.g. the cached feature classifier)."""
    client = client_for(tracking_uri)
    with_retries(lambda: client.log_artifacts(run_id, str(local_dir), artifact_path), "log_artifacts")
