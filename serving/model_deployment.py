"""The model deployment: loads a checkpoint from the MLflow registry and runs batched reverse sampling.

Requests arrive one `GenerationJob` per call; `@serve.batch` collects them for up to
`batch_wait_timeout_s` or until their images reach `max_images_per_batch` (it counts images through
`batch_size_fn`, not requests). Serve closes batches while the model is still busy with an earlier
one, so each closed batch hands its requests to a `batching.RunCoalescer`: the next batch to get the
model takes every request waiting, oldest first, up to `max_images_per_batch` images, so whatever
queued during a run is sampled together. `batching.plan_runs` packs those images into homogeneous
sampler runs and the results are split back per request. A single request larger than the limit (up
to max_images_per_request) is sampled alone, as several runs one after another. Sampling runs in a
worker thread so that the replica keeps accepting requests and answering health checks meanwhile.

Hot swap: Serve calls `reconfigure(user_config)` when the deployment's user_config changes. The new
model loads in a thread while the old one keeps serving; the reference is then replaced in one
assignment. A batch holds the model it started with, so in-flight requests finish on the old version
and later ones use the new one. A failed swap keeps the old model (and is shown by GET /model);
only a replica that has never loaded a model fails to start.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import numpy as np
import ray
import torch
from ray import serve

from diffusion_core.adapters.mlflow_registry import numeric_tags
from diffusion_core.checkpoint import LoadedModel, load_checkpoint
from diffusion_core.errors import ConfigError
from serving.batching import (
    GenerationJob,
    Run,
    RunCoalescer,
    largest_run_per_job,
    plan_runs,
    scatter_results,
)
from serving.config import MODEL_DEPLOYMENT, ModelDeploymentConfig, ModelSelection, settings_default
from serving.schemas import ModelInfo, ModelRef, ReplicaLoadState
from serving.validation import label_errors

logger = logging.getLogger(__name__)

# How many closed Serve batches may hand their requests to the RunCoalescer at once; one sampling run
# happens at a time regardless. Each batch holds at least one request, so any bound at or above the
# deployment's max_ongoing_requests means no batch ever waits outside the coalescer.
MAX_WAITING_BATCHES = 4096


class _BatchBoundWarningFilter(logging.Filter):
    """Serve warns when max_batch_size * max_concurrent_batches exceeds max_ongoing_requests, assuming
    the batches run concurrently; here they only wait for the coalescer, so the warning is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`max_concurrent_batches`" not in record.getMessage()


@dataclass(frozen=True)
class JobOutcome:
    """The answer to one GenerationJob: images (N, C, H, W) float32 in [0, 1], or an error message."""

    model: ModelRef
    images: np.ndarray | None = None
    error: str | None = None
    queue_s: float = 0.0
    sampling_s: float = 0.0
    batch_images: int = 0
    batch_total_images: int = 0


@dataclass(frozen=True)
class ServedModel:
    loaded: LoadedModel
    info: ModelInfo
    selection: ModelSelection
    device: str

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.info.name, version=self.info.version, alias=self.info.alias)


@dataclass(frozen=True)
class _Pending:
    """A job waiting in `@serve.batch`'s queue; `weight` is what it counts for towards max_batch_size."""

    job: GenerationJob
    arrived: float
    weight: int


def batch_weight(pending: list[_Pending]) -> int:
    """`@serve.batch`'s batch_size_fn: the images of a batch, a request counting at most
    max_images_per_batch (Serve refuses a single item heavier than max_batch_size)."""
    return sum(p.weight for p in pending)


def _describe(selection: ModelSelection, version: str | None, source: str, tags: dict[str, str],
              loaded: LoadedModel, device: str) -> ModelInfo:
    spec = loaded.spec
    return ModelInfo(
        name=selection.model_name, version=version, alias=selection.alias, source=source,
        metrics=numeric_tags(tags), tags=tags,
        image_shape=[spec.data.channels, spec.data.image_size, spec.data.image_size],
        num_classes=spec.unet.num_classes, label_names=spec.data.label_names,
        prediction=spec.objective.prediction, weights=loaded.weights, device=device, loaded_at=time.time(),
    )


def load_served_model(config: ModelDeploymentConfig) -> ServedModel:
    """Resolve and load the model of `config` (blocking: downloads from the registry when needed)."""
    selection = config.model
    if selection.checkpoint_dir is not None:
        loaded = load_checkpoint(selection.checkpoint_dir, device=config.device)
        info = _describe(selection, selection.version, selection.checkpoint_dir, {}, loaded, config.device)
        return ServedModel(loaded, info, selection, config.device)
    from diffusion_core.adapters.mlflow_registry import download_checkpoint, get_version, resolve_version

    if selection.version is not None:
        version = get_version(selection.model_name, selection.version, selection.tracking_uri)
    else:
        version = resolve_version(selection.model_name, selection.alias, selection.tracking_uri)
    local = download_checkpoint(version.model_uri, tracking_uri=selection.tracking_uri)
    try:
        loaded = load_checkpoint(local, device=config.device)
    finally:
        shutil.rmtree(local, ignore_errors=True)  # the weights are in memory now
    info = _describe(selection, version.version, version.model_uri, version.tags, loaded, config.device)
    logger.info("loaded %s (%s) on %s", version.model_uri, selection.alias, config.device)
    return ServedModel(loaded, info, selection, config.device)


