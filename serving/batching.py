"""Packing many generation requests into few homogeneous reverse-sampling runs, and back.

`@serve.batch` hands the model deployment a list of requests (it counts requests, not images). A
run of the sampler must share its settings (sampler, steps, guidance, eta, and whether labels are
given), so requests are grouped by those settings, their images are concatenated in arrival order
and cut into runs of at most `max_images` images; a large request may span several runs. Because the
sampler draws each image's noise from its own seed (`samplers.sample`), the images do not depend on
how they were packed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


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
