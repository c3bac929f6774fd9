"""Distributed training with Ray Train (V2 API): TorchTrainer wiring and the per-worker loop.

Driver (`run_training`): validate the config against the dataset manifest, open the MLflow run, build
ScalingConfig / RunConfig from the TrainConfig and call `TorchTrainer.fit()`. Ray Train V2 resumes by
itself in two cases: after a worker failure (up to `max_failures`) and when a run with the same
`RunConfig(name, storage_path)` is started again (its checkpoint manager snapshot lives under
storage_path/name); in both cases `ray.train.get_checkpoint()` returns the latest checkpoint inside
the loop.

Worker (`train_loop_per_worker`): restore the checkpoint, wrap the model with DDP (gloo on CPU, NCCL
on GPU), and run `diffusion_core.training.train_step` from the checkpoint's step to `config.steps`
on batches streamed through Ray Data (`ray_data.stream_batches`). Every `checkpoint_every` steps and
at the end, rank 0 writes the checkpoint and every rank calls `ray.train.report` (a barrier).

Why each worker builds its own stream instead of taking a `streaming_split` shard of a Trainer
dataset: the split assigns blocks to workers dynamically, so neither a shard's rows nor their order
would be reproducible across attempts, and every Ray Data epoch restarts the pipeline (one to three
seconds on a 2-core machine, more than a small dataset's epoch of training). The worker's stream
instead reads the windows that `data_order` assigns to its rank for the whole run, in segments of
bounded size (ray_data.stream_batches): the rows of step s are a function of (seed, rank,
num_workers, s), and a resumed run reads exactly the batches an uninterrupted one would, on any
number of workers. Nothing holds the shard: at most two segments of stored bytes are in flight.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from torch import Tensor

from diffusion_core.adapters.ray_cluster import connect_ray, stop_ray
from diffusion_core.checkpoint import DataSpec, LoadedModel, ModelSpec
from diffusion_core.class_prior import class_prior
from diffusion_core.data.manifest import DatasetManifest, read_manifest
from diffusion_core.errors import CheckpointError, ConfigError
from diffusion_core.image_grids import readable_grid
from diffusion_core.images import to_uint8
from diffusion_core.training import (
    TrainConfig,
    TrainingDivergedError,
    TrainState,
    build_train_state,
    load_training_checkpoint,
    load_weights,
    save_training_checkpoint,
    train_step,
    training_windows,
)

logger = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
SAMPLES_IMAGE_KEY = "samples"  # the MLflow image series of the training run's sample grids


@dataclass(frozen=True)
class TrainResult:
    """What the pipeline needs from a finished run."""

    checkpoint_path: str
    run_id: str
    run_name: str
    metrics: dict[str, Any]


# --- driver ------------------------------------------------------------------------------------


def run_training(config: TrainConfig, tags: dict[str, str] | None = None) -> TrainResult:
    """Train (or resume `config.run_name`) with Ray Train and track it in MLflow.

    `tags` are added to the MLflow run (e.g. {"prefect.flow_run_id": ...}). Raises
    TrainingDivergedError (naming the last good checkpoint) when the loss or gradients stayed
    non-finite, and Ray's TrainingFailedError when workers failed more than `max_failures` times.
    """
    from diffusion_core.adapters import mlflow_tracking

    manifest = read_manifest(config.dataset)
    spec = model_spec_for(config, manifest)
    run_name = config.run_name or default_run_name()
    storage_path = resolve_storage_path(config.storage_path)
    connection = connect_ray(config.ray_address)
    try:
        check_cluster_resources(config)
        run_id = mlflow_tracking.start_or_resume_run(config, run_name, storage_path, manifest, tags)
        loop_config = {
            "config": config.model_dump(mode="json"),
            "spec": spec.model_dump(mode="json"),
            "manifest": manifest.model_dump(mode="json"),
            "tracking_uri": mlflow_tracking.resolved_tracking_uri(config),
            "run_id": run_id,
        }
        try:
            result = build_trainer(config, run_name, storage_path, loop_config).fit()
        except BaseException:
            mlflow_tracking.finish_run(config, run_id, None, failed=True)
            raise
        return _finish(config, run_id, run_name, result)
    finally:
        stop_ray(connection)


def default_run_name() -> str:
    """`train-<UTC time>-<6 hex>`: the random suffix keeps two runs started in the same second apart."""
    return f"train-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _finish(config: TrainConfig, run_id: str, run_name: str, result: ray.train.Result) -> TrainResult:
    from diffusion_core.adapters import mlflow_tracking

    metrics = dict(result.metrics or {})
    checkpoint_path = checkpoint_location(config.storage_path, result.checkpoint)
    if metrics.get("diverged"):
        mlflow_tracking.finish_run(config, run_id, checkpoint_path, failed=True)
        raise TrainingDivergedError(
            f"training diverged at step {metrics.get('step')}: {metrics.get('nonfinite_streak')} "
            "consecutive non-finite losses or gradients; last good checkpoint: "
            f"{checkpoint_path or 'none (it diverged before the first checkpoint)'}",
            hint="lower lr or grad_clip; resume from that checkpoint (warm_start) or start afresh",
        )
    if checkpoint_path is None:
        raise CheckpointError(f"training run {run_name!r} finished without reporting a checkpoint")
    mlflow_tracking.finish_run(config, run_id, checkpoint_path)
    logger.info("training run %r finished: checkpoint %s, MLflow run %s", run_name, checkpoint_path, run_id)
    return TrainResult(checkpoint_path=checkpoint_path, run_id=run_id, run_name=run_name, metrics=metrics)


def build_trainer(config: TrainConfig, run_name: str, storage_path: str,
                  loop_config: dict[str, Any]) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(config),
        run_config=run_config(config, run_name, storage_path),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
    )


def scaling_config(config: TrainConfig) -> ScalingConfig:
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = config.gpus_per_worker
    return ScalingConfig(
        num_workers=config.num_workers,
        use_gpu=config.use_gpu,
        resources_per_worker=resources,
        placement_strategy=config.placement_strategy,
    )


def run_config(config: TrainConfig, run_name: str, storage_path: str) -> RunConfig:
    return RunConfig(
        name=run_name,
        storage_path=storage_path,
        failure_config=FailureConfig(max_failures=config.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.num_to_keep),
    )


def resolve_storage_path(storage_path: str) -> str:
    """URIs unchanged; local paths made absolute (Ray resolves relative ones against its own dirs)."""
    if "://" in storage_path:
        return storage_path
    return str(Path(storage_path).expanduser().resolve())


def checkpoint_location(storage_path: str, checkpoint: ray.train.Checkpoint | None) -> str | None:
    """The checkpoint as a path (local storage) or URI (remote storage); None when there is none."""
    if checkpoint is None:
        return None
    if "://" in storage_path:
        return f"{storage_path.split('://', 1)[0]}://{checkpoint.path.lstrip('/')}"
    return checkpoint.path


def model_spec_for(config: TrainConfig, manifest: DatasetManifest) -> ModelSpec:
    """The ModelSpec of the model to train; the UNet must match the dataset's images and labels."""
    unet = config.unet
    num_labels = len(manifest.label_names) if manifest.label_names else None
    if (unet.image_size, unet.in_channels) != (manifest.image_size, manifest.channels):
        raise ConfigError(
            f"unet.image_size/unet.in_channels: ({unet.image_size}, {unet.in_channels}) do not match the "
            f"dataset's ({manifest.image_size}, {manifest.channels}) at {config.dataset}"
        )
    if unet.num_classes != num_labels:
        raise ConfigError(
            f"unet.num_classes: {unet.num_classes} does not match the dataset's {num_labels} labels "
            "(None = unlabelled)"
        )
    prior = class_prior(manifest.class_counts) if unet.num_classes and manifest.class_counts else None
    data = DataSpec(image_size=manifest.image_size, channels=manifest.channels,
                    label_names=manifest.label_names, class_prior=prior,
                    dataset_fingerprint=manifest.fingerprint)
    return ModelSpec(unet=unet, schedule=config.schedule, objective=config.objective, data=data)


