"""Request checks that depend on the server's limits or on the loaded model.

Each check returns messages of the form "<field>: <problem>; accepted: <range>" (empty when the request
is fine), so that the client learns which field to change and to what.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusion_core.samplers import SAMPLERS
from diffusion_core.sampling_defaults import MAX_SEED
from serving.config import ServeSettings
from serving.schemas import GenerateRequest


def effective_steps(request: GenerateRequest, settings: ServeSettings) -> int:
    return settings.default_steps if request.steps is None else request.steps


def effective_sampler(request: GenerateRequest, settings: ServeSettings) -> str:
    return settings.default_sampler if request.sampler is None else request.sampler


def limit_errors(request: GenerateRequest, settings: ServeSettings) -> list[str]:
    """num_images, steps, their product (the per-request work cap) and seed range."""
    errors = []
    n, steps = request.num_images, effective_steps(request, settings)
    if not 1 <= n <= settings.max_images_per_request:
        errors.append(f"num_images: {n} is out of range; accepted: 1..{settings.max_images_per_request}")
    if not 1 <= steps <= settings.max_steps:
        errors.append(f"steps: {steps} is out of range; accepted: 1..{settings.max_steps}")
    if not errors and n * steps > settings.max_work:
        errors.append(f"num_images * steps: {n} * {steps} = {n * steps} exceeds the per-request work cap; "
                      f"accepted: <= {settings.max_work}")
    if request.seed is not None and request.seed + n - 1 > MAX_SEED:
        errors.append(f"seed: seed + num_images - 1 must fit in int64; accepted: 0..{MAX_SEED - n + 1}")
    sampler = effective_sampler(request, settings)
    if request.eta != 0.0 and not SAMPLERS[sampler].uses_eta:
        users = ", ".join(name for name, spec in SAMPLERS.items() if spec.uses_eta)
        errors.append(f"eta: only used by {users}; accepted: 0 for sampler {sampler!r}")
    if request.labels is not None and len(request.labels) != n:
        errors.append(f"labels: {len(request.labels)} labels for num_images={n}; accepted: exactly "
                      f"{n} labels (one per image) or null")
    return errors


def label_errors(labels: Sequence[int] | None, num_classes: int | None) -> list[str]:
    """Labels against the model: none for an unconditional model, each in [0, num_classes) otherwise."""
    if labels is None:
        return []
    if num_classes is None:
        return ["labels: this model is unconditional (no classes); accepted: null"]
    bad = sorted({label for label in labels if not 0 <= label < num_classes})
    if bad:
        return [f"labels: {bad} are not classes of this model; accepted: 0..{num_classes - 1}"]
    return []
