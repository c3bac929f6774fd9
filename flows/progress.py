"""Progress of long stages as log lines with rate and ETA: in the terminal and in the Prefect UI.

- `RateLog`: a counter (images prepared, images sampled) logged at most every `every_s` seconds,
  and once at the end.
- `watch_training`: training runs in Ray workers, whose own output is not shown by default
  (`flows.cli.console`); rank 0 logs step, loss and images/s to the run's MLflow run, and this
  watcher reads them back on the driver (MLflow's public client: the run is found by its Ray Train
  run name tag) and logs one line per logged step.

Log lines, not progress bars: the same line then reads well in a terminal, a CI log and a Prefect
task's log.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from diffusion_core.training import TrainConfig

logger = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """42 -> '42s', 312 -> '5m 12s', 7260 -> '2h 01m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


class RateLog:
    """`update(done)` logs "<what> <done>/<total> <unit> (<rate> <unit>/s, ETA ...)" at most every
    `every_s` seconds, and always when done reaches total."""

    def __init__(self, what: str, total: int | None, unit: str = "images", every_s: float = 5.0,
                 log: logging.Logger = logger) -> None:
        self.what, self.total, self.unit, self.every_s, self.log = what, total, unit, every_s, log
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        finished = self.total is not None and done >= self.total
        if not finished and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        if self.total is None:
            self.log.info("%s %d %s (%.0f %s/s)", self.what, done, self.unit, rate, self.unit)
            return
        eta = "done" if finished else f"ETA {duration((self.total - done) / max(rate, 1e-9))}"
        self.log.info("%s %d/%d %s (%.0f %s/s, %s)", self.what, done, self.total, self.unit, rate,
                      self.unit, eta)


@contextmanager
def watch_training(config: TrainConfig, run_name: str, tracking_uri: str,
                   every_s: float = 2.0) -> Iterator[None]:
    """Log training progress read from the MLflow run of `run_name` while the block runs (see the
    module docstring). The watcher thread carries the caller's context, so inside a Prefect task
    its lines are that task's logs."""
    stop = threading.Event()
    watcher = _TrainingWatcher(config, run_name, tracking_uri)
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(watcher.loop, stop, every_s),
                              name="training-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_s + 5.0)


class _TrainingWatcher:
    def __init__(self, config: TrainConfig, run_name: str, tracking_uri: str) -> None:
        self.config, self.run_name, self.tracking_uri = config, run_name, tracking_uri
        self.run_id: str | None = None
        self.last_step: int | None = None

    def loop(self, stop: threading.Event, every_s: float) -> None:
        while not stop.wait(every_s):
            try:
                self.poll()
            except Exception as err:  # noqa: BLE001 - progress is best effort; training goes on
                logger.debug("training progress unavailable: %s", type(err).__name__)

    def poll(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        if self.run_id is None:
            self.run_id = self._find_run(client)
            if self.run_id is None:
                return
        history = client.get_metric_history(self.run_id, "loss")
        if self.last_step is None:  # a resumed run: report only what this attempt adds
            self.last_step = max((m.step for m in history), default=0)
            if self.last_step:
                logger.info("train: resuming run %s (MLflow history up to step %d)", self.run_name,
                            self.last_step)
        new = sorted((m for m in history if m.step > self.last_step), key=lambda m: m.step)
        if not new:
            return
        rates = {m.step: m.value for m in client.get_metric_history(self.run_id, "images_per_s")}
        for metric in new:
            self._log_step(metric.step, metric.value, rates.get(metric.step))
        self.last_step = new[-1].step

    def _find_run(self, client) -> str | None:
        from diffusion_core.adapters.mlflow_tracking import RUN_NAME_TAG

        experiment = client.get_experiment_by_name(self.config.experiment_name)
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`{RUN_NAME_TAG}` = '{self.run_name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def _log_step(self, step: int, loss: float, images_per_s: float | None) -> None:
        total = self.config.steps
        if not images_per_s:
            logger.info("train: step %d/%d  loss %.4f", step, total, loss)
            return
        eta = (total - step) * self.config.batch_size / images_per_s
        logger.info("train: step %d/%d  loss %.4f  %.0f images/s  ETA %s", step, total, loss,
                    images_per_s, duration(eta))