def check_cluster_resources(config: TrainConfig) -> None:
    """Refuse requests the cluster cannot meet instead of letting fit() wait forever: GPUs that
    are not there, and workers that reserve every CPU. Each worker's Ray Data pipeline reads its
    windows with CPU tasks (one CPU each), which would then never start."""
    resources = ray.cluster_resources()
    if config.use_gpu:
        gpus, needed = resources.get("GPU", 0.0), config.num_workers * config.gpus_per_worker
        if gpus < needed:
            raise ConfigError(
                f"use_gpu: {config.num_workers} worker(s) x {config.gpus_per_worker} GPUs need {needed:g} "
                f"GPUs; the Ray cluster has {gpus:g}",
                hint="train with use_gpu=false (--cpu), or connect to a cluster with GPUs (ray_address)",
            )
    total = resources.get("CPU", 0.0)
    reserved = config.num_workers * config.cpus_per_worker
    if total - reserved < 1.0:
        raise ConfigError(
            f"cpus_per_worker: {config.num_workers} worker(s) x {config.cpus_per_worker} CPUs leave "
            f"{total - reserved:g} of the cluster's {total:g} CPUs; Ray Data needs at least 1 free CPU "
            "to read the dataset",
            hint="lower cpus_per_worker or num_workers, or add CPUs to the cluster",
        )


