"""Packing many generation requests into few homogeneous reverse-sampling runs, and back.

`@serve.batch` hands the model deployment a list of requests (it counts requests, not images). A
run of the sampler must share its settings (sampler, steps, guidance, eta, and whether labels are
given), so requests are grouped by those settings, their images are concatenated in arrival order
and cut into runs of at most `max_images` images; a large request may span several runs. Because the
sampler draws each image's noise from its own seed (`samplers.sample`), the images do not depend on
how they were packed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class RunKey:
    """Settings that every image of one sampler run shares."""

    sampler: str
    steps: int
    guidance_scale: float
    eta: float
    conditional: bool


@dataclass(frozen=True)
class GenerationJob:
    """One validated request as the model deployment sees it: image i uses seeds[i] (and labels[i])."""

    steps: int
    sampler: str
    guidance_scale: float
    eta: float
    seeds: tuple[int, ...]
    labels: tuple[int, ...] | None = None

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def run_key(self) -> RunKey:
        return RunKey(self.sampler, self.steps, self.guidance_scale, self.eta, self.labels is not None)


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


def plan_runs(jobs: Sequence[GenerationJob], max_images: int) -> list[Run]:
    """Group `jobs` by RunKey (in order of first arrival) and cut each group into runs of at most
    `max_images` images, keeping arrival order inside a group."""
    if max_images < 1:
        raise ValueError(f"max_images: must be >= 1, got {max_images}")
    groups: dict[RunKey, list[Run]] = {}
    for job_index, job in enumerate(jobs):
        runs = groups.setdefault(job.run_key, [])
        for image_index, seed in enumerate(job.seeds):
            if not runs or runs[-1].num_images == max_images:
                runs.append(Run(job.run_key, labels=[] if job.labels is not None else None))
            run = runs[-1]
            run.slots.append((job_index, image_index))
            run.seeds.append(seed)
            if run.labels is not None:
                run.labels.append(job.labels[image_index])
    return [run for runs in groups.values() for run in runs]


def scatter_results(
    jobs: Sequence[GenerationJob], runs: Sequence[Run], outputs: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Reassemble per-run outputs (each (run.num_images, C, H, W)) into one array per job, shaped
    (job.num_images, C, H, W), with images in the job's seed order."""
    if len(runs) != len(outputs):
        raise ValueError(f"outputs: expected {len(runs)} arrays (one per run), got {len(outputs)}")
    image_shape = outputs[0].shape[1:]
    per_job = [np.empty((job.num_images, *image_shape), dtype=outputs[0].dtype) for job in jobs]
    for run, images in zip(runs, outputs, strict=True):
        for (job_index, image_index), image in zip(run.slots, images, strict=True):
            per_job[job_index][image_index] = image
    return per_job


def largest_run_per_job(num_jobs: int, runs: Sequence[Run]) -> list[int]:
    """For each job, the image count of the largest run it took part in (reported in timings)."""
    sizes = [0] * num_jobs
    for run in runs:
        for job_index in {job_index for job_index, _ in run.slots}:
            sizes[job_index] = max(sizes[job_index], run.num_images)
    return sizes


class RunCoalescer(Generic[Item, Result]):
    """One sampler run at a time, each taking everything that waits for the model (oldest first).

    Ray Serve's `@serve.batch` closes a batch when its wait window ends, even while the previous
    batch is still sampling, and the closed batches then queue one behind the other. Under sustained
    load every batch is thus only what arrives in one window: measured at 32 concurrent 1-image
    clients, 6-8 images where 32 were allowed. With `@serve.batch(max_concurrent_batches=...)` large,
    each closed batch instead hands its items here (`run`); whichever batch gets the model next
    takes every waiting item, oldest first, up to `max_weight` (never skipping one, so nothing
    starves), and answers them all. What piles up during one run goes into the next one together.
    """

    def __init__(self, weight: Callable[[Item], int]) -> None:
        """`weight(item)` is what an item counts towards a run's `max_weight` (its images)."""
        self._weight = weight
        self._waiting: deque[tuple[Item, asyncio.Future]] = deque()
        self._model = asyncio.Lock()

    async def run(self, items: Sequence[Item], max_weight: int,
                  sample: Callable[[list[Item]], Awaitable[list[Result]]]) -> list[Result]:
        """The results of `items` (in order), computed by `sample` together with whatever else waits.

        An exception raised by `sample` is raised for every item of that run, here or in the batch
        that submitted it.
        """
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._waiting.extend(zip(items, futures, strict=True))
        while not all(f.done() for f in futures):
            async with self._model:
                taken = self._take(max_weight)
                if taken:
                    await self._sample(taken, sample)
        return [f.result() for f in futures]

    def _take(self, max_weight: int) -> list[tuple[Item, asyncio.Future]]:
        taken, weight = [], 0
        while self._waiting and (not taken or weight + self._weight(self._waiting[0][0]) <= max_weight):
            entry = self._waiting.popleft()
            taken.append(entry)
            weight += self._weight(entry[0])
        return taken

    @staticmethod
    async def _sample(taken: list[tuple[Item, asyncio.Future]],
                      sample: Callable[[list[Item]], Awaitable[list[Result]]]) -> None:
        futures = [future for _, future in taken]
        try:
            results = await sample([item for item, _ in taken])
            for future, result in zip(futures, results, strict=True):
                if not future.done():
                    future.set_result(result)
        except asyncio.CancelledError:
            # The batch running this was cancelled: the other batches' items must not wait forever.
            _fail(futures, RuntimeError("the sampling run was cancelled"))
            raise
        except Exception as err:  # noqa: BLE001 - re-raised for each item by its own batch
            _fail(futures, err)


def _fail(futures: list[asyncio.Future], err: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(err)

