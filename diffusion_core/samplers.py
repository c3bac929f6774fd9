"""Samplers of the reverse process: `sample()` and the SAMPLERS registry (ddpm, ddim, dpmpp_2m).

Every sampler has one signature (k-diffusion style)::

    sampler(denoise, x, timesteps, noise, eta) -> x_0
      denoise(x_t, t) -> Denoised(x0, eps)   the model's estimates at integer timestep t (guided, converted)
      x          (N, C, H, W) float32 start noise, the state at timesteps[0]
      timesteps  strictly decreasing integer training timesteps; after the last one sampling ends at
                 "t = -1", the clean data (abar = 1, sigma = 0), so the final update is always first order
      noise      PerSampleNoise: fresh N(0, I) draws, row i from sample i's own generator
      eta        stochasticity (DDIM only)

Each step goes from t = timesteps[i] to s = timesteps[i+1] (the actual next entry, never a fixed stride),
in the notation of schedule.py: alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma).

Samplers are stateless: everything a call needs (generators, the previous model output of the multistep
solver) lives in that call's frames, so one schedule and one model_fn can serve concurrent requests.

Seeds are per sample. Sample i's start noise and every per-step noise it uses come from its own
`torch.Generator` seeded with seeds[i], drawn on the CPU and then moved to the device (so results do not
depend on the device's RNG). With a model whose output for sample i depends only on input i (the UNet
uses only per-sample operations), result i depends only on seeds[i], labels[i] and the settings.
`seeds=None` draws random seeds with `random_seeds(n)` and logs them at INFO; callers that must be able
to reproduce an output call `random_seeds(n)` themselves and pass the list.

Timestep grids: with an epsilon-predicting model, x_0 = (x_t - sigma eps) / alpha multiplies every
error of eps by 1 / alpha, about 2e4 at t = 999 of the cosine schedule (lambda = -9.92), and a sampler
stepping from there to a much larger alpha carries that error into x (a UNet trained 150 s on digits
gave garbage with 50 strided DDPM steps from t = 999). Every sampler therefore starts at
`first_timestep`: the largest t with lambda_t >= LAMBDA_MIN = -5.1 (the `lambda_min_clipped` value that
DPM-Solver's reference code and diffusers recommend for the cosine schedule): t = 995 on cosine / 1000,
T - 1 on linear / 1000. So ddpm's full chain has 996 steps on cosine / 1000 with an epsilon model.
Models predicting v or x_0 never divide by alpha and start at T - 1, which zero-terminal-SNR schedules
need (Lin et al. 2023).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from diffusion_core.errors import ConfigError
from diffusion_core.forward import q_posterior
from diffusion_core.guidance import cfg_model_fn
from diffusion_core.objective import ModelFn, to_x0_and_eps
from diffusion_core.sampling_defaults import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    ETA_SAMPLERS,
    MAX_SEED,
    SAMPLER_NAMES,
)
from diffusion_core.schedule import NoiseSchedule

log = logging.getLogger(__name__)

LAMBDA_MIN = -5.1  # lowest half log-SNR an epsilon-prediction sampler starts from (see module doc)
LAMBDA_SKIP = -2.5  # where the "logsnr_skip" grid's evenly spaced part begins (log_snr_skip_timesteps)
DYNAMIC_THRESHOLD_PERCENTILE = 0.995  # Saharia et al. 2022 (Imagen), sec. 2.3
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5

ClipX0 = float | Literal["dynamic"] | None


@dataclass(frozen=True)
class Denoised:
    """The model's estimates at one step: x0 (clipped if asked) and the eps consistent with it."""

    x0: Tensor
    eps: Tensor


# ------------------------------------------------------------------------------------ noise, seeds


def random_seeds(n: int) -> list[int]:
    """n random seeds in [0, 2**62) from torch's global generator (so torch.manual_seed fixes them)."""
    return torch.randint(0, 2**62, (n,)).tolist()


class PerSampleNoise:
    """N(0, I) draws for a batch in which row i always comes from generator i (seeded by seeds[i]).

    Drawn on the CPU in float32 and moved to `device`: sample i's k-th draw is the same on every
    device and in every batch it is part of.
    """

    def __init__(self, seeds: Sequence[int], sample_shape: Sequence[int], device: torch.device) -> None:
        self._generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self._sample_shape = tuple(sample_shape)
        self._device = device

    def draw(self) -> Tensor:
        rows = [torch.randn(self._sample_shape, generator=g) for g in self._generators]
        return torch.stack(rows).to(self._device)