# --- worker ------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The loop every Ray Train worker runs (see the module docstring)."""
    config = TrainConfig.model_validate(loop_config["config"])
    spec = ModelSpec.model_validate(loop_config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config.use_gpu:
        # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker reserved.
        torch.set_num_threads(max(1, math.floor(config.cpus_per_worker)))
    device = ray.train.torch.get_device()
    manifest = DatasetManifest.model_validate(loop_config["manifest"])
    state = build_train_state(config, device)
    start_step = restore_state(state, config)
    batches = worker_batches(config, manifest, rank, world, start_step, device)
    model = ray.train.torch.prepare_model(state.model)
    if config.compile:
        model = torch.compile(model)
    node_ids = _gather_node_ids(world)
    tracker = _open_tracker(loop_config, rank)
    has_labels = spec.unet.num_classes is not None
    loop = _WorkerLoop(config, spec, state, model, batches, has_labels, manifest.counts[TRAIN_SPLIT], rank,
                       world, tracker)
    try:
        loop.run(start_step, node_ids)
    finally:
        batches.close()  # stops this worker's Ray Data pipeline
        if tracker is not None:
            tracker.close()


def worker_batches(config: TrainConfig, manifest: DatasetManifest, rank: int, world: int, start_step: int,
                   device: torch.device) -> Generator[tuple[Tensor, Tensor], None, None]:
    """Worker `rank`'s batches from step `start_step` to the end of the run, streamed (data_order)."""
    from diffusion_core.adapters.ray_data import row_group_rows, stream_batches

    image_bytes = math.prod(manifest.image_shape)
    windows = training_windows(config, image_bytes, row_group_rows(config.dataset, TRAIN_SPLIT), rank, world,
                               start_step)
    logger.info("worker %d: %d windows from step %d (%d training images in the split)", rank, len(windows),
                start_step, manifest.counts[TRAIN_SPLIT])
    return stream_batches(config.dataset, TRAIN_SPLIT, windows, manifest,
                          batch_size=config.per_worker_batch_size, device=device)


def restore_state(state: TrainState, config: TrainConfig) -> int:
    """Load the latest checkpoint of this run (retry or rerun), else the warm-start weights; the
    step to start from."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_training_checkpoint(directory, state, config)
        logger.info("resumed from checkpoint at step %d", state.step)
    elif config.warm_start:
        load_weights(config.warm_start, state, config)
        logger.info("warm start from %s", config.warm_start)
    return state.step


def _gather_node_ids(world: int) -> list[str]:
    node_id = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [node_id]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, node_id)
    return [str(n) for n in gathered]


def _open_tracker(loop_config: dict[str, Any], rank: int):
    if rank != 0:
        return None
    from diffusion_core.adapters.mlflow_tracking import RankZeroTracker

    return RankZeroTracker(loop_config["tracking_uri"], loop_config["run_id"])


def _log_cadence(config: TrainConfig):
    from diffusion_core.adapters.mlflow_tracking import LogCadence

    return LogCadence(config.log_every, config.steps)


def _reduce_mean(world: int):
    def reduce(t: Tensor) -> Tensor:
        if world > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= world
        return t

    return reduce


class _WorkerLoop:
    """Steps, periodic logging, sample grids and checkpoint reports of one worker."""

    def __init__(self, config: TrainConfig, spec: ModelSpec, state: TrainState, model: torch.nn.Module,
                 batches: Iterator[tuple[Tensor, Tensor]], has_labels: bool, train_rows: int, rank: int,
                 world: int, tracker) -> None:
        self.config, self.spec, self.state, self.model = config, spec, state, model
        self.batches, self.has_labels, self.train_rows = batches, has_labels, train_rows
        self.rank, self.world, self.tracker = rank, world, tracker
        self.cadence = _log_cadence(config) if tracker is not None else None
        self.window_losses: list[float] = []
        self.window_start = time.perf_counter()
        self.window_step = 0

    def run(self, start_step: int, node_ids: list[str]) -> None:
        self.start_step = self.window_step = start_step
        self.loop_start = time.perf_counter()
        self.node_ids = ",".join(node_ids)
        while self.state.step < self.config.steps:
            try:
                result = self._step()
            except TrainingDivergedError:
                ray.train.report(self._metrics(diverged=True), checkpoint=None)
                return
            self._maybe_inject_fault()
            self._after_step(result)

    def _step(self):
        images, labels = next(self.batches)
        return train_step(self.state, self.config, images, labels if self.has_labels else None,
                          rank=self.rank, reduce_mean=_reduce_mean(self.world), model=self.model)

    def _after_step(self, result) -> None:
        step, config = self.state.step, self.config
        if self.tracker is not None:
            self._record(result)
        # The checkpoint first: a failure while sampling must not lose the step.
        if step % config.checkpoint_every == 0 or step == config.steps:
            self._checkpoint()
        if (config.sample_every and step % config.sample_every == 0) or step == config.steps:
            self._log_samples()

    def _record(self, result) -> None:
        """Rank 0: a point of the training curves whenever the cadence says so (LogCadence: every
        log_every steps, the last step, and at least every few seconds); a text line on schedule."""
        if not result.skipped:
            self.window_losses.append(result.loss)
        if self.cadence.due(self.state.step):
            self._log(result, announce=self.cadence.on_schedule(self.state.step))

    def _log(self, result, announce: bool) -> None:
        now = time.perf_counter()
        steps = self.state.step - self.window_step
        images_per_s = steps * self.config.batch_size / max(now - self.window_start, 1e-9)
        loss = sum(self.window_losses) / len(self.window_losses) if self.window_losses else float("nan")
        eta = (self.config.steps - self.state.step) * self.config.batch_size / max(images_per_s, 1e-9)
        self.tracker.log_metrics({
            "loss": loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "images_per_s": images_per_s, "nonfinite_steps": float(self.state.nonfinite_total),
        }, step=self.state.step)
        if announce:
            logger.info("step %d/%d  loss %.4f  %.0f images/s  ETA %.0fs", self.state.step,
                        self.config.steps, loss, images_per_s, eta)
        self.window_losses, self.window_start, self.window_step = [], now, self.state.step

    def _log_samples(self) -> None:
        if self.tracker is None:
            return
        grid = sample_grid(self.state, self.spec, self.config)
        self.tracker.log_image(grid, key=SAMPLES_IMAGE_KEY, step=self.state.step)

    def _metrics(self, diverged: bool = False) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.loop_start
        return {
            "step": self.state.step, "start_step": self.start_step,
            "epochs": self.state.step * self.config.batch_size / self.train_rows,
            "nonfinite_total": self.state.nonfinite_total,
            "nonfinite_streak": self.state.nonfinite_streak, "diverged": diverged,
            "world_size": self.world, "worker_node_ids": self.node_ids,
            "train_seconds": elapsed,
            "images_per_s": (self.state.step - self.start_step) * self.config.batch_size / max(elapsed, 1e-9),
        }

    def _checkpoint(self) -> None:
        metrics = self._metrics()
        name = f"checkpoint_{self.state.step:07d}"
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                path = save_training_checkpoint(Path(tmp) / name, self.state, self.config, self.spec)
                checkpoint = ray.train.Checkpoint.from_directory(str(path))
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def _maybe_inject_fault(self) -> None:
        fault = self.config.fault_injection
        if fault is None or self.state.step != fault.at_step or self.rank != fault.rank:
            return
        marker = Path(fault.marker_path)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"fired at step {self.state.step}\n")
        raise RuntimeError(f"fault_injection: injected failure at step {self.state.step}")


def sample_grid(state: TrainState, spec: ModelSpec, config: TrainConfig) -> Any:
    """A uint8 (H, W, C) grid of samples from the EMA weights, generated as a loaded checkpoint would
    (LoadedModel.generate: same sampler call and value-range mapping), enlarged to be readable
    (image_grids.readable_grid). Class-conditional models get label i % num_classes for image i:
    one column per class, under the class's name."""
    loaded = LoadedModel(state.ema.averaged_model(state.model), spec, weights="ema")
    n, num_classes = config.num_sample_images, spec.unet.num_classes
    labels = torch.arange(n) % num_classes if num_classes else None
    images = loaded.generate(n, steps=config.sample_steps, sampler=config.sampler,
                             seeds=list(range(n)), labels=labels)
    return readable_grid(to_uint8(images), labels=None if labels is None else labels.tolist(),
                         label_names=spec.data.label_names)
