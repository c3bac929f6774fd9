"""Noise schedules against closed forms, published reference values and the zero-terminal-SNR rules."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.errors import ConfigError
from diffusion_core.schedule import NoiseSchedule, ScheduleConfig

T = 1000


def cosine_f(u: float, s: float = 0.008) -> float:
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def linear_alpha_bar(t: int, num_timesteps: int = T) -> float:
    """prod_{i<=t} (1 - beta_i), beta_i = 1e-4 + i (0.02 - 1e-4) / (T - 1): Ho et al. 2020."""
    out = 1.0
    for i in range(t + 1):
        out *= 1.0 - (1e-4 + i * (0.02 - 1e-4) / (num_timesteps - 1))
    return out


@pytest.mark.parametrize(
    ("name", "index", "expected"),
    [
        ("linear", 0, 0.9999),
        ("linear", 499, 0.0785872429),
        ("linear", 999, 4.0358298e-05),
        ("cosine", 0, 0.9999587158),
        ("cosine", 499, 0.4938435904),
        ("cosine", 998, 2.4287669e-06),
        ("cosine", 999, 2.4287669e-09),
    ],
)
def test_alphas_cumprod_reference_values(name: str, index: int, expected: float) -> None:
    sched = NoiseSchedule.create(name, T)
    assert sched.alphas_cumprod[index].item() == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("t", [0, T // 2, T - 1])
def test_linear_matches_product_of_betas(t: int) -> None:
    sched = NoiseSchedule.create("linear", T)
    assert sched.alphas_cumprod[t].item() == pytest.approx(linear_alpha_bar(t), rel=1e-12)


@pytest.mark.parametrize("t", [0, T // 2, T - 2])
def test_cosine_matches_closed_form(t: int) -> None:
    sched = NoiseSchedule.create("cosine", T)
    assert sched.alphas_cumprod[t].item() == pytest.approx(cosine_f((t + 1) / T) / cosine_f(0), rel=1e-10)


def test_cosine_clips_only_the_last_beta() -> None:
    sched = NoiseSchedule.create("cosine", T)
    assert torch.nonzero(sched.betas >= 0.999).flatten().tolist() == [T - 1]
    assert sched.betas[-1].item() == 0.999
    assert sched.alphas_cumprod[-1].item() == pytest.approx(sched.alphas_cumprod[-2].item() * 1e-3, rel=1e-12)


def test_sigmoid_is_chens_alpha_bar_schedule() -> None:
    """Chen 2023: abar(u) = (v_end - sigmoid(6u - 3)) / (v_end - v_start): 1/2 at u = 1/2, symmetric."""
    sched = NoiseSchedule.create("sigmoid", T)
    sig = torch.sigmoid(torch.tensor(3.0, dtype=torch.float64)).item()
    expected = (sig - 1 / (1 + math.exp(-(6 * 0.25 - 3)))) / (sig - (1 - sig))
    assert sched.alphas_cumprod[T // 2 - 1].item() == pytest.approx(0.5, abs=1e-12)
    assert sched.alphas_cumprod[T // 4 - 1].item() == pytest.approx(expected, rel=1e-10)
    assert sched.alphas_cumprod[T // 4 - 1] + sched.alphas_cumprod[3 * T // 4 - 1] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_tensors_are_float64_consistent_and_monotone(name: str) -> None:
    s = NoiseSchedule.create(name, T)
    for values in (s.betas, s.alphas, s.alphas_cumprod, s.log_snr):
        assert values.dtype == torch.float64 and values.shape == (T,)
    torch.testing.assert_close(s.alphas, 1 - s.betas)
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(s.alphas, 0))
    torch.testing.assert_close(s.log_snr, torch.log(s.alphas_cumprod / (1 - s.alphas_cumprod)))
    assert (s.alphas_cumprod.diff() < 0).all() and ((s.betas > 0) & (s.betas < 1)).all()


def test_conversion_helpers() -> None:
    s = NoiseSchedule.create("cosine", T)
    t = torch.tensor([0, 10, 500, 999])
    alpha, sigma = s.alpha_sigma_at(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(s.half_log_snr_at(t), s.log_snr[t] / 2)
    torch.testing.assert_close(s.timestep_from_log_snr(s.log_snr[t]), t.double())
    # Published half log-SNR log(alpha / sigma) at t = 995..999 on the cosine schedule.
    expected = torch.tensor([-5.078, -5.365, -5.771, -6.464, -9.918], dtype=torch.float64)
    torch.testing.assert_close(s.half_log_snr_at(torch.arange(995, 1000)), expected, atol=1e-3, rtol=0)
    assert s.alpha_bar_at(-1).item() == 1.0 and s.half_log_snr_at(-1).item() == math.inf
    with pytest.raises(ConfigError, match="t: timesteps"):
        s.alpha_bar_at(T)


def test_linear_scales_with_num_timesteps() -> None:
    short = NoiseSchedule.create("linear", 100)
    assert short.betas[0].item() == pytest.approx(1e-3) and short.betas[-1].item() == pytest.approx(0.2)
    assert short.alphas_cumprod[-1] < 1e-4
    with pytest.raises(ConfigError, match="num_timesteps"):
        NoiseSchedule.create("linear", 20)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_zero_terminal_snr_rescaling(name: str) -> None:
    """Lin et al. 2023: abar_{T-1} = 0, abar_0 kept, sqrt(abar) an affine function of the original."""
    base = NoiseSchedule.create(name, T)
    zt = NoiseSchedule.create(name, T, zero_terminal_snr=True)
    assert zt.alphas_cumprod[-1].item() == 0.0 and zt.log_snr[-1].item() == -math.inf
    assert zt.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    a, b = base.alphas_cumprod.sqrt(), zt.alphas_cumprod.sqrt()
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    torch.testing.assert_close(b, slope * (a - a[-1]), atol=1e-12, rtol=0)


def test_zero_terminal_snr_refuses_epsilon_prediction() -> None:
    zt = NoiseSchedule.create("cosine", T, zero_terminal_snr=True)
    with pytest.raises(ConfigError, match=r"prediction: 'epsilon'.*zero_terminal_snr.*accepted: 'v'"):
        zt.validate_prediction("epsilon")
    zt.validate_prediction("v")
    zt.validate_prediction("x0")
    NoiseSchedule.create("cosine", T).validate_prediction("epsilon")
    with pytest.raises(ConfigError, match="prediction: unknown value 'noise'"):
        zt.validate_prediction("noise")


def test_bad_configuration_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"schedule\.name.*'linear', 'cosine' or 'sigmoid'"):
        NoiseSchedule.create("quadratic")
    with pytest.raises(ConfigError, match=r"schedule\.beta_end"):
        NoiseSchedule.create("linear", beta_end=0.1)
    with pytest.raises(ConfigError, match=r"schedule\.num_timesteps"):
        NoiseSchedule.create("cosine", 1)


def test_from_config_round_trips_through_json() -> None:
    cfg = ScheduleConfig(name="sigmoid", num_timesteps=300, zero_terminal_snr=True)
    again = NoiseSchedule.from_config(ScheduleConfig.model_validate_json(cfg.model_dump_json()))
    assert again.config == cfg
    torch.testing.assert_close(again.betas, NoiseSchedule.from_config(cfg).betas)
    assert NoiseSchedule.from_config(ScheduleConfig()).config.name == "cosine"