# ---------------------------------------------------------------------------------------- denoiser


def clip_denoised(x0: Tensor, clip_x0: ClipX0) -> Tensor:
    """Static clipping to [-c, c], or dynamic thresholding (Saharia et al. 2022): per sample,
    s = max(quantile(|x0|, 0.995), 1) and x0 <- clamp(x0, -s, s) / s."""
    if clip_x0 is None:
        return x0
    if clip_x0 == "dynamic":
        q = torch.quantile(x0.abs().flatten(1).float(), DYNAMIC_THRESHOLD_PERCENTILE, dim=1)
        s = q.clamp(min=1.0).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s
    return x0.clamp(-clip_x0, clip_x0)


@dataclass
class Denoiser:
    """x_t, t -> Denoised: calls the (guided) model once and converts its output to (x0, eps).

    One instance per `sample()` call; `calls` counts model evaluations for `progress`.
    """

    model_fn: ModelFn
    schedule: NoiseSchedule
    labels: Tensor | None = None
    prediction: str = "epsilon"
    clip_x0: ClipX0 = None
    progress: Callable[[int, int], None] | None = None
    total: int = 0
    calls: int = field(default=0, init=False)

    def __call__(self, x: Tensor, t: int) -> Denoised:
        alpha, sigma = (float(c) for c in self.schedule.alpha_sigma_at(t))
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        out = self.model_fn(x, t_batch, self.labels).to(x.dtype)
        x0, eps = to_x0_and_eps(out, x, alpha, sigma, self.prediction)
        if self.clip_x0 is not None:
            x0 = clip_denoised(x0, self.clip_x0)
            eps = (x - alpha * x0) / sigma  # sigma > 0 at every t >= 0
        self.calls += 1
        if self.progress is not None:
            self.progress(self.calls, self.total)
        return Denoised(x0, eps)


# -------------------------------------------------------------------------------- timestep grids


def first_timestep(schedule: NoiseSchedule, prediction: str) -> int:
    """T - 1 for v / x0 models; for epsilon models the largest t with lambda_t >= LAMBDA_MIN (module doc)."""
    if prediction != "epsilon":
        return schedule.num_timesteps - 1
    safe = torch.nonzero(schedule.log_snr / 2 >= LAMBDA_MIN).flatten()
    return int(safe.max()) if safe.numel() else 0


def strictly_decreasing(times: np.ndarray, first: int) -> list[int]:
    """Round a decreasing grid of continuous times that runs from `first` to 0 to distinct integers.

    Where rounding makes neighbours collide (many steps, steep log-SNR near t = 0), each is pushed to
    one above its successor, so the grid keeps exactly len(times) steps and still ends at 0.
    """
    n = len(times)
    # Step i must leave room for the n - 1 - i distinct steps below it and the i above it.
    out = np.clip(np.rint(times).astype(np.int64), np.arange(n - 1, -1, -1), first - np.arange(n))
    out[0], out[-1] = first, 0
    for i in range(n - 2, -1, -1):
        out[i] = max(out[i], out[i + 1] + 1)
    return out.tolist()


def time_uniform_timesteps(schedule: NoiseSchedule, steps: int, first: int) -> list[int]:
    """t_i = round(first - i (first / (steps - 1))): evenly spaced in t from `first` down to 0."""
    return strictly_decreasing(np.linspace(first, 0, steps), first)


def quadratic_timesteps(schedule: NoiseSchedule, steps: int, first: int) -> list[int]:
    """t_i = first (1 - i / (steps - 1))^2: the "quadratic" spacing of Song et al. 2021 (appendix D.2),
    denser at low noise. For first-order DDIM it beats both "time" and "logsnr_skip" on the Gaussian
    oracle (-3.3% / -2.7% std at 50 steps, linear / cosine, against -5.6% / -3.1% for "time")."""
    return strictly_decreasing(first * np.linspace(1.0, 0.0, steps) ** 2, first)


def _timesteps_at_half_log_snr(schedule: NoiseSchedule, lam: np.ndarray, first: int) -> list[int]:
    return strictly_decreasing(schedule.timestep_from_log_snr(torch.from_numpy(2 * lam)).numpy(), first)


