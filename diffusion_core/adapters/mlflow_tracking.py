"""MLflow tracking of a training run: the driver opens the run, rank 0 logs into it.

The driver creates (or, for a resumed run name, finds) the MLflow run before Ray Train starts and
logs what is known up front: every config field as a param, the dataset as an input with its
fingerprint, and tags linking the Ray run and the Prefect flow run. Rank 0 of the worker group then
logs per-step metrics, sample grids and system metrics into that run by id (`RankZeroTracker`); a
retried worker group logs into the same run, so one training run is one MLflow run.

The tracking server is required at both ends (opening the run, closing it; registration after
training needs it too) but not in between: rank 0's logging is best effort, so an outage of the
server during training costs some metrics at worst, never the run.

Every URI recorded here (params, tags, dataset source) passes through `redact.redact_uri`: a
tracking URI can embed credentials. Nothing here calls pip or touches the network beyond the
tracking server.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from diffusion_core.adapters.mlflow_store import (
    ensure_experiment,
    resolve_tracking_uri,
    with_retries,
)
from diffusion_core.data.manifest import DatasetManifest
from diffusion_core.errors import ConfigError
from diffusion_core.redact import redact_uri, strip_credentials
from diffusion_core.training import RUN_NAME_PATTERN, TrainConfig

logger = logging.getLogger(__name__)

RUN_NAME_TAG = "ray.train.run_name"
STORAGE_TAG = "ray.train.storage_path"
CHECKPOINT_TAG = "checkpoint_path"
FINGERPRINT_TAG = "dataset.fingerprint"
MAX_DIGEST_CHARS = 36  # MLflow's dataset digest column
MAX_BATCH = 100  # params per log_batch call (MLflow's limit); metrics allow 1000


def flatten_params(config: TrainConfig) -> dict[str, str]:
    """Every config field as a string param, nested models with dotted keys (`unet.base_channels`);
    URIs redacted."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            out[prefix] = redact_uri(str(value))

    walk("", config.model_dump(mode="json"))
    return out


def resolved_tracking_uri(config: TrainConfig) -> str:
    return resolve_tracking_uri(config.tracking_uri)


def _client(config: TrainConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=resolved_tracking_uri(config))


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
    client = _client(config)
    experiment_id = with_retries(
        lambda: ensure_experiment(client, config.experiment_name, config.artifact_location), "experiment")
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
        RUN_NAME_TAG: run_name, STORAGE_TAG: redact_uri(storage_path), FINGERPRINT_TAG: manifest.fingerprint,
        **(tags or {}),
    })
    _log_params(client, run.info.run_id, config)
    log_dataset_input(run.info.run_id, config, manifest)
    logger.info("created MLflow run %s in experiment %r", run.info.run_id, config.experiment_name)
    return run.info.run_id


def check_run_name(run_name: str) -> None:
    """Refuse names that would break the filter string above (a quote ends its literal)."""
    if not re.fullmatch(RUN_NAME_PATTERN, run_name):
        raise ConfigError(f"run_name: must match {RUN_NAME_PATTERN} (letters, digits, _ . -)")


def _set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def _log_params(client: MlflowClient, run_id: str, config: TrainConfig) -> None:
    params = [Param(k, v) for k, v in flatten_params(config).items()]
    for start in range(0, len(params), MAX_BATCH):
        client.log_batch(run_id, params=params[start : start + MAX_BATCH])


def log_dataset_input(run_id: str, config: TrainConfig, manifest: DatasetManifest) -> None:
    """The prepared dataset as an MLflow input (context "training"), digest = its fingerprint."""
    dataset = MetaDataset(
        source=dataset_source(redact_uri(config.dataset)),
        name=Path(config.dataset.rstrip("/")).name or "dataset",
        digest=manifest.fingerprint[:MAX_DIGEST_CHARS],
    )
    tags = [InputTag("mlflow.data.context", "training"), InputTag("fingerprint", manifest.fingerprint)]
    _client(config).log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])


def dataset_source(uri: str):
    """A local path as a local source (MLflow's resolver finds two equal candidates and warns);
    URIs through MLflow's resolver (s3://, gs://, ...)."""
    if "://" not in uri:
        from mlflow.data.sources import LocalArtifactDatasetSource

        return LocalArtifactDatasetSource(str(Path(uri).expanduser().resolve()))
    return resolve_dataset_source(uri)


def finish_run(config: TrainConfig, run_id: str, checkpoint_path: str | None, failed: bool = False) -> None:
    """Record the final checkpoint and close the run (FINISHED or FAILED), retrying transient errors."""
    client = _client(config)
    if checkpoint_path:
        with_retries(lambda: client.set_tag(run_id, CHECKPOINT_TAG, redact_uri(checkpoint_path)), "set_tag")
    status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
    with_retries(lambda: client.set_terminated(run_id, status=status), "set_terminated")


def _credentials_to_environment(tracking_uri: str) -> str:
    """`tracking_uri` without user info, which moves to MLflow's documented variables
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) unless those are set: MLflow puts the
    URI of a failed request into its own log messages, so it must not carry the password. Used in
    the rank-0 worker process, whose environment is its own."""
    parts = urlsplit(tracking_uri)
    if parts.username is None:
        return tracking_uri
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username))
    if parts.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    return strip_credentials(tracking_uri)


