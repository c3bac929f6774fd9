"""The forward (noising) process and its posterior, Ho et al. 2020 section 2, in closed form.

Shapes: x0, x_t, noise (N, C, H, W) (any trailing dims); t (N,) int64 in [0, T) or a Python int.
Coefficients are computed in float64 from the schedule and cast to the data's dtype and device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_core.schedule import NoiseSchedule


def broadcast_to(values: Tensor, like: Tensor) -> Tensor:
    """(N,) or scalar float64 coefficients -> shape (N, 1, 1, ...) on like's device, in like's dtype."""
    values = values.to(device=like.device, dtype=like.dtype)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def q_sample(x0: Tensor, t: Tensor | int, noise: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4):

        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise,   noise ~ N(0, I)
    """
    alpha, sigma = schedule.alpha_sigma_at(t)
    return broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, x0) * noise


def q_step(x_prev: Tensor, t: Tensor | int, noise: Tensor, schedule: NoiseSchedule) -> Tensor:
    """One Markov step q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Ho et al. 2020, eq. 2):

        x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) noise

    For t = 0, x_prev is the data x_0 itself (x_{-1} := x_0 in the 0-based indexing).
    """
    beta = schedule.betas[torch.as_tensor(t, dtype=torch.long).cpu()]
    return broadcast_to((1.0 - beta).sqrt(), x_prev) * x_prev + broadcast_to(beta.sqrt(), x_prev) * noise


def q_posterior(
    x0: Tensor,
    x_t: Tensor,
    t: Tensor | int,
    schedule: NoiseSchedule,
    t_prev: Tensor | int | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and variance of the posterior q(x_s | x_t, x_0) for s = t_prev < t (default t - 1).

    Ho et al. 2020, eq. 6-7, written for any earlier timestep s (Kingma et al. 2021, eq. 32-33), with
    abar_{-1} = 1 (s = -1 is the clean data):

        beta_{t|s}  = 1 - abar_t / abar_s
        mean        = sqrt(abar_s) beta_{t|s} / (1 - abar_t) x_0
                      + sqrt(abar_t / abar_s) (1 - abar_s) / (1 - abar_t) x_t
        variance    = (1 - abar_s) / (1 - abar_t) beta_{t|s}

    For s = t - 1, beta_{t|s} = beta_t and this is Ho et al.'s beta-tilde posterior. Returns
    (mean (N, C, H, W), variance broadcastable to it, in x_t's dtype).
    """
    t = torch.as_tensor(t, dtype=torch.long)
    s = t - 1 if t_prev is None else torch.as_tensor(t_prev, dtype=torch.long)
    abar_t, abar_s = schedule.alpha_bar_at(t), schedule.alpha_bar_at(s)
    beta_ts = 1.0 - abar_t / abar_s
    coef_x0 = abar_s.sqrt() * beta_ts / (1.0 - abar_t)
    coef_xt = (abar_t / abar_s).sqrt() * (1.0 - abar_s) / (1.0 - abar_t)
    variance = (1.0 - abar_s) / (1.0 - abar_t) * beta_ts
    mean = broadcast_to(coef_x0, x_t) * x0 + broadcast_to(coef_xt, x_t) * x_t
    return mean, broadcast_to(variance, x_t)
