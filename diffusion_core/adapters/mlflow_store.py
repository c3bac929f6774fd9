"""The MLflow store that tracking and the registry talk to: its URI, a client, experiments, retries.

Every function takes the tracking URI explicitly and builds its own client. Nothing here sets
MLflow's process-wide URIs, so two stores can be used side by side in one process, by several
threads, and a caller's `mlflow.set_tracking_uri` is never changed behind its back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

logger = logging.getLogger(__name__)

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