def sample_run(loaded: LoadedModel, run: Run) -> np.ndarray:
    """One reverse-sampling run: (run.num_images, C, H, W) float32 in [0, 1]."""
    key = run.key
    images = loaded.generate(run.num_images, steps=key.steps, sampler=key.sampler, seeds=run.seeds,
                             labels=run.labels, guidance_scale=key.guidance_scale, eta=key.eta)
    return images.numpy()


def sample_runs(loaded: LoadedModel, runs: list[Run]) -> list[np.ndarray | str]:
    """Each run's images, or the sampler's ConfigError message for a run it refused."""
    outputs: list[np.ndarray | str] = []
    for run in runs:
        try:
            outputs.append(sample_run(loaded, run))
        except ConfigError as err:
            outputs.append(str(err))
    return outputs


def _replica_cpu_threads() -> int:
    """Torch threads = the CPUs Serve gave this replica (Ray sets OMP_NUM_THREADS=1 in workers)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


# Queue bounds and user_config are set by serving.app.build_app from ServeSettings.
@serve.deployment(name=MODEL_DEPLOYMENT)
class DiffusionModel:
    """Serves one model version at a time; see the module docstring for batching and hot swap."""

    def __init__(self) -> None:
        torch.set_num_threads(_replica_cpu_threads())
        logging.getLogger("ray.serve").addFilter(_BatchBoundWarningFilter())  # where @serve.batch logs
        self._served: ServedModel | None = None
        self._config: ModelDeploymentConfig | None = None
        self._last_load_error: str | None = None
        self._failed_selection: ModelSelection | None = None  # what the failed load was asked for
        self._swap_lock = asyncio.Lock()
        self._runs: RunCoalescer[_Pending, JobOutcome] = RunCoalescer(weight=attrgetter("weight"))

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = ModelDeploymentConfig.model_validate(user_config)
        self._generate_batch.set_max_batch_size(config.max_images_per_batch)
        self._generate_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        async with self._swap_lock:
            self._config = config
            served = self._served
            if served is None or (served.selection, served.device) != (config.model, config.device):
                await self._swap_model(config)

    async def _swap_model(self, config: ModelDeploymentConfig) -> None:
        try:
            served = await asyncio.to_thread(load_served_model, config)
        except Exception as err:
            if self._served is None:
                raise  # nothing to serve: let Serve fail and retry this replica
            self._last_load_error = f"{type(err).__name__}: {err}"
            self._failed_selection = config.model
            logger.exception("hot swap to %s failed; still serving %s", config.model, self._served.ref)
            return
        old, self._served = self._served, served
        self._last_load_error = self._failed_selection = None
        logger.info("now serving %s (was %s)", served.ref, old.ref if old else None)

    def check_health(self) -> None:
        if self._served is None:
            raise RuntimeError("no model loaded")

    async def describe(self) -> ModelInfo:
        self.check_health()
        replica = serve.get_replica_context().replica_id.unique_id
        return self._served.info.model_copy(update={"last_load_error": self._last_load_error,
                                                    "replica": replica})

    async def load_state(self) -> ReplicaLoadState:
        """This replica's model and the selection of its last failed load (control.wait_for_model)."""
        return ReplicaLoadState(info=await self.describe(), failed_selection=self._failed_selection)

    async def generate(self, job: GenerationJob) -> JobOutcome:
        weight = min(job.num_images, self._config.max_images_per_batch)
        return await self._generate_batch(_Pending(job, time.perf_counter(), weight))

    @serve.batch(max_batch_size=settings_default("max_images_per_batch"),
                 batch_wait_timeout_s=settings_default("batch_wait_timeout_s"), batch_size_fn=batch_weight,
                 max_concurrent_batches=MAX_WAITING_BATCHES)
    async def _generate_batch(self, pending: list[_Pending]) -> list[JobOutcome]:
        return await self._runs.run(pending, self._config.max_images_per_batch, self._sample)

    async def _sample(self, pending: list[_Pending]) -> list[JobOutcome]:
        """One sampling turn for `pending` (possibly from several Serve batches)."""
        served = self._served  # a swap during this turn affects the next one
        started = time.perf_counter()
        num_classes = served.loaded.spec.unet.num_classes
        errors = ["; ".join(label_errors(p.job.labels, num_classes)) for p in pending]
        valid = [i for i, e in enumerate(errors) if not e]
        jobs = [pending[i].job for i in valid]
        runs = plan_runs(jobs, self._config.max_images_per_batch)
        outputs = await asyncio.to_thread(sample_runs, served.loaded, runs)
        sampling_s = time.perf_counter() - started
        done = [(run, out) for run, out in zip(runs, outputs, strict=True) if not isinstance(out, str)]
        for run, out in zip(runs, outputs, strict=True):
            if isinstance(out, str):  # a setting the sampler refused: fail only this run's jobs
                for job_index, _ in run.slots:
                    errors[valid[job_index]] = out
        images = scatter_results(jobs, *zip(*done, strict=True)) if done else []
        sizes = largest_run_per_job(len(jobs), runs)
        total = sum(run.num_images for run in runs)
        outcomes = [JobOutcome(served.ref, error=e) for e in errors]
        for k, i in enumerate(valid):
            if not errors[i]:
                outcomes[i] = JobOutcome(served.ref, images=images[k], queue_s=started - pending[i].arrived,
                                         sampling_s=sampling_s, batch_images=sizes[k],
                                         batch_total_images=total)
        logger.debug("batch: %d requests, %d runs, %.3fs", len(pending), len(runs), sampling_s)
        return outcomes
