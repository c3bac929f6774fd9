"""What the denoiser predicts, exact conversions between its three parameterisations, and the loss.

With x_t = alpha x_0 + sigma eps, alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t), alpha^2 + sigma^2 = 1:

    "epsilon"  eps                           (Ho et al. 2020)
    "x0"       x_0
    "v"        v = alpha eps - sigma x_0      (Salimans & Ho 2022, "progressive distillation", sec. 4)

Given x_t and t, each determines the others exactly:

    x_0 = (x_t - sigma eps) / alpha          eps = (x_t - alpha x_0) / sigma
    x_0 = alpha x_t - sigma v                eps = sigma x_t + alpha v
    v   = alpha eps - sigma x_0

(the eps -> x_0 direction divides by alpha, which is why epsilon prediction is refused at zero SNR).

Loss: E_{t ~ U{0..T-1}, eps ~ N(0, I)} [ w(t) * mean((target - model(x_t, t, y))^2) ] with w = 1 by
default (Ho et al.'s "simple" loss). Min-SNR-gamma weighting (Hang et al. 2023) gives every timestep
the weight min(SNR, gamma) on the x_0 error; since, at fixed x_t, |eps err|^2 = SNR |x_0 err|^2 and
|v err|^2 = (SNR + 1) |x_0 err|^2, the weight on each parameterisation's own MSE is

    epsilon: min(SNR, gamma) / SNR = min(1, gamma / SNR)
    v:       min(SNR, gamma) / (SNR + 1)
    x0:      min(SNR, gamma)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from diffusion_core.errors import ConfigError
from diffusion_core.forward import broadcast_to, q_sample
from diffusion_core.schedule import PREDICTIONS, NoiseSchedule

Prediction = Literal["epsilon", "v", "x0"]
ModelFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class ObjectiveConfig(BaseModel):
    """What the network predicts and how timesteps are weighted in the loss."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prediction: Prediction = "epsilon"
    min_snr_gamma: float | None = Field(None, gt=0, description="Hang et al. 2023; 5.0 is their choice")


# ------------------------------------------------------------------------------------ conversions


def to_x0_and_eps(
    output: Tensor, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float, prediction: str
) -> tuple[Tensor, Tensor]:
    """(x_0, eps) implied by a model output of kind `prediction`; alpha, sigma broadcast against x_t."""
    if prediction == "epsilon":
        return (x_t - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    if prediction == "v":
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output
    raise ConfigError(f"prediction: unknown value {prediction!r}; accepted: {', '.join(PREDICTIONS)}")


def from_x0_and_eps(
    x0: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float, prediction: str
) -> Tensor:
    """The `prediction` target for a pair (x_0, eps): eps, x_0 or v = alpha eps - sigma x_0."""
    if prediction == "epsilon":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    raise ConfigError(f"prediction: unknown value {prediction!r}; accepted: {', '.join(PREDICTIONS)}")


def convert_prediction(
    output: Tensor, x_t: Tensor, t: Tensor | int, schedule: NoiseSchedule, source: str, target: str
) -> Tensor:
    """Exact conversion of a model output between "epsilon", "v" and "x0" at (x_t, t) (formulas above)."""
    alpha, sigma = (broadcast_to(c, x_t) for c in schedule.alpha_sigma_at(t))
    x0, eps = to_x0_and_eps(output, x_t, alpha, sigma, source)
    return from_x0_and_eps(x0, eps, alpha, sigma, target)


# ------------------------------------------------------------------------------------------- loss


def min_snr_weight(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """Hang et al. 2023 weight of the `prediction` MSE: min(SNR, gamma) divided by the factor that
    turns an x_0 error into that parameterisation's error (SNR for eps, SNR + 1 for v, 1 for x0)."""
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR without 0/0
    if prediction == "v":
        return clipped / (snr + 1.0)
    if prediction == "x0":
        return clipped
    raise ConfigError(f"prediction: unknown value {prediction!r}; accepted: {', '.join(PREDICTIONS)}")


def sample_timesteps(n: int, schedule: NoiseSchedule, generator: torch.Generator | None, device) -> Tensor:
    """t ~ U{0, ..., T-1}, (n,) int64, drawn on the generator's device and moved to `device`."""
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, schedule.num_timesteps, (n,), generator=generator, device=gen_device)
    return t.to(device)


def training_loss(
    model_fn: ModelFn,
    x0: Tensor,
    schedule: NoiseSchedule,
    objective: ObjectiveConfig,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Denoising loss of one batch x0 (N, C, H, W): a scalar float32 tensor (formula in the module doc).

    model_fn(x_t, t, labels) -> (N, C, H, W) prediction of kind `objective.prediction`. Timesteps and
    noise come from `generator` (on its device, then moved to x0's), so a seeded generator makes the
    loss reproducible. The MSE is computed in float32 even when the model runs under autocast.
    """
    schedule.validate_prediction(objective.prediction)
    gen_device = generator.device if generator is not None else x0.device
    t = sample_timesteps(x0.shape[0], schedule, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(x0, t, noise, schedule)
    alpha, sigma = (broadcast_to(c, x0) for c in schedule.alpha_sigma_at(t))
    target = from_x0_and_eps(x0, noise, alpha, sigma, objective.prediction)
    per_sample = (model_fn(x_t, t, labels).float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if objective.min_snr_gamma is not None:
        snr = schedule.log_snr[t.cpu()].exp()
        weight = min_snr_weight(snr, objective.min_snr_gamma, objective.prediction)
        per_sample = per_sample * weight.to(device=per_sample.device, dtype=per_sample.dtype)
    return per_sample.mean()
