"""Prefect task and flow `train`: one Ray Train run, tracked in MLflow, linked to the flow run.

`train_interruptibly` is how the CLI and the flows train: an estimate of the time first (a few
steps timed here, `estimate_training`), then `diffusion_core.adapters.ray_train.run_training`
(TorchTrainer.fit() inside an ordinary task) with its progress logged (`flows.progress`), the MLflow
run tagged with the Prefect flow run id so that a run in the MLflow UI leads back to the pipeline
run that produced it.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from dataclasses import dataclass

from prefect import flow, task
from prefect.runtime import flow_run

from diffusion_core.adapters.mlflow_tracking import resolved_tracking_uri
from diffusion_core.adapters.ray_train import TrainResult, default_run_name, run_training
from diffusion_core.training import TrainConfig
from flows.prefect_logs import project_logs_to_prefect
from flows.progress import duration, watch_training

logger = logging.getLogger(__name__)

PREFECT_FLOW_RUN_TAG = "prefect.flow_run_id"
# Fixed cost of a Ray Train run before its first step (worker group, dataset read): about 25 s
# measured on a 2-core machine; part of the estimate.
TRAIN_STARTUP_S = 30.0
TIMED_STEPS = 3


def prefect_tags() -> dict[str, str]:
    """{"prefect.flow_run_id": id} inside a flow run, {} outside one."""
    run_id = flow_run.id
    return {PREFECT_FLOW_RUN_TAG: str(run_id)} if run_id else {}


@dataclass(frozen=True)
class TrainingEstimate:
    seconds_per_step: float
    parameters: int

    def total_seconds(self, steps: int) -> float:
        return TRAIN_STARTUP_S + steps * self.seconds_per_step


def estimate_training(config: TrainConfig) -> TrainingEstimate | None:
    """Seconds per optimisation step of `config` on this machine, from TIMED_STEPS steps (after one
    warm-up step) of one worker's batch on random data with the worker's torch threads; None for
    GPU training (the driver may have no GPU). Assumes the workers' machine is like this one."""
    if config.use_gpu:
        return None
    import torch

    from diffusion_core.training import build_train_state, train_step
    from diffusion_core.unet import count_parameters

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, math.floor(config.cpus_per_worker)))
    try:
        state = build_train_state(config)
        unet, n = config.unet, config.per_worker_batch_size
        images = torch.randn(n, unet.in_channels, unet.image_size, unet.image_size)
        labels = torch.randint(0, unet.num_classes, (n,)) if unet.num_classes else None
        train_step(state, config, images, labels)
        start = time.perf_counter()
        for _ in range(TIMED_STEPS):
            train_step(state, config, images, labels)
        per_step = (time.perf_counter() - start) / TIMED_STEPS
        return TrainingEstimate(per_step, count_parameters(state.model))
    finally:
        torch.set_num_threads(threads)


def log_estimate(config: TrainConfig) -> None:
    """One line before training: what is trained, on what, and how long it should take."""
    unet = config.unet
    what = (f"train: {config.steps} steps of {config.batch_size} images ({unet.image_size}x{unet.image_size}"
            f"x{unet.in_channels}) on {config.num_workers} {'GPU' if config.use_gpu else 'CPU'} worker(s)")
    estimate = estimate_training(config)
    if estimate is None:
        logger.info("%s; progress with ETA follows once training runs", what)
        return
    logger.info("%s, UNet %.1fM parameters: about %s (%.2f s per step timed here, plus ~%.0f s start-up)",
                what, estimate.parameters / 1e6, duration(estimate.total_seconds(config.steps)),
                estimate.seconds_per_step, TRAIN_STARTUP_S)


def train_interruptibly(config: TrainConfig, tags: dict[str, str] | None = None) -> TrainResult:
    """`run_training(config)` with an estimate first and progress lines while it runs.

    Ray Train's fit() replaces the process's SIGINT handler when it runs on the main thread (and
    leaves it installed afterwards): Ctrl-C then asks the run to stop and fit() returns as if
    training had ended, or the handler exits the process with status 0. Run from another thread,
    fit() leaves SIGINT alone, so Ctrl-C raises KeyboardInterrupt here, on the main thread, and the
    command stops its stages (stopping Ray ends the run; a rerun resumes it from its checkpoint).
    """
    run_name = config.run_name or default_run_name()
    config = config.model_copy(update={"run_name": run_name})
    log_estimate(config)
    outcome: dict[str, TrainResult | BaseException] = {}

    def target() -> None:
        try:
            outcome["result"] = run_training(config, tags=tags)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = err

    worker = threading.Thread(target=contextvars.copy_context().run, args=(target,),
                              name="ray-train-driver", daemon=True)
    with watch_training(config, run_name, resolved_tracking_uri(config)):
        worker.start()
        while worker.is_alive():
            worker.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@task(name="train-model")
def train_task(config: TrainConfig) -> TrainResult:
    """Train with Ray Train; returns the final checkpoint path, MLflow run id and last metrics."""
    return train_interruptibly(config, tags=prefect_tags())


@flow(name="train")
def train(config: TrainConfig) -> TrainResult:
    """Flow wrapper around `train_task`, for running training on its own."""
    with project_logs_to_prefect():
        result = train_task(config)
    logger.info("trained %s -> %s (MLflow run %s)", config.dataset, result.checkpoint_path, result.run_id)
    return result
