"""Noise schedules against closed forms and reference values (float64, T = 1000)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.errors import ConfigError
from diffusion_core.schedule import NoiseSchedule, ScheduleConfig

T = 1000


def cosine_abar(t: int, s: float = 0.008) -> float:
    """Nichol & Dhariwal 2021, eq. 17, at the end of step t (u = (t + 1) / T)."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f((t + 1) / T) / f(0.0)


@pytest.mark.parametrize(("t", "expected"), [(0, 0.9999), (499, 0.0785872429), (999, 4.0358298e-05)])
def test_linear_reference_values(t: int, expected: float) -> None:
    sched = NoiseSchedule.create("linear", T)
    assert sched.alphas_cumprod.dtype == torch.float64 and sched.betas.shape == (T,)
    assert sched.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-8)


def test_linear_closed_form() -> None:
    sched = NoiseSchedule.create("linear", T)
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    for t in (0, T // 2, T - 1):
        expected = torch.prod(1 - betas[: t + 1]).item()
        assert sched.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("t", "expected"),
                         [(0, 0.9999587158), (499, 0.4938435904), (998, 2.4287669e-06), (999, 2.4287669e-09)])
def test_cosine_reference_values(t: int, expected: float) -> None:
    sched = NoiseSchedule.create("cosine", T)
    assert sched.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-6)


def test_cosine_closed_form_and_only_last_beta_clipped() -> None:
    sched = NoiseSchedule.create("cosine", T)
    for t in (0, T // 2, T - 2):
        assert sched.alphas_cumprod[t].item() == pytest.approx(cosine_abar(t), rel=1e-9)
    assert sched.betas[-1].item() == pytest.approx(0.999)
    assert (sched.betas[:-1] < 0.999).all()


def test_log_snr_and_monotonicity() -> None:
    for name in ("linear", "cosine", "sigmoid"):
        sched = NoiseSchedule.create(name, T)
        abar = sched.alphas_cumprod
        assert torch.allclose(sched.log_snr, torch.log(abar / (1 - abar)), rtol=1e-10)
        assert (sched.log_snr[1:] < sched.log_snr[:-1]).all(), name
        assert (sched.betas > 0).all() and (sched.betas < 1).all()
    lam = NoiseSchedule.create("cosine", T).half_log_snr_at(torch.arange(995, 1000))
    assert lam.tolist() == pytest.approx([-5.078, -5.365, -5.771, -6.464, -9.918], abs=2e-3)


def test_timestep_from_log_snr_inverts_the_table() -> None:
    sched = NoiseSchedule.create("cosine", T)
    t = torch.tensor([0, 10, 500, 998])
    assert sched.timestep_from_log_snr(sched.log_snr[t]).tolist() == pytest.approx(t.double().tolist())


def test_zero_terminal_snr_rescaling_and_epsilon_refusal() -> None:
    sched = NoiseSchedule.create("linear", T, zero_terminal_snr=True)
    base = NoiseSchedule.create("linear", T)
    assert sched.alphas_cumprod[-1].item() == 0.0
    assert sched.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    with pytest.raises(ConfigError, match="epsilon"):
        sched.validate_prediction("epsilon")
    sched.validate_prediction("v")
    base.validate_prediction("epsilon")


def test_bad_names_and_sizes_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"schedule\.name"):
        NoiseSchedule.create("quadratic", T)
    with pytest.raises(ConfigError, match=r"schedule\.num_timesteps"):
        NoiseSchedule.create("cosine", 1)
    assert NoiseSchedule.from_config(ScheduleConfig()).config.name == "cosine"