def _start_lambda(schedule: NoiseSchedule, first: int) -> float:
    return max(float(schedule.log_snr[first]) / 2, LAMBDA_MIN)


def log_snr_uniform_timesteps(schedule: NoiseSchedule, steps: int, first: int) -> list[int]:
    """Evenly spaced in lambda from max(lambda_first, LAMBDA_MIN) to lambda_0, mapped back to timesteps
    (Lu et al. 2022's "logSNR" spacing): every step has the same h."""
    lam = np.linspace(_start_lambda(schedule, first), float(schedule.log_snr[0]) / 2, steps)
    return _timesteps_at_half_log_snr(schedule, lam, first)


def log_snr_skip_timesteps(schedule: NoiseSchedule, steps: int, first: int) -> list[int]:
    """One step from `first` straight to lambda = LAMBDA_SKIP (-2.5), then evenly spaced in lambda.

    Below lambda = -2.5 (SNR = e^-5) the data prediction is the data mean up to a term
    alpha Var(x_0) / (alpha^2 Var(x_0) + sigma^2) <= alpha = 0.08 for data of variance <= 1, and the
    exponential-integrator updates of DDIM / DPM-Solver++ are exact for a constant x0_hat; the steps
    this saves go where x0_hat changes. With the Gaussian oracle this halves dpmpp_2m's error at 20
    steps against the plain "logsnr" grid (benchmarks/results/samplers.json). Falls back to the plain
    grid when the start is already above LAMBDA_SKIP.
    """
    lam_first, lam_last = _start_lambda(schedule, first), float(schedule.log_snr[0]) / 2
    if steps < 3 or lam_first >= LAMBDA_SKIP:
        return log_snr_uniform_timesteps(schedule, steps, first)
    lam = np.concatenate([[lam_first], np.linspace(LAMBDA_SKIP, lam_last, steps - 1)])
    return _timesteps_at_half_log_snr(schedule, lam, first)


def karras_timesteps(schedule: NoiseSchedule, steps: int, first: int) -> list[int]:
    """Karras et al. 2022, eq. 5, in the VE sigma = sigma / alpha = exp(-lambda) of the VP process:
    s_i = (s_max^(1/rho) + i / (n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, rho = 7."""
    s_max = math.exp(-_start_lambda(schedule, first))
    s_min = math.exp(-float(schedule.log_snr[0]) / 2)
    ramp = np.linspace(0.0, 1.0, steps)
    inv_rho = 1 / KARRAS_RHO
    s = (s_max**inv_rho + ramp * (s_min**inv_rho - s_max**inv_rho)) ** KARRAS_RHO
    return _timesteps_at_half_log_snr(schedule, -np.log(s), first)


SPACINGS: dict[str, Callable[[NoiseSchedule, int, int], list[int]]] = {
    "time": time_uniform_timesteps,
    "quadratic": quadratic_timesteps,
    "logsnr": log_snr_uniform_timesteps,
    "logsnr_skip": log_snr_skip_timesteps,
    "karras": karras_timesteps,
}


# ---------------------------------------------------------------------------------------- samplers


def _alpha_sigma_lambda(schedule: NoiseSchedule, t: int) -> tuple[float, float, float]:
    alpha, sigma = (float(c) for c in schedule.alpha_sigma_at(t))
    return alpha, sigma, float(schedule.half_log_snr_at(t))


def _next_timesteps(timesteps: Sequence[int]) -> list[int]:
    """The step targets: each timestep's successor, and -1 (clean data) after the last."""
    return [*timesteps[1:], -1]


