"""MLflow tracking of a training run: the driver opens the run, rank 0 logs into it.

The driver creates (or, for a resumed run name, finds) the MLflow run before Ray Train starts and
logs what is known up front: every config field as a param, the dataset as an input with its
fingerprint, and tags linking the Ray run and the Prefect flow run. Rank 0 of the worker group then
attaches to that run by id (`RankZeroTracker`) and logs per-step metrics, sample grids and system
metrics; a retried worker group attaches to the same run, so one training run is one MLflow run.

Nothing here calls pip or touches the network beyond the tracking server.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from diffusion_core.data.manifest import DatasetManifest
from diffusion_core.errors import ConfigError
from diffusion_core.training import RUN_NAME_PATTERN, TrainConfig

logger = logging.getLogger(__name__)

RUN_NAME_TAG = "ray.train.run_name"
STORAGE_TAG = "ray.train.storage_path"
CHECKPOINT_TAG = "checkpoint_path"
FINGERPRINT_TAG = "dataset.fingerprint"
MAX_DIGEST_CHARS = 36  # MLflow's dataset digest column


def flatten_params(config: TrainConfig) -> dict[str, str]:
    """Every config field as a string param, nested models with dotted keys (`unet.base_channels`)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            out[prefix] = str(value)

    walk("", config.model_dump(mode="json"))
    return out


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store, `mlartifacts/` beside the database file (MLflow would otherwise put
    artifacts in ./mlruns of whatever directory the process runs in); None for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
    return (db_path.resolve().parent / "mlartifacts").as_uri()


def resolved_tracking_uri(config: TrainConfig) -> str:
    return config.tracking_uri or mlflow.get_tracking_uri()


def ensure_experiment(client: MlflowClient, config: TrainConfig) -> str:
    """The experiment's id, creating it with an explicit artifact location when needed."""
    experiment = client.get_experiment_by_name(config.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    location = config.artifact_location or default_artifact_location(resolved_tracking_uri(config))
    try:
        return client.create_experiment(config.experiment_name, artifact_location=location)
    except MlflowException:
        # Another process created it between our lookup and create (a known MLflow race).
        experiment = client.get_experiment_by_name(config.experiment_name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_or_resume_run(
    config: TrainConfig,
    run_name: str,
    storage_path: str,
    manifest: DatasetManifest,
    tags: dict[str, str] | None = None,
) -> str:
    """The id of the MLflow run for Ray run `run_name`: the existing one when the name was trained
    before (resume), else a new run with params, dataset input and tags logged."""
    check_run_name(run_name)
    client = MlflowClient(tracking_uri=resolved_tracking_uri(config))
    experiment_id = ensure_experiment(client, config)
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        _set_tags(client, run_id, tags or {})
        logger.info("resuming MLflow run %s of training run %r", run_id, run_name)
        return run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={
        RUN_NAME_TAG: run_name, STORAGE_TAG: storage_path, FINGERPRINT_TAG: manifest.fingerprint,
        **(tags or {}),
    })
    _log_params(client, run.info.run_id, config)
    log_dataset_input(run.info.run_id, config, manifest)
    logger.info("created MLflow run %s in experiment %r", run.info.run_id, config.experiment_name)
    return run.info.run_id


def check_run_name(run_name: str) -> None:
    """Refuse names that would break the filter string below (a quote ends its literal)."""
    if not re.fullmatch(RUN_NAME_PATTERN, run_name):
        raise ConfigError(f"run_name: {run_name!r} must match {RUN_NAME_PATTERN} (letters, digits, _ . -)")


def _set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def _log_params(client: MlflowClient, run_id: str, config: TrainConfig) -> None:
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in flatten_params(config).items()]
    for start in range(0, len(params), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=params[start : start + 100])


def log_dataset_input(run_id: str, config: TrainConfig, manifest: DatasetManifest) -> None:
    """The prepared dataset as an MLflow input (context "training"), digest = its fingerprint."""
    from mlflow.entities import DatasetInput, InputTag

    dataset = MetaDataset(
        source=dataset_source(config.dataset),
        name=Path(config.dataset.rstrip("/")).name or "dataset",
        digest=manifest.fingerprint[:MAX_DIGEST_CHARS],
    )
    tags = [InputTag("mlflow.data.context", "training"), InputTag("fingerprint", manifest.fingerprint)]
    client = MlflowClient(tracking_uri=resolved_tracking_uri(config))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])


def dataset_source(uri: str):
    """A local path as a local source (MLflow's resolver finds two equal candidates and warns);
    URIs through MLflow's resolver (s3://, gs://, ...)."""
    if "://" not in uri:
        from mlflow.data.sources import LocalArtifactDatasetSource

        return LocalArtifactDatasetSource(str(Path(uri).expanduser().resolve()))
    return resolve_dataset_source(uri)


def finish_run(config: TrainConfig, run_id: str, checkpoint_path: str | None, failed: bool = False) -> None:
    """Record the final checkpoint and close the run (FINISHED or FAILED)."""
    client = MlflowClient(tracking_uri=resolved_tracking_uri(config))
    if checkpoint_path:
        client.set_tag(run_id, CHECKPOINT_TAG, checkpoint_path)
    status = RunStatus.FAILED if failed else RunStatus.FINISHED
    client.set_terminated(run_id, status=RunStatus.to_string(status))


def last_logged_step(client: MlflowClient, run_id: str) -> int:
    """The highest step in the run's metric histories (-1 if none), system metrics aside: they
    count their own samples."""
    keys = [key for key in client.get_run(run_id).data.metrics if not key.startswith("system/")]
    return max((m.step for key in keys for m in client.get_metric_history(run_id, key)), default=-1)


class RankZeroTracker:
    """Rank 0's handle on the run: metrics per step, PNG sample grids, system metrics.

    A resumed run (a retried worker group, or the same run name started again) repeats the steps
    between its last checkpoint and the interruption; their metrics are in the history already, so
    steps up to the last one logged are not logged again (one value per step)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        mlflow.set_tracking_uri(tracking_uri)
        # Stay inside the run opened by the driver; never end it here (a retry reattaches).
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")
        self.run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
        self.logged_through = last_logged_step(MlflowClient(tracking_uri=tracking_uri), run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.logged_through:
            return
        mlflow.log_metrics(metrics, step=step)

    def log_png(self, png: bytes, artifact_path: str, filename: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            path.write_bytes(png)
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        mlflow.set_tags(tags)

    def close(self) -> None:
        """End rank 0's attachment (stops system-metrics sampling); the driver sets the final status,
        and a retried worker group reattaches with start_run(run_id)."""
        mlflow.end_run()