class RankZeroTracker:
    """Rank 0's handle on the run: metrics per step, PNG sample grids, tags, system metrics.

    Best effort: no call blocks training or raises because the tracking server is slow or down.
    Each call queues its record and returns; a background thread sends the queue. When a send
    fails the records stay queued (at most MAX_QUEUED_METRICS metrics, oldest dropped first, and
    MAX_QUEUED_FILES grids), one warning names the outage, and the thread retries with backoff
    (RETRY_INITIAL_S doubling up to RETRY_MAX_S). `close` waits up to `close_timeout_s` for the
    queue to drain and warns about whatever it could not send.
    """

    MAX_QUEUED_METRICS = 100_000
    MAX_QUEUED_FILES = 32
    METRICS_PER_CALL = 1000  # MLflow's log_batch limit
    RETRY_INITIAL_S = 1.0
    RETRY_MAX_S = 60.0

    def __init__(self, tracking_uri: str, run_id: str, close_timeout_s: float = 30.0,
                 system_metrics_interval_s: float | None = 5.0) -> None:
        self.client = MlflowClient(tracking_uri=_credentials_to_environment(tracking_uri))
        self.run_id = run_id
        self.where = redact_uri(tracking_uri)
        self.close_timeout_s = close_timeout_s
        self._metrics: collections.deque[Metric] = collections.deque()
        self._calls: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()  # tags, files
        self._dropped = 0
        self._failing = False
        self._closing = False
        self._wakeup = threading.Condition()
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-rank0-tracker", daemon=True)
        self._sender.start()
        self._monitor = self._start_system_metrics(system_metrics_interval_s)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._wakeup:
            self._metrics.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            overflow = len(self._metrics) - self.MAX_QUEUED_METRICS
            for _ in range(max(overflow, 0)):
                self._metrics.popleft()
            self._dropped += max(overflow, 0)
            self._wakeup.notify()

    def log_png(self, png: bytes, artifact_path: str, filename: str) -> None:
        def upload() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / filename
                path.write_bytes(png)
                self.client.log_artifact(self.run_id, str(path), artifact_path)

        with self._wakeup:
            if sum(kind == "file" for kind, _ in self._calls) >= self.MAX_QUEUED_FILES:
                logger.warning("MLflow tracking: %d sample grids already waiting; dropping %s",
                               self.MAX_QUEUED_FILES, filename)
                return
        self._enqueue("file", upload)

    def set_tags(self, tags: dict[str, str]) -> None:
        run_tags = [RunTag(k, str(v)) for k, v in tags.items()]
        self._enqueue("tags", lambda: self.client.log_batch(self.run_id, tags=run_tags))

    def close(self) -> None:
        """Stop system metrics, send what is queued (up to close_timeout_s), end the sender. The
        driver sets the run's final status."""
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as err:  # noqa: BLE001 - best effort by design
                logger.warning("MLflow tracking: stopping system metrics failed (%s)", type(err).__name__)
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        self._sender.join(self.close_timeout_s + 1.0)
        with self._wakeup:
            unsent = len(self._metrics) + len(self._calls)
        if unsent or self._dropped:
            logger.warning("MLflow tracking at %s: %d records not sent and %d metrics dropped; the run's "
                           "history has gaps", self.where, unsent, self._dropped)

    # ------------------------------------------------------------------------------ the sender

    def _enqueue(self, kind: str, call: Callable[[], None]) -> None:
        with self._wakeup:
            self._calls.append((kind, call))
            self._wakeup.notify()

    def _send_loop(self) -> None:
        """Send while anything is queued; after a failure wait `delay` (doubling) before the next
        try. Closing allows one prompt try, then retries until close_timeout_s has passed."""
        delay, retry_at, deadline = self.RETRY_INITIAL_S, 0.0, None
        while True:
            with self._wakeup:
                while True:
                    now = time.monotonic()
                    if self._closing and deadline is None:
                        deadline, retry_at = now + self.close_timeout_s, now
                    pending = bool(self._metrics or self._calls)
                    if (self._closing and not pending) or (deadline is not None and now >= deadline):
                        return
                    if pending and now >= retry_at:
                        break
                    timeout = None if not pending else retry_at - now
                    if deadline is not None:
                        timeout = min(timeout if timeout is not None else deadline - now, deadline - now)
                    self._wakeup.wait(timeout)
            if self._send_next():
                delay, retry_at = self.RETRY_INITIAL_S, 0.0
            else:
                retry_at = time.monotonic() + delay
                delay = min(2 * delay, self.RETRY_MAX_S)

    def _send_next(self) -> bool:
        """Send one batch of metrics or one queued call; False (and it stays queued) on failure."""
        with self._wakeup:
            batch = list(self._metrics)[: self.METRICS_PER_CALL]
            call = None if batch else self._calls[0][1]
        try:
            if batch:
                self.client.log_batch(self.run_id, metrics=batch)
            else:
                call()
        except Exception as err:  # noqa: BLE001 - any failure of the tracker must not reach training
            if not self._failing:
                logger.warning("MLflow tracking at %s unavailable (%s); training continues, logging is "
                               "queued and retried", self.where, type(err).__name__)
            self._failing = True
            return False
        with self._wakeup:
            for _ in range(len(batch)):
                self._metrics.popleft()
            if call is not None:
                self._calls.popleft()
        if self._failing:
            logger.warning("MLflow tracking at %s reachable again; sending the queued records", self.where)
            self._failing = False
        return True

    def _start_system_metrics(self, interval_s: float | None):
        """MLflow's system-metrics sampler on this run (the class `start_run(log_system_metrics=True)`
        uses, which needs the fluent API's process-wide URI); None when off or when it fails."""
        if interval_s is None:
            return None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s,
                                           tracking_uri=self.client.tracking_uri)
            monitor.start()
            return monitor
        except Exception as err:  # noqa: BLE001 - system metrics are optional
            logger.warning("MLflow tracking: system metrics not started (%s)", type(err).__name__)
            return None