def sample_ddpm(
    denoise: Denoiser, x: Tensor, timesteps: Sequence[int], noise: PerSampleNoise, eta: float
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): x_s ~ q(x_s | x_t, x0_hat), the posterior of
    forward.q_posterior with s the next timestep of the grid (every t for the full chain, or a
    respaced subset, Nichol & Dhariwal 2021 sec. 4), and variance beta-tilde. `eta` is unused (0).
    The final step (t -> clean data) has zero variance: it returns x0_hat."""
    schedule = denoise.schedule
    for t, s in zip(timesteps, _next_timesteps(timesteps), strict=True):
        d = denoise(x, t)
        mean, variance = q_posterior(d.x0, x, t, schedule, t_prev=s)
        x = mean + variance.sqrt() * noise.draw() if s >= 0 else mean
    return x


def sample_ddim(
    denoise: Denoiser, x: Tensor, timesteps: Sequence[int], noise: PerSampleNoise, eta: float
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 and 16):

        x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
        c   = eta sqrt((sigma_s^2 / sigma_t^2)(1 - abar_t / abar_s)),   z ~ N(0, I)

    eta = 0 is the deterministic DDIM; eta = 1 is the DDPM posterior (equal in law to `sample_ddpm`).
    """
    schedule = denoise.schedule
    for t, s in zip(timesteps, _next_timesteps(timesteps), strict=True):
        d = denoise(x, t)
        abar_t, abar_s = float(schedule.alpha_bar_at(t)), float(schedule.alpha_bar_at(s))
        c = eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        x = math.sqrt(abar_s) * d.x0 + math.sqrt(max(1 - abar_s - c * c, 0.0)) * d.eps
        if c > 0:
            x = x + c * noise.draw()
    return x


def sample_dpmpp_2m(
    denoise: Denoiser, x: Tensor, timesteps: Sequence[int], noise: PerSampleNoise, eta: float
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095), Algorithm 2: multistep, second order, in the
    data prediction x0_hat. With h_i = lambda_s - lambda_t and r_i = h_{i-1} / h_i:

        D_i = (1 + 1 / (2 r_i)) x0_hat_i - 1 / (2 r_i) x0_hat_{i-1}     (D_0 = x0_hat_0: first order)
        x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h_i) - 1) D_i

    The final update, to sigma = 0 (h = inf), is first order and returns x0_hat at the last timestep
    (diffusers' lower_order_final / final_sigmas_type="zero"). The second update is first order too:
    x0_hat at the start point carries the model's eps error times sigma / alpha (~160 at lambda = -5.1)
    and would enter D with weight 1 / (2 r) (0.46 at 5 steps: a 5-step run of a digits UNet
    collapsed). A fixed number of first-order steps keeps the global order 2; on the Gaussian oracle
    the change is < 0.1% at 10+ steps. No noise is drawn; `eta` is unused (0).
    """
    schedule = denoise.schedule
    prev_x0, prev_h = None, None
    for i, (t, s) in enumerate(zip(timesteps, _next_timesteps(timesteps), strict=True)):
        d = denoise(x, t)
        if s < 0:
            return d.x0
        _, sigma_t, lam_t = _alpha_sigma_lambda(schedule, t)
        alpha_s, sigma_s, lam_s = _alpha_sigma_lambda(schedule, s)
        h = lam_s - lam_t  # inf when t has zero SNR: then the step is x_s = sigma_s x + alpha_s x0_hat
        D = d.x0
        if prev_x0 is not None:
            half_inv_r = h / (2 * prev_h)  # 1 / (2 r)
            D = (1 + half_inv_r) * d.x0 - half_inv_r * prev_x0
        x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * D
        if i > 0:  # never extrapolate with the start point's x0_hat (docstring)
            prev_x0, prev_h = d.x0, h
    raise AssertionError("unreachable: the last target is -1")


SamplerFn = Callable[[Denoiser, Tensor, Sequence[int], PerSampleNoise, float], Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function, its timestep spacing (a SPACINGS name), whether it uses eta."""

    fn: SamplerFn
    spacing: str
    uses_eta: bool


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, spacing="time", uses_eta=False),
    "ddim": SamplerSpec(sample_ddim, spacing="quadratic", uses_eta=True),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, spacing="logsnr_skip", uses_eta=False),
}
# The torch-free vocabulary (sampling_defaults) must name exactly these samplers.
assert set(SAMPLERS) == set(SAMPLER_NAMES), (sorted(SAMPLERS), SAMPLER_NAMES)
assert {n for n, s in SAMPLERS.items() if s.uses_eta} == set(ETA_SAMPLERS)


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ConfigError(f"sampler: unknown name {name!r}; accepted: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampling_timesteps(
    schedule: NoiseSchedule, sampler: str, steps: int, prediction: str = "epsilon"
) -> list[int]:
    """The grid `sample()` uses: `steps` strictly decreasing timesteps from first_timestep() to 0."""
    spec = get_sampler(sampler)
    first = first_timestep(schedule, prediction)
    if not (isinstance(steps, int) and 1 <= steps <= first + 1):
        raise ConfigError(
            f"steps: sampler {sampler!r} accepts 1..{first + 1} steps on this schedule "
            f"({schedule!r}, prediction {prediction!r}), got {steps!r}"
        )
    if steps == 1:
        return [first]
    return SPACINGS[spec.spacing](schedule, steps, first)


