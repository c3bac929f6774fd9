"""Training in this process: an estimate of the time first (a few steps timed here,
`estimate_training`), then `diffusion_core.adapters.ray_train.run_training` (TorchTrainer.fit()
inside an ordinary task) with its progress logged (`flows.progress`). The local path of
`flows.train`, and what a Ray Job (`flows.train_job`) runs on the cluster.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from dataclasses import dataclass

from diffusion_core.adapters.mlflow_tracking import resolved_tracking_uri
from diffusion_core.adapters.ray_train import TrainResult, default_run_name, run_training
from diffusion_core.training import TrainConfig
from flows.progress import duration, watch_training

logger = logging.getLogger(__name__)

# Fixed cost of a Ray Train run before its first step (worker group, dataset read): about 25 s
# measured on a 2-core machine; part of the estimate.
TRAIN_STARTUP_S = 30.0
TIMED_STEPS = 3


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


def train_in_process(config: TrainConfig, tags: dict[str, str] | None = None) -> TrainResult:
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
