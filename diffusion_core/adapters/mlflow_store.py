"""The MLflow store that tracking and the registry talk to: its URI, a client, experiments, retries,
datasets as run inputs.

Every function takes the tracking URI explicitly and builds its own client. Nothing here sets
MLflow's process-wide URIs, so two stores can be used side by side in one process, by several
threads, and a caller's `mlflow.set_tracking_uri` is never changed behind its back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TypeVar
from urllib.parse import urlsplit

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

logger = logging.getLogger(__name__)

MAX_DIGEST_CHARS = 36  # MLflow's dataset digest column
DATASET_CONTEXT_TAG = "mlflow.data.context"  # MLflow's input tag: "training", "evaluation", ...

T = TypeVar("T")
# Errors worth another try: SQLite busy, a lost version-number race, a restarting server.
_TRANSIENT_MARKERS = ("database is locked", "unique constraint", "integrityerror", "temporarily_unavailable",
                      "503", "502", "504", "connection")


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """`tracking_uri`, or MLflow's own resolution (MLFLOW_TRACKING_URI, then its default)."""
    return tracking_uri or mlflow.get_tracking_uri()


def client_for(tracking_uri: str | None) -> MlflowClient:
    """A client whose tracking and registry stores are both `tracking_uri` (resolved)."""
    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store, `mlartifacts/` beside the database file (MLflow would otherwise put
    artifacts in ./mlruns of whatever directory the process runs in); None for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
    return (db_path.resolve().parent / "mlartifacts").as_uri()


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created if needed with `artifact_location` (default:
    `default_artifact_location` of the client's store)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_location or default_artifact_location(client.tracking_uri)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # another process created it first
        if experiment is None:
            raise
        return experiment.experiment_id


def is_transient(err: BaseException) -> bool:
    """Whether an MLflow error is worth retrying (busy database, lost race, 5xx, connection)."""
    if not isinstance(err, MlflowException):
        return False
    text = f"{err.error_code} {err}".lower()
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def with_retries(call: Callable[[], T], what: str, attempts: int = 6, initial_delay_s: float = 0.2) -> T:
    """`call()`, retried on transient MLflow errors with jittered exponential backoff (about 0.2 s,
    0.4 s, 0.8 s, ...); other errors, and the last transient one, propagate."""
    def log_retry(state) -> None:
        logger.warning("%s: transient MLflow error (%s); retry %d/%d", what, state.outcome.exception(),
                       state.attempt_number, attempts - 1)

    backoff = wait_exponential_jitter(initial=initial_delay_s, max=10.0, jitter=initial_delay_s)
    retrying = Retrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(attempts),
                        wait=backoff, before_sleep=log_retry, reraise=True)
    return retrying(call)


def dataset_source(uri: str):
    """A local path as a local source (MLflow's resolver finds two equal candidates and warns);
    URIs through MLflow's resolver (s3://, gs://, ...)."""
    if "://" not in uri:
        from mlflow.data.sources import LocalArtifactDatasetSource

        return LocalArtifactDatasetSource(str(Path(uri).expanduser().resolve()))
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    return resolve_dataset_source(uri)


def dataset_name(uri: str) -> str:
    """A dataset's name for MLflow: the last segment of its path or URI path (a query string, which
    can carry a signature, is never part of it)."""
    path = urlsplit(uri).path if "://" in uri else uri
    return PurePosixPath(path.rstrip("/")).name or "dataset"


def log_dataset(client: MlflowClient, run_id: str, *, name: str, source_uri: str, fingerprint: str,
                context: str) -> None:
    """A prepared dataset (or one split of it) as an input of `run_id`: MLflow identifies it by
    (name, digest), the digest is the dataset's fingerprint (cut to MLflow's column width; the
    whole fingerprint goes in the `fingerprint` input tag). `source_uri` must be credential-free
    (`redact.redact_uri`). context: "training", "evaluation", ... (shown by the MLflow UI)."""
    from mlflow.data.meta_dataset import MetaDataset

    dataset = MetaDataset(source=dataset_source(source_uri), name=name,
                          digest=fingerprint[:MAX_DIGEST_CHARS])
    tags = [InputTag(DATASET_CONTEXT_TAG, context), InputTag("fingerprint", fingerprint)]
    # MlflowClient.log_inputs takes the entity; the only public way from a Dataset to it is the fluent
    # mlflow.log_input, which needs the process-wide URI and active run: hence the one private call.
    entity = dataset._to_mlflow_entity()
    with_retries(lambda: client.log_inputs(run_id, datasets=[DatasetInput(entity, tags)]), "log_inputs")


def log_image(client: MlflowClient, run_id: str, image: np.ndarray, key: str, step: int,
              timestamp_ms: int | None = None) -> None:
    """`image` (uint8 (H, W, C), C in 1, 3, 4) as step `step` of run `run_id`'s image series `key`:
    MLflow's time-stepped images (files under `images/` named by key, step and time), which the
    run's page shows with a step slider. Sent before returning."""
    client.log_image(run_id, image, key=key, step=step, timestamp=timestamp_ms, synchronous=True)
