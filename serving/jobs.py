"""What the ingress sends the model deployment, and the typed result it gets back (no torch here).

A `GenerationJob` is a validated request with its seeds drawn and the server's defaults filled in.
The answer is `Generated` (images and where the time went) or `Failure` (a kind and a message that
names the field or the cause, never a value taken from the request). serving.ingress maps each
failure kind to one HTTP status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from serving.schemas import ModelRef


@dataclass(frozen=True)
class GenerationJob:
    """One request as the model deployment sees it: image i uses seeds[i] (and labels[i]).

    labels None: a class-conditional model draws each image's class from its class prior by the
    image's seed, or uses the null label for every image when `unconditional`
    (model_deployment.ServedModel.labels_for)."""

    steps: int
    sampler: str
    guidance_scale: float
    eta: float
    seeds: tuple[int, ...]
    labels: tuple[int, ...] | None = None
    unconditional: bool = False

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def work(self) -> int:
        """Image-steps: the unit of `ServeSettings.max_work` and of admission."""
        return self.num_images * self.steps


@dataclass(frozen=True)
class SamplingTimings:
    """Where a job spent its time in the model replica (seconds; images in its runs)."""

    queue_s: float  # arrival at the replica -> start of the turn that sampled it
    sampling_s: float  # start of that turn -> its last image sampled
    model_s: float  # arrival at the replica -> answer ready
    batch_images: int  # images in the largest run it took part in
    batch_total_images: int  # images of every request in that turn


@dataclass(frozen=True)
class Generated:
    """images: (N, C, H, W) float32 in [0, 1], finite, in the job's seed order; labels: the class
    each image was sampled with (-1: the null label), None for a model without classes."""

    model: ModelRef
    images: np.ndarray
    timings: SamplingTimings
    labels: tuple[int, ...] | None = None


FailureKind = Literal["invalid", "overloaded", "model_output", "model_error", "unavailable", "timeout"]


@dataclass(frozen=True)
class Failure:
    """Why a job produced no images.

    invalid: the request does not fit the model (e.g. labels on an unconditional model);
    overloaded: the replica's queued work would not finish in time (retry after `retry_after_s`);
    model_output: the model produced non-finite values; model_error: sampling raised;
    unavailable: no replica took the job; timeout: no answer within the request timeout.
    """

    kind: FailureKind
    message: str
    retry_after_s: float | None = None


JobResult = Generated | Failure
