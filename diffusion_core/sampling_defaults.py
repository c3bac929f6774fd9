"""The vocabulary of a sampling request, without torch: sampler names, the defaults, the seed range
and the null label, and the rules a request's labels follow.

Everything that validates or documents a request (the HTTP front end, the CLI, the MLflow model
signature, configs) reads these; `samplers.SAMPLERS` implements exactly `SAMPLER_NAMES` (checked at
import there). Keeping them here lets a process that never samples (the Serve ingress) validate
requests without loading torch or the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Literal, get_args

from diffusion_core.errors import ConfigError

SamplerName = Literal["dpmpp_2m", "ddim", "ddpm"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
DEFAULT_SAMPLER: SamplerName = "dpmpp_2m"
DEFAULT_STEPS = 20
# Guidance of a request that names none: 1 samples the conditional model as trained (no guidance).
DEFAULT_GUIDANCE_SCALE = 1.0
# Samplers whose stochasticity `eta` is a free parameter (the others require eta = 0).
ETA_SAMPLERS: tuple[str, ...] = ("ddim",)
# Seeds seed torch.Generator, which takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1
# A label meaning "no class": the UNet maps it to its null class embedding (classifier-free guidance).
NULL_LABEL = -1


def check_label_count(labels: Sequence[int] | None, num_images: int) -> None:
    """One label per image, or no labels at all; ConfigError otherwise."""
    if labels is not None and len(labels) != num_images:
        raise ConfigError("labels: one label per image; accepted: exactly num_images labels, or none")


def check_labels(labels: Sequence[int] | None, num_images: int, num_classes: int | None) -> None:
    """The labels of a sampling request against the model that samples it.

    Accepted: no labels (None); otherwise one per image, each a class in [0, num_classes) or
    NULL_LABEL (that image is sampled unconditionally). A model without classes (num_classes None)
    takes no labels. The ConfigError names the field and the rule, never the offending values: they
    may come from an untrusted request.
    """
    check_label_count(labels, num_images)
    if labels is None:
        return
    if num_classes is None:
        raise ConfigError("labels: this model is unconditional (it has no classes); accepted: no labels")
    if not all(_is_label(label, num_classes) for label in labels):
        raise ConfigError(f"labels: each must be a class of this model; accepted: integers "
                          f"0..{num_classes - 1}, or {NULL_LABEL} for an unconditional image")


def _is_label(label: object, num_classes: int) -> bool:
    # Integral covers numpy integers; bool is an int subclass but never a label
    return isinstance(label, Integral) and not isinstance(label, bool) and NULL_LABEL <= label < num_classes
