"""Noise schedules of the variance-preserving diffusion process (Ho et al. 2020).

The forward process adds Gaussian noise in T steps, q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I),
so that, with alpha_t = 1 - beta_t and abar_t = prod_{s<=t} alpha_s (`alphas_cumprod`),

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)          t = 0 .. T-1 (0-based, as the model sees it)

Notation used across diffusion_core (Kingma et al. 2021; Lu et al. 2022):

    alpha(t) = sqrt(abar_t)   sigma(t) = sqrt(1 - abar_t)   SNR(t) = abar_t / (1 - abar_t)
    log_snr(t) = log SNR(t)   lambda(t) = log(alpha / sigma) = log_snr / 2   (DPM-Solver's half log-SNR)

Schedules (all computed in float64):

* ``linear`` (Ho et al. 2020): beta_t = linspace(1e-4, 0.02, T) for T = 1000. For other T the two ends
  are scaled by 1000 / T (as improved-diffusion does), so that abar_{T-1} stays near zero.
* ``cosine`` (Nichol & Dhariwal 2021): abar(u) = f(u) / f(0), f(u) = cos^2((u + s) / (1 + s) * pi / 2),
  s = 0.008, beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999). At T = 1000 only beta_999 is clipped.
* ``sigmoid``: the sigmoid abar schedule of Chen 2023 ("On the importance of noise scheduling for
  diffusion models", Algorithm 1; also Jabri et al. 2022, RIN) with start = -3, end = 3, tau = 1:
  abar(u) = (v_end - sigmoid((u (end - start) + start) / tau)) / (v_end - v_start),
  v_* = sigmoid(* / tau), clipped below at 1e-9 and discretised like the cosine schedule.
  NOT diffusers' ``beta_schedule="sigmoid"``, which makes the *betas* a sigmoid of linspace(-6, 6)
  (GeoDiff, Xu et al. 2022): a different schedule with the same name.

Zero terminal SNR (Lin et al. 2023, Algorithm 1) shifts and scales sqrt(abar) so that abar_0 is kept
and abar_{T-1} = 0 exactly: the last step is pure noise, as the sampler assumes. At SNR = 0 an
epsilon prediction carries no information about x_0 (x_t = eps), so `validate_prediction` refuses
"epsilon" on such a schedule; "v" (Salimans & Ho 2022) and "x0" stay well defined.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from diffusion_core.errors import ConfigError, config_error_from

ScheduleName = Literal["linear", "cosine", "sigmoid"]
SCHEDULE_NAMES: tuple[str, ...] = ("linear", "cosine", "sigmoid")
PREDICTIONS: tuple[str, ...] = ("epsilon", "v", "x0")

LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
COSINE_OFFSET_S = 0.008
MAX_BETA = 0.999  # Nichol & Dhariwal 2021: keeps beta_t < 1 where abar(u) reaches zero
SIGMOID_START, SIGMOID_END, SIGMOID_TAU, SIGMOID_CLIP_MIN = -3.0, 3.0, 1.0, 1e-9


class ScheduleConfig(BaseModel):
    """Which noise schedule, over how many training timesteps, and whether its terminal SNR is zero."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ScheduleName = "cosine"
    num_timesteps: int = Field(1000, ge=2, le=100_000)
    zero_terminal_snr: bool = False