# ------------------------------------------------------------------------------------------ sample


def _check_eta(sampler: str, spec: SamplerSpec, eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta: must be in [0, 1], got {eta}")
    if eta != 0.0 and not spec.uses_eta:
        users = [n for n, s in SAMPLERS.items() if s.uses_eta]
        raise ConfigError(f"eta: only used by sampler(s) {users}; must be 0 for {sampler!r}, got {eta}")


def _check_seeds(seeds: Sequence[int] | None, n: int) -> list[int]:
    if seeds is None:
        drawn = random_seeds(n)
        log.info("seeds=None: drew random seeds %s (pass them as seeds= to reproduce)", drawn)
        return drawn
    seeds = list(seeds)
    if len(seeds) != n:
        raise ConfigError(f"seeds: expected {n} seeds (one per sample), got {len(seeds)}")
    bad = [s for s in seeds if not (isinstance(s, int | np.integer) and 0 <= s <= MAX_SEED)]
    if bad:
        raise ConfigError(f"seeds: must be integers in [0, 2**63 - 1], got {bad[:5]}")
    return [int(s) for s in seeds]


def _check_labels(labels: Tensor | Sequence[int] | None, n: int, device: torch.device) -> Tensor | None:
    if labels is None:
        return None
    tensor = torch.as_tensor(labels, dtype=torch.long, device=device)
    if tensor.shape != (n,):
        raise ConfigError(f"labels: expected shape ({n},) (one per sample), got {tuple(tensor.shape)}")
    return tensor


def _check_clip(clip_x0: ClipX0) -> None:
    if clip_x0 is None or clip_x0 == "dynamic":
        return
    if isinstance(clip_x0, str) or not clip_x0 > 0:
        raise ConfigError(f"clip_x0: accepted None, a positive float or 'dynamic', got {clip_x0!r}")


def sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    seeds: Sequence[int] | None = None,
    labels: Tensor | Sequence[int] | None = None,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    prediction: str = "epsilon",
    clip_x0: ClipX0 = None,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Draw samples (N, C, H, W) float32 in model space ([-1, 1] for data) on `device` (None: CPU).

    model_fn(x_t (N,C,H,W), t (N,) int64 in [0, T), labels (N,) int64 | None) -> prediction of kind
    `prediction` ("epsilon" | "v" | "x0"). sampler: a name in SAMPLERS; steps: model evaluations
    (1 .. `sampling_timesteps` limit); eta: DDIM's stochasticity in [0, 1] (0 for other samplers).
    labels: class per sample, NULL_LABEL (-1) = unconditional. guidance_scale w (Ho & Salimans 2022)
    applies when labels are given: both predictions come from one batched call (guidance.py); with
    labels None the model runs unconditionally once. clip_x0: None (default), c > 0 (clamp x0_hat to
    [-c, c]) or "dynamic" (Saharia et al. 2022). progress(done, total) is called after each evaluation.

    result[i] depends only on seeds[i], labels[i] and the settings (module doc); seeds=None draws
    random ones (logged). Raises ConfigError naming the field for any invalid setting.
    """
    spec = get_sampler(sampler)
    schedule.validate_prediction(prediction)
    _check_eta(sampler, spec, eta)
    _check_clip(clip_x0)
    timesteps = sampling_timesteps(schedule, sampler, steps, prediction)
    device = torch.device(device if device is not None else "cpu")
    n = int(shape[0])
    seeds = _check_seeds(seeds, n)
    denoise = Denoiser(
        cfg_model_fn(model_fn, guidance_scale), schedule, _check_labels(labels, n, device),
        prediction, clip_x0, progress, total=len(timesteps),
    )
    noise = PerSampleNoise(seeds, shape[1:], device)
    start = time.perf_counter()
    with torch.no_grad():
        x = spec.fn(denoise, noise.draw(), timesteps, noise, eta)
    log.debug("%s: %d samples, %d steps in %.2f s", sampler, n, len(timesteps), time.perf_counter() - start)
    return x
