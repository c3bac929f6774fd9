"""Forward process: q_sample statistics, the one-step Markov kernel, and the posterior against Bayes' rule."""

from __future__ import annotations

import pytest
import torch

from diffusion_core.forward import q_posterior, q_sample, q_step
from diffusion_core.schedule import NoiseSchedule

N = 200_000


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.create("linear", 1000)


@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_has_the_closed_form_moments(sched: NoiseSchedule, t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    x0 = torch.full((N, 1), 0.7, dtype=torch.float64)
    x_t = q_sample(x0, torch.full((N,), t), torch.randn(N, 1, generator=gen, dtype=torch.float64), sched)
    abar = sched.alphas_cumprod[t].item()
    assert x_t.mean().item() == pytest.approx(abar**0.5 * 0.7, abs=4 * (1 - abar) ** 0.5 / N**0.5 + 1e-12)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=0.02, abs=1e-12)


def test_q_step_chain_matches_q_sample(sched: NoiseSchedule) -> None:
    """Composing q(x_t | x_{t-1}) for t = 0..k gives q(x_k | x_0) (Ho et al. 2020, eq. 4)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.full((N // 4, 1), -0.4, dtype=torch.float64)
    k = 300
    for t in range(k + 1):
        x = q_step(x, t, torch.randn(N // 4, 1, generator=gen, dtype=torch.float64), sched)
    abar = sched.alphas_cumprod[k].item()
    assert x.mean().item() == pytest.approx(-0.4 * abar**0.5, abs=0.01)
    assert x.var().item() == pytest.approx(1 - abar, rel=0.02)


@pytest.mark.parametrize(("t", "s"), [(1, 0), (500, 499), (999, 998), (600, 300), (40, 0)])
def test_posterior_is_bayes_rule(sched: NoiseSchedule, t: int, s: int) -> None:
    """q(x_s | x_t, x_0) ∝ q(x_t | x_s) q(x_s | x_0): the product of two Gaussians in x_s."""
    abar_t, abar_s = sched.alphas_cumprod[t].item(), sched.alphas_cumprod[s].item()
    a_ts, var_ts = (abar_t / abar_s) ** 0.5, 1 - abar_t / abar_s  # q(x_t | x_s) = N(a_ts x_s, var_ts)
    precision = 1 / (1 - abar_s) + a_ts**2 / var_ts
    x0 = torch.tensor([[0.3], [-1.0]], dtype=torch.float64)
    x_t = torch.tensor([[1.2], [0.1]], dtype=torch.float64)
    expected_mean = (abar_s**0.5 * x0 / (1 - abar_s) + a_ts * x_t / var_ts) / precision
    mean, variance = q_posterior(x0, x_t, torch.tensor([t, t]), sched, t_prev=torch.tensor([s, s]))
    torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(variance, torch.full((2, 1), 1 / precision, dtype=torch.float64))


def test_posterior_default_is_previous_step_and_ends_at_x0(sched: NoiseSchedule) -> None:
    x0, x_t = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([5, 70, 999])
    default = q_posterior(x0, x_t, t, sched)
    explicit = q_posterior(x0, x_t, t, sched, t_prev=t - 1)
    torch.testing.assert_close(default, explicit)
    # Ho et al.'s beta-tilde = (1 - abar_{t-1}) / (1 - abar_t) beta_t
    bt = (1 - sched.alphas_cumprod[t - 1]) / (1 - sched.alphas_cumprod[t]) * sched.betas[t]
    torch.testing.assert_close(default[1].flatten(), bt)
    mean, variance = q_posterior(x0, x_t, 0, sched)  # t = 0 -> s = -1: the clean data itself
    torch.testing.assert_close(mean, x0)
    assert variance.item() == 0.0
