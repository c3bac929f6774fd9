"""The model replica's one batcher: a FIFO queue of jobs, one sampler run at a time.

- Turns. When the model is free and jobs wait, a turn starts as soon as the waiting images reach
  `max_images`, or `wait_s` after the later of "the model became free" and "the oldest job
  arrived". Jobs that arrive while a run samples wait for the next turn together (continuous
  batching), so steady traffic batches without any wait; `wait_s` (0 by default) only holds an
  idle model back for requests expected to arrive together.
- Order. A turn takes the waiting jobs oldest first up to `max_images` images, never skipping one
  (so nothing starves); the oldest is taken even when it alone is larger, and is then sampled as
  several runs.
- Labels. A turn resolves each job's labels with the model it samples with (`TurnModel.labels_for`:
  e.g. classes drawn from the class prior by seed for a request that gave none), so the labels
  always fit that model and the answer reports the ones used; a job they do not fit fails
  ("invalid").
- Runs. A sampler run shares its settings (`RunKey`), so a turn's images are grouped by settings
  in arrival order and cut into runs of at most `max_images` (`plan_runs`). The sampler draws each
  image's noise from its own seed (`samplers.sample`), so an image does not depend on how it was
  packed. Runs execute in a worker thread: the replica keeps answering calls and health checks.
- Cancellation. A job whose caller goes away (the HTTP client disconnects, or the ingress times
  out: Serve then cancels the call) leaves the queue at once, and its images are removed from
  every run of its turn that has not started.
- Admission by work (image-steps, the unit of `max_work`). A job is refused (`Failure`
  "overloaded", with a Retry-After estimate) when the work queued ahead of it plus its own would
  not finish within `horizon_s` at the rate of recent runs (`WorkRate`). An empty queue admits any
  job.
- Model outputs must be finite: a job with a non-finite image fails ("model_output"), and
  `failing_runs` counts consecutive runs that failed by the model's fault (the replica's health
  check reads it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from diffusion_core.errors import ConfigError
from serving.jobs import Failure, Generated, GenerationJob, JobResult, SamplingTimings
from serving.schemas import ModelRef

logger = logging.getLogger(__name__)

# Image-steps per second assumed before the first run is measured: about what one CPU samples with
# the default digits model at batch 1 (benchmarks/serve.py: ~20 images/s at 20 steps), so an early
# burst is admitted conservatively; the first finished run replaces it.
PRIOR_WORK_PER_S = 400.0
RATE_WINDOW_RUNS = 16


@dataclass(frozen=True)
class RunKey:
    """Settings that every image of one sampler run shares."""

    sampler: str
    steps: int
    guidance_scale: float
    eta: float
    conditional: bool


def run_key(job: GenerationJob) -> RunKey:
    return RunKey(job.sampler, job.steps, job.guidance_scale, job.eta, job.labels is not None)


@dataclass
class Run:
    """One sampler call: image k is image `slots[k][1]` of job `slots[k][0]`."""

    key: RunKey
    slots: list[tuple[int, int]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    labels: list[int] | None = None

    @property
    def num_images(self) -> int:
        return len(self.slots)

    @property
    def work(self) -> int:
        return self.num_images * self.key.steps

    def without(self, jobs: set[int]) -> Run:
        """This run less the images of `jobs` (indices into the planned job list)."""
        keep = [k for k, (job_index, _) in enumerate(self.slots) if job_index not in jobs]
        return Run(self.key, [self.slots[k] for k in keep], [self.seeds[k] for k in keep],
                   None if self.labels is None else [self.labels[k] for k in keep])


def plan_runs(jobs: Sequence[GenerationJob], max_images: int) -> list[Run]:
    """Group `jobs` by RunKey (in order of first arrival) and cut each group into runs of at most
    `max_images` images, keeping arrival order inside a group."""
    if max_images < 1:
        raise ValueError(f"max_images: must be >= 1, got {max_images}")
    groups: dict[RunKey, list[Run]] = {}
    for job_index, job in enumerate(jobs):
        key = run_key(job)
        runs = groups.setdefault(key, [])
        for image_index, seed in enumerate(job.seeds):
            if not runs or runs[-1].num_images == max_images:
                runs.append(Run(key, labels=[] if job.labels is not None else None))
            run = runs[-1]
            run.slots.append((job_index, image_index))
            run.seeds.append(seed)
            if run.labels is not None:
                run.labels.append(job.labels[image_index])
    return [run for runs in groups.values() for run in runs]


class WorkRate:
    """Image-steps per second over the last `window` runs (total work / total time), or `prior`
    before any run."""

    def __init__(self, prior: float = PRIOR_WORK_PER_S, window: int = RATE_WINDOW_RUNS) -> None:
        self._prior = prior
        self._runs: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, work: int, seconds: float) -> None:
        self._runs.append((work, max(seconds, 1e-6)))

    def per_second(self) -> float:
        if not self._runs:
            return self._prior
        return sum(w for w, _ in self._runs) / sum(s for _, s in self._runs)


def admission(queued_work: int, work: int, rate: float, horizon_s: float) -> float | None:
    """None to admit `work` behind `queued_work`; else the seconds until enough of the queue has
    been sampled at `rate` for it to fit within `horizon_s` (at least 1)."""
    excess = queued_work + work - rate * horizon_s
    if queued_work == 0 or excess <= 0:
        return None
    return max(1.0, math.ceil(excess / rate))


class TurnModel(Protocol):
    """The model a turn samples with, taken when the turn starts (a hot swap affects later turns)."""

    ref: ModelRef

    def labels_for(self, job: GenerationJob) -> tuple[int, ...] | None:
        """The labels the job's images are sampled with; ConfigError when the job does not fit."""
        ...

    def sample(self, run: Run) -> np.ndarray:
        """(run.num_images, C, H, W) float32 in [0, 1]; blocking (runs in a worker thread)."""
        ...


