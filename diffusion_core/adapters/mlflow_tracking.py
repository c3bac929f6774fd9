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
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from diffusion_core.adapters.mlflow_store import (
    dataset_name,
    ensure_experiment,
    log_dataset,
    log_image,
    resolve_tracking_uri,
    with_retries,
)
from diffusion_core.data.manifest import DatasetManifest
from diffusion_core.errors import ConfigError
from diffusion_core.image_grids import readable_grid
from diffusion_core.images import to_uint8
from diffusion_core.redact import redact_uri, strip_credentials
from diffusion_core.training import RUN_NAME_PATTERN, TrainConfig

logger = logging.getLogger(__name__)

RUN_NAME_TAG = "ray.train.run_name"
STORAGE_TAG = "ray.train.storage_path"
CHECKPOINT_TAG = "checkpoint_path"
FINGERPRINT_TAG = "dataset.fingerprint"
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
    log_dataset(_client(config), run_id, name=dataset_name(config.dataset),
                source_uri=redact_uri(config.dataset), fingerprint=manifest.fingerprint, context="training")


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


def log_sample_grid(tracking_uri: str | None, run_id: str, images: Any, labels: Sequence[int] | None,
                    label_names: Sequence[str] | None, key: str, step: int) -> None:
    """Samples ((N, C, H, W) floats in [0, 1]) as a readable grid (image_grids.readable_grid: one
    column per label) at step `step` of the run's image series `key`. Best effort: a picture is not
    worth failing the caller for, so an error becomes a warning."""
    labels = None if labels is None else [int(v) for v in labels]
    grid = readable_grid(to_uint8(images), labels=labels, label_names=label_names)
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    try:
        with_retries(lambda: log_image(client, run_id, grid, key, step), "log_image")
    except (MlflowException, OSError) as err:
        logger.warning("MLflow: the %r grid of run %s was not logged (%s)", key, run_id, type(err).__name__)


LOG_INTERVAL_S = 2.0  # the most wall time between two points of the training curves


class LogCadence:
    """When rank 0 records a point of the training curves: every `every_steps` steps and at
    `last_step` (points a reader finds again by step number), and in between whenever
    `interval_s` of wall time has passed since the previous point. A slow model still draws a
    curve with a point every few seconds; a fast one adds at most one point per interval."""

    def __init__(self, every_steps: int, last_step: int, interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_steps, self.last_step, self.interval_s = every_steps, last_step, interval_s
        self._clock = clock
        self._previous = clock()

    def on_schedule(self, step: int) -> bool:
        """A step of the fixed schedule (every_steps, last_step)."""
        return step % self.every_steps == 0 or step == self.last_step

    def due(self, step: int) -> bool:
        """Whether to record a point after `step`; True restarts the interval."""
        now = self._clock()
        if self.on_schedule(step) or now - self._previous >= self.interval_s:
            self._previous = now
            return True
        return False


def last_logged_step(client: MlflowClient, run_id: str) -> int:
    """The highest step in the run's metric histories (-1 if none). System metrics are left out:
    they count their own samples, not training steps."""
    keys = [key for key in client.get_run(run_id).data.metrics if not key.startswith("system/")]
    return max((m.step for key in keys for m in client.get_metric_history(run_id, key)), default=-1)


class RankZeroTracker:
    """Rank 0's handle on the run: metrics per step, sample grids as MLflow's time-stepped images
    (the UI shows them with a step slider), tags, system metrics.

    Best effort: no call blocks training or raises because the tracking server is slow or down.
    Each call queues its record and returns; a background thread sends the queue. When a send
    fails the records stay queued (at most MAX_QUEUED_METRICS metrics, oldest dropped first, and
    MAX_QUEUED_CALLS images and tag sets), one warning names the outage, and the thread retries with
    backoff (RETRY_INITIAL_S doubling up to RETRY_MAX_S). `close` waits up to `close_timeout_s` for
    the queue to drain and warns about whatever it could not send.

    One value per step: a resumed run (a retried worker group, or the same run name started again)
    repeats the steps between its last checkpoint and the interruption. Before its first send the
    thread reads the highest step the run already holds (`last_logged_step`), and records of steps
    up to it are not sent again.
    """

    MAX_QUEUED_METRICS = 100_000
    MAX_QUEUED_CALLS = 32
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
        # (kind, step or None, call): images and tag sets, sent in order after the queued metrics
        self._calls: collections.deque[tuple[str, int | None, Callable[[], None]]] = collections.deque()
        self._logged_through: int | None = None  # read by the sender before its first send
        self._dropped = self._repeated = 0
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

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """`image` (uint8 (H, W, C), C in 1, 3, 4) as step `step` of the run's image series `key`."""
        timestamp = int(time.time() * 1000)
        self._enqueue("image", step, lambda: log_image(self.client, self.run_id, image, key, step, timestamp))

    def set_tags(self, tags: dict[str, str]) -> None:
        run_tags = [RunTag(k, str(v)) for k, v in tags.items()]
        self._enqueue("tags", None, lambda: self.client.log_batch(self.run_id, tags=run_tags))

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
        if self._repeated:
            logger.info("MLflow tracking: %d records of steps the run had logged before (resumed run) "
                        "were not logged again", self._repeated)
        if unsent or self._dropped:
            logger.warning("MLflow tracking at %s: %d records not sent and %d metrics dropped; the run's "
                           "history has gaps", self.where, unsent, self._dropped)

    # ------------------------------------------------------------------------------ the sender

    def _enqueue(self, kind: str, step: int | None, call: Callable[[], None]) -> None:
        with self._wakeup:
            if len(self._calls) >= self.MAX_QUEUED_CALLS:
                logger.warning("MLflow tracking: %d records already waiting; dropping this %s",
                               self.MAX_QUEUED_CALLS, kind)
                return
            self._calls.append((kind, step, call))
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
        try:
            if self._logged_through is None:
                self._logged_through = last_logged_step(self.client, self.run_id)
            with self._wakeup:
                self._drop_repeated_steps()
                batch = list(self._metrics)[: self.METRICS_PER_CALL]
                call = None if batch or not self._calls else self._calls[0][2]
            if batch:
                self.client.log_batch(self.run_id, metrics=batch)
            elif call is not None:
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

    def _drop_repeated_steps(self) -> None:
        """Forget queued records of steps the run held before this tracker started (call with the
        lock held). Only the queue heads are checked: steps only grow within one tracker."""
        through = self._logged_through if self._logged_through is not None else -1
        while self._metrics and self._metrics[0].step <= through:
            self._metrics.popleft()
            self._repeated += 1
        while self._calls and self._calls[0][1] is not None and self._calls[0][1] <= through:
            self._calls.popleft()
            self._repeated += 1

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