class NoiseSchedule:
    """betas, alphas, alphas_cumprod, log_snr: read-only 1-D float64 CPU tensors of length T.

    Build with `NoiseSchedule.create("cosine", 1000)` or `NoiseSchedule.from_config(cfg)`. Nothing in
    diffusion_core mutates a schedule, so one instance can serve concurrent sampling requests.
    """

    def __init__(self, config: ScheduleConfig, betas: Tensor) -> None:
        self.config = config
        self.num_timesteps = config.num_timesteps
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.log_snr = torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)

    @classmethod
    def create(
        cls, name: str, num_timesteps: int = 1000, *, zero_terminal_snr: bool = False, **kw: object
    ) -> NoiseSchedule:
        """Schedule by name; `kw` are further ScheduleConfig fields (unknown ones raise ConfigError)."""
        try:
            cfg = ScheduleConfig(
                name=name, num_timesteps=num_timesteps, zero_terminal_snr=zero_terminal_snr, **kw
            )
        except ValidationError as err:
            raise config_error_from(err, "schedule") from err
        return cls.from_config(cfg)

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> NoiseSchedule:
        betas = _BETA_BUILDERS[cfg.name](cfg.num_timesteps)
        if cfg.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(cfg, betas)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"NoiseSchedule({c.name!r}, num_timesteps={c.num_timesteps}, "
            f"zero_terminal_snr={c.zero_terminal_snr})"
        )

    # ------------------------------------------------------------------ values at timesteps

    def alpha_bar_at(self, t: Tensor | int) -> Tensor:
        """abar_t (float64) at integer timesteps; t = -1 means "no noise" (abar = 1), the end of sampling."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        if t.numel() and (t.min() < -1 or t.max() >= self.num_timesteps):
            raise ConfigError(
                f"t: timesteps must lie in [-1, {self.num_timesteps - 1}], "
                f"got values in [{int(t.min())}, {int(t.max())}]"
            )
        padded = torch.cat([self.alphas_cumprod, self.alphas_cumprod.new_ones(1)])
        return padded[t]  # t = -1 reads the appended 1.0

    def alpha_sigma_at(self, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) = (sqrt(abar_t), sqrt(1 - abar_t)) in float64; t = -1 gives (1, 0)."""
        abar = self.alpha_bar_at(t)
        return abar.sqrt(), (1.0 - abar).sqrt()

    def half_log_snr_at(self, t: Tensor | int) -> Tensor:
        """lambda_t = log(alpha_t / sigma_t) = log_snr / 2 (float64); -inf at zero SNR, +inf at t = -1."""
        alpha, sigma = self.alpha_sigma_at(t)
        return torch.log(alpha) - torch.log(sigma)

    def timestep_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        """Inverse of `log_snr`: the continuous timestep in [0, T-1] (float64) with that log-SNR,
        by linear interpolation of the (strictly decreasing) table; values outside the table clamp
        to its ends."""
        table = self.log_snr.numpy()[::-1]  # np.interp needs increasing x
        times = np.arange(self.num_timesteps - 1, -1, -1, dtype=np.float64)
        query = np.asarray(torch.as_tensor(log_snr, dtype=torch.float64))
        return torch.from_numpy(np.asarray(np.interp(query, table, times), dtype=np.float64))

    def validate_prediction(self, prediction: str) -> None:
        """Raise ConfigError if a model predicting `prediction` cannot be trained/sampled on this schedule.

        At zero terminal SNR x_{T-1} = eps, so an epsilon target gives no information about x_0 and
        x_0 = (x_t - sigma eps) / alpha divides by alpha = 0 (Lin et al. 2023, section 3.2).
        """
        if prediction not in PREDICTIONS:
            raise ConfigError(f"prediction: unknown value {prediction!r}; accepted: {', '.join(PREDICTIONS)}")
        if self.config.zero_terminal_snr and prediction == "epsilon":
            raise ConfigError(
                "prediction: 'epsilon' cannot be used with schedule.zero_terminal_snr=true (at zero SNR "
                "the noise target carries no information about x0); accepted: 'v' or 'x0'",
                hint="set objective.prediction to 'v' (Lin et al. 2023) or turn zero_terminal_snr off",
            )


# ---------------------------------------------------------------------------------------- builders


def linear_betas(num_timesteps: int) -> Tensor:
    """Ho et al. 2020: beta_t = linspace(1e-4, 0.02, T) at T = 1000; ends scaled by 1000 / T otherwise."""
    scale = 1000.0 / num_timesteps
    start, end = scale * LINEAR_BETA_START, scale * LINEAR_BETA_END
    if end >= 1.0:
        raise ConfigError(
            f"num_timesteps: the linear schedule needs num_timesteps > {int(1000 * LINEAR_BETA_END)} "
            f"(its last beta, 20 / T, must stay below 1); got {num_timesteps}"
        )
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(u: Tensor) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar(u) = f(u) / f(0), f(u) = cos^2((u + s) / (1 + s) * pi / 2)."""

    def f(v: Tensor) -> Tensor:
        return torch.cos((v + COSINE_OFFSET_S) / (1 + COSINE_OFFSET_S) * math.pi / 2) ** 2

    return f(u) / f(torch.zeros_like(u))


def sigmoid_alpha_bar(u: Tensor) -> Tensor:
    """Chen 2023, Algorithm 1 (sigmoid_schedule, start=-3, end=3, tau=1, clip_min=1e-9)."""
    v_start = torch.sigmoid(torch.tensor(SIGMOID_START / SIGMOID_TAU, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(SIGMOID_END / SIGMOID_TAU, dtype=torch.float64))
    out = (v_end - torch.sigmoid((u * (SIGMOID_END - SIGMOID_START) + SIGMOID_START) / SIGMOID_TAU))
    return (out / (v_end - v_start)).clamp(SIGMOID_CLIP_MIN, 1.0)


def betas_from_alpha_bar(alpha_bar, num_timesteps: int) -> Tensor:
    """beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999): the discretisation of Nichol & Dhariwal 2021."""
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = alpha_bar(u)
    return (1.0 - abar[1:] / abar[:-1]).clamp(max=MAX_BETA)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: sqrt(abar) <- (sqrt(abar) - sqrt(abar_{T-1})) * sqrt(abar_0) /
    (sqrt(abar_0) - sqrt(abar_{T-1})), which keeps abar_0 and makes abar_{T-1} = 0 (so beta_{T-1} = 1)."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


_BETA_BUILDERS = {
    "linear": linear_betas,
    "cosine": lambda T: betas_from_alpha_bar(cosine_alpha_bar, T),
    "sigmoid": lambda T: betas_from_alpha_bar(sigmoid_alpha_bar, T),
}