@dataclass(frozen=True)
class BatcherStats:
    queued_jobs: int
    queued_work: int
    work_per_s: float
    runs: int
    images_sampled: int
    jobs_cancelled: int
    jobs_refused: int
    failing_runs: int


@dataclass(eq=False)
class _Waiting:
    job: GenerationJob
    arrived: float
    future: asyncio.Future[JobResult]
    images: np.ndarray | None = None
    filled: int = 0
    largest_run: int = 0
    settled: bool = False


class Batcher:
    """See the module docstring. Use from one event loop (the replica's)."""

    def __init__(self, model: Callable[[], TurnModel], max_images: int, wait_s: float,
                 horizon_s: float, rate: WorkRate | None = None) -> None:
        """`model()` returns the model to sample the next turn with."""
        self._model = model
        self.configure(max_images, wait_s, horizon_s)
        self._rate = rate or WorkRate()
        self._queue: deque[_Waiting] = deque()
        self._queued_work = 0
        self._wake = asyncio.Event()
        self._free_since = -math.inf
        self._worker: asyncio.Task | None = None
        self._counts = {"runs": 0, "images_sampled": 0, "jobs_cancelled": 0, "jobs_refused": 0}
        self.failing_runs = 0

    def configure(self, max_images: int, wait_s: float, horizon_s: float) -> None:
        """New limits; they apply from the next turn."""
        if max_images < 1:
            raise ValueError(f"max_images: must be >= 1, got {max_images}")
        self._max_images, self._wait_s, self._horizon_s = max_images, wait_s, horizon_s

    def stats(self) -> BatcherStats:
        return BatcherStats(queued_jobs=len(self._queue), queued_work=self._queued_work,
                            work_per_s=self._rate.per_second(), failing_runs=self.failing_runs,
                            **self._counts)

    async def submit(self, job: GenerationJob) -> JobResult:
        """The job's images once its turn has sampled them, or why not."""
        retry_after = admission(self._queued_work, job.work, self._rate.per_second(), self._horizon_s)
        if retry_after is not None:
            self._counts["jobs_refused"] += 1
            return Failure("overloaded", "overloaded: the queued work would not finish within the "
                           "request timeout; retry later", retry_after_s=retry_after)
        waiting = _Waiting(job, time.monotonic(), asyncio.get_running_loop().create_future())
        self._queue.append(waiting)
        self._queued_work += job.work
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        try:
            return await waiting.future
        except asyncio.CancelledError:
            self._cancel(waiting)
            raise

    def _cancel(self, waiting: _Waiting) -> None:
        """The caller went away: out of the queue now; a turn that holds it skips its images."""
        if not waiting.settled:
            self._counts["jobs_cancelled"] += 1
        if waiting in self._queue:
            self._queue.remove(waiting)
        self._settle(waiting)

    def _settle(self, waiting: _Waiting, result: JobResult | None = None) -> None:
        if result is not None and not waiting.future.done():
            waiting.future.set_result(result)
        if not waiting.settled:
            waiting.settled = True
            self._queued_work -= waiting.job.work

    async def _work(self) -> None:
        while True:
            taken = await self._next_turn()
            if not taken:
                continue
            try:
                await self._turn(taken)
            except Exception:
                logger.exception("sampling turn failed")
                for waiting in taken:
                    self._settle(waiting, Failure("model_error", "model: sampling failed; see the "
                                                  "replica's log"))
            self._free_since = time.monotonic()

    async def _next_turn(self) -> list[_Waiting]:
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
        start = max(self._queue[0].arrived, self._free_since) + self._wait_s
        while self._queue and self._waiting_images() < self._max_images:
            remaining = start - time.monotonic()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
        return self._take()

    def _waiting_images(self) -> int:
        return sum(waiting.job.num_images for waiting in self._queue)

    def _take(self) -> list[_Waiting]:
        taken, images = [], 0
        while self._queue and (not taken or images + self._queue[0].job.num_images <= self._max_images):
            waiting = self._queue.popleft()
            taken.append(waiting)
            images += waiting.job.num_images
        return taken

    async def _turn(self, taken: list[_Waiting]) -> None:
        model, started = self._model(), time.monotonic()
        for waiting in taken:
            self._resolve_labels(model, waiting)
        runs = plan_runs([waiting.job for waiting in taken], self._max_images)
        total = sum(run.num_images for run in runs)
        for planned in runs:
            run = planned.without({i for i, waiting in enumerate(taken) if waiting.future.done()})
            if run.num_images == 0:
                continue  # every job of this run was cancelled or has failed
            images = await self._sample(model, run, taken)
            if images is not None:
                self._fill(run, images, taken, model.ref, started, total)

    def _resolve_labels(self, model: TurnModel, waiting: _Waiting) -> None:
        """The job with the labels `model` samples it with, or settled as invalid."""
        try:
            labels = model.labels_for(waiting.job)
        except ConfigError as err:
            self._settle(waiting, Failure("invalid", str(err)))
            return
        waiting.job = dataclasses.replace(waiting.job, labels=labels)

    async def _sample(self, model: TurnModel, run: Run, taken: list[_Waiting]) -> np.ndarray | None:
        """The run's images, or None after failing its jobs."""
        run_started = time.monotonic()
        try:
            images = await asyncio.to_thread(model.sample, run)
        except ConfigError as err:  # the sampler refused these settings: the request's fault
            self._fail(run, taken, Failure("invalid", str(err)))
            return None
        except Exception as err:
            logger.exception("sampling run of %d images failed", run.num_images)
            self.failing_runs += 1
            self._fail(run, taken, Failure("model_error", f"model: sampling failed ({type(err).__name__})"))
            return None
        self._rate.observe(run.work, time.monotonic() - run_started)
        self._counts["runs"] += 1
        self._counts["images_sampled"] += run.num_images
        finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
        self.failing_runs = 0 if finite.all() else self.failing_runs + 1
        bad_jobs = {job_index for (job_index, _), ok in zip(run.slots, finite, strict=True) if not ok}
        if bad_jobs:
            logger.error("the model produced non-finite values for %d of %d images", int((~finite).sum()),
                         run.num_images)
            self._fail(run, taken, Failure("model_output", "model: the sampler produced non-finite values "
                                           "(NaN or infinity); the served model version is broken"),
                       only=bad_jobs)
        return images

    def _fail(self, run: Run, taken: list[_Waiting], failure: Failure, only: set[int] | None = None) -> None:
        for job_index in {job_index for job_index, _ in run.slots}:
            if only is None or job_index in only:
                self._settle(taken[job_index], failure)

    def _fill(self, run: Run, images: np.ndarray, taken: list[_Waiting], ref: ModelRef, started: float,
              total: int) -> None:
        """Copy the run's images into their jobs; answer each job whose images are all there."""
        for (job_index, image_index), image in zip(run.slots, images, strict=True):
            waiting = taken[job_index]
            if waiting.future.done():
                continue
            if waiting.images is None:
                waiting.images = np.empty((waiting.job.num_images, *images.shape[1:]), dtype=images.dtype)
            waiting.images[image_index] = image
            waiting.filled += 1
            waiting.largest_run = max(waiting.largest_run, run.num_images)
            if waiting.filled == waiting.job.num_images:
                now = time.monotonic()
                timings = SamplingTimings(queue_s=started - waiting.arrived, sampling_s=now - started,
                                          model_s=now - waiting.arrived, batch_images=waiting.largest_run,
                                          batch_total_images=total)
                self._settle(waiting, Generated(ref, waiting.images, timings, waiting.job.labels))
