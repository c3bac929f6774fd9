"""The model deployment: loads a checkpoint from the MLflow registry and samples batched requests.

`generate(job)` checks the job's labels against the loaded model and hands it to the replica's one
`batching.Batcher`, which owns the queue: the wait window, the image cap per run, FIFO order,
cancellation and admission by work (see serving/batching.py). Results are typed (`serving.jobs`).

Labels: a request without labels for a class-conditional model samples the model's marginal: each
image's class is drawn from the training data's class prior by that image's seed
(`LoadedModel.default_labels`; the reasoning is in diffusion_core/class_prior.py), so an image is
the same alone or inside a merged batch. `unconditional` (or label -1 per image) asks for the null
label instead. The labels are resolved when a batcher turn takes the model, so they always come
from the model that samples them, and the answer reports them.

Hot swap: Serve calls `reconfigure(user_config)` when the deployment's user_config changes (the
version is pinned there: serving/pinning.py). The new model loads in a thread while the old one
keeps serving; the reference is then replaced in one assignment. A batcher turn takes the model
when it starts, so in-flight requests finish on the old version and later ones use the new one.
A replica that cannot load the version its user_config names raises from `reconfigure`: Serve then
retires it (its queued requests finish on the old model) and starts a replacement that loads the
pinned version, or marks the deployment failed, which the switch reports. No replica goes on
serving a version other than the one its deployment pins.

Health: Serve's health check fails while no model is loaded, and after `UNHEALTHY_AFTER_FAILED_RUNS`
consecutive sampling runs failed by the model's fault (non-finite output or an exception).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray import serve

from diffusion_core.adapters.mlflow_registry import numeric_tags
from diffusion_core.checkpoint import LoadedModel, load_checkpoint
from diffusion_core.class_prior import uniform_prior
from diffusion_core.errors import ConfigError
from diffusion_core.sampling_defaults import NULL_LABEL, check_labels
from serving.batching import Batcher, BatcherStats, Run
from serving.config import MODEL_DEPLOYMENT, ModelDeploymentConfig, ModelSelection
from serving.jobs import Failure, GenerationJob, JobResult
from serving.schemas import ModelInfo, ModelRef

logger = logging.getLogger(__name__)

# A model that fails this many runs in a row is reported unhealthy, so that Serve replaces the replica
# and its status shows the fault; one bad run (e.g. an extreme guidance scale) is not enough.
UNHEALTHY_AFTER_FAILED_RUNS = 3


@dataclass(frozen=True)
class ServedModel:
    loaded: LoadedModel
    info: ModelInfo
    selection: ModelSelection
    device: str

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.info.name, version=self.info.version, alias=self.info.alias)

    def labels_for(self, job: GenerationJob) -> tuple[int, ...] | None:
        """The labels `job` is sampled with (see the module docstring); None for a model without
        classes. ConfigError (naming the rule, never a value) when its labels do not fit the model."""
        num_classes = self.loaded.spec.unet.num_classes
        check_labels(job.labels, job.num_images, num_classes)
        if job.labels is not None or num_classes is None:
            return job.labels
        if job.unconditional:
            return (NULL_LABEL,) * job.num_images
        return tuple(self.loaded.default_labels(job.seeds))

    def sample(self, run: Run) -> np.ndarray:
        """One reverse-sampling run: (run.num_images, C, H, W) float32 numpy in [0, 1]."""
        key = run.key
        images = self.loaded.generate(run.num_images, steps=key.steps, sampler=key.sampler, seeds=run.seeds,
                                      labels=run.labels, guidance_scale=key.guidance_scale, eta=key.eta)
        return images.numpy()


def _describe(selection: ModelSelection, version: str | None, source: str, tags: dict[str, str],
              loaded: LoadedModel, device: str) -> ModelInfo:
    spec = loaded.spec
    num_classes = spec.unet.num_classes
    return ModelInfo(
        name=selection.model_name, version=version, alias=selection.alias, source=source,
        metrics=numeric_tags(tags), tags=tags,
        image_shape=[spec.data.channels, spec.data.image_size, spec.data.image_size],
        num_classes=num_classes, label_names=spec.data.label_names,
        class_prior=None if num_classes is None else spec.data.class_prior or uniform_prior(num_classes),
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
        self._served: ServedModel | None = None
        self._swap_lock = asyncio.Lock()
        # reconfigure, which Serve calls before the first request, sets the configured limits
        self._batcher = Batcher(lambda: self._served, max_images=1, wait_s=0.0, horizon_s=1.0)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = ModelDeploymentConfig.model_validate(user_config)
        self._batcher.configure(config.max_images_per_batch, config.batch_wait_timeout_s,
                                config.request_timeout_s)
        async with self._swap_lock:
            served = self._served
            if served is None or (served.selection, served.device) != (config.model, config.device):
                await self._swap_model(config)

    async def _swap_model(self, config: ModelDeploymentConfig) -> None:
        try:
            served = await asyncio.to_thread(load_served_model, config)
        except Exception:
            if self._served is not None:
                logger.exception("cannot load %s; this replica fails so that Serve replaces it rather "
                                 "than let it serve %s", config.model, self._served.ref)
            raise
        old, self._served = self._served, served
        logger.info("now serving %s (was %s)", served.ref, old.ref if old else None)

    def check_health(self) -> None:
        if self._served is None:
            raise RuntimeError("no model loaded")
        if self._batcher.failing_runs >= UNHEALTHY_AFTER_FAILED_RUNS:
            raise RuntimeError(f"the last {self._batcher.failing_runs} sampling runs failed (non-finite "
                               "output or an error): the model is broken")

    async def describe(self) -> ModelInfo:
        if self._served is None:
            raise RuntimeError("no model loaded")
        replica = serve.get_replica_context().replica_id.unique_id
        return self._served.info.model_copy(update={"replica": replica})

    async def stats(self) -> BatcherStats:
        """The batcher's queue, measured rate and counters (operations and tests)."""
        return self._batcher.stats()

    async def generate(self, job: GenerationJob) -> JobResult:
        try:  # refused at once against the model loaded now; the turn resolves them with its model
            self._served.labels_for(job)
        except ConfigError as err:
            return Failure("invalid", str(err))
        return await self._batcher.submit(job)
