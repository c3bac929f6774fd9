"""Classifier-free guidance (Ho & Salimans 2022).

One network learns both the conditional eps(x_t, t, y) and, through labels dropped to NULL_LABEL in
training, the unconditional eps(x_t, t, null). Sampling mixes them with guidance scale w:

    eps_w = eps_u + w (eps_c - eps_u)        (w = 1: conditional, w = 0: unconditional)

The mix is affine, and eps, v and x_0 are affine in each other at fixed (x_t, t), so the same formula
applies unchanged to v- or x_0-predicting models.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_core.errors import ConfigError
from diffusion_core.objective import ModelFn
from diffusion_core.sampling_defaults import NULL_LABEL


def check_guidance_scale(guidance_scale: float) -> None:
    if not guidance_scale >= 0.0:  # also rejects NaN
        raise ConfigError(f"guidance_scale: must be >= 0 (1 = no guidance), got {guidance_scale}")


def guided_model_call(
    model_fn: ModelFn, x_t: Tensor, t: Tensor, labels: Tensor, guidance_scale: float
) -> Tensor:
    """eps_u + w (eps_c - eps_u) from ONE model call on the batch [x_t, x_t] with labels [y, NULL].

    x_t (N, C, H, W), t (N,) int64, labels (N,) int64 -> (N, C, H, W). Samples whose label is already
    NULL_LABEL get eps_c = eps_u, hence their unconditional prediction for any w.
    """
    nulls = torch.full_like(labels, NULL_LABEL)
    out = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, nulls]))
    cond, uncond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def cfg_model_fn(model_fn: ModelFn, guidance_scale: float) -> ModelFn:
    """model_fn wrapped with classifier-free guidance at scale w.

    With labels None (an unconditional request) or w = 1 the model is called once, as is: there is
    nothing to guide against. Otherwise see `guided_model_call`.
    """
    check_guidance_scale(guidance_scale)

    def guided(x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None or guidance_scale == 1.0:
            return model_fn(x_t, t, labels)
        return guided_model_call(model_fn, x_t, t, labels, guidance_scale)

    return guided
