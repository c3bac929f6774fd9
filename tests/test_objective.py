"""Parameterisations, min-SNR weights and the training loss."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from diffusion_core.errors import ConfigError
from diffusion_core.forward import broadcast_to
from diffusion_core.objective import (
    ObjectiveConfig,
    convert_prediction,
    from_x0_and_eps,
    min_snr_weight,
    sample_timesteps,
    to_x0_and_eps,
    training_loss,
)
from diffusion_core.schedule import NoiseSchedule

KINDS = ("epsilon", "v", "x0")


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.create("cosine", 1000)


def _pair(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64)
    return x0, eps, torch.tensor([0, 1, 100, 500, 990, 998])


@pytest.mark.parametrize("source", KINDS)
@pytest.mark.parametrize("target", KINDS)
def test_conversions_are_exact(sched: NoiseSchedule, source: str, target: str) -> None:
    x0, eps, t = _pair()
    alpha, sigma = (broadcast_to(c, x0) for c in sched.alpha_sigma_at(t))
    x_t = alpha * x0 + sigma * eps
    truth = {"epsilon": eps, "x0": x0, "v": alpha * eps - sigma * x0}  # Salimans & Ho 2022
    converted = convert_prediction(truth[source], x_t, t, sched, source, target)
    torch.testing.assert_close(converted, truth[target], rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_x0_and_eps(sched: NoiseSchedule, kind: str) -> None:
    x0, eps, t = _pair()
    alpha, sigma = (broadcast_to(c, x0) for c in sched.alpha_sigma_at(t))
    x_t = alpha * x0 + sigma * eps
    back = to_x0_and_eps(from_x0_and_eps(x0, eps, alpha, sigma, kind), x_t, alpha, sigma, kind)
    torch.testing.assert_close(back[0], x0, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(back[1], eps, rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_min_snr_weight_equals_min_snr_times_x0_error(sched: NoiseSchedule, kind: str) -> None:
    """Hang et al. 2023: for any prediction, weight * its own MSE = min(SNR, gamma) * MSE of x0."""
    x0, eps, t = _pair()
    alpha, sigma = (broadcast_to(c, x0) for c in sched.alpha_sigma_at(t))
    x_t = alpha * x0 + sigma * eps
    x0_err = 0.01 * torch.randn_like(x0)
    eps_hat = (x_t - alpha * (x0 + x0_err)) / sigma  # the model's estimate, at the same x_t
    own_err = from_x0_and_eps(x0 + x0_err, eps_hat, alpha, sigma, kind) - from_x0_and_eps(
        x0, eps, alpha, sigma, kind
    )
    snr = sched.log_snr[t].exp()
    weighted = min_snr_weight(snr, 5.0, kind) * own_err.pow(2).flatten(1).mean(1)
    torch.testing.assert_close(weighted, snr.clamp(max=5.0) * x0_err.pow(2).flatten(1).mean(1))


def _exact_model(sched: NoiseSchedule, kind: str):
    """For data x0 = 0, x_t = sigma eps: the exact prediction of every kind is known from x_t alone."""

    def model_fn(x_t, t, labels):
        alpha, sigma = (broadcast_to(c, x_t) for c in sched.alpha_sigma_at(t))
        return from_x0_and_eps(torch.zeros_like(x_t), x_t / sigma, alpha, sigma, kind)

    return model_fn


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_zero_for_the_exact_model_only(sched: NoiseSchedule, kind: str) -> None:
    x0 = torch.zeros(64, 1, 8, 8)
    objective = ObjectiveConfig(prediction=kind)
    gen = torch.Generator().manual_seed(0)
    assert training_loss(_exact_model(sched, kind), x0, sched, objective, generator=gen).item() < 1e-8
    wrong = "x0" if kind == "epsilon" else "epsilon"
    gen = torch.Generator().manual_seed(0)
    assert training_loss(_exact_model(sched, wrong), x0, sched, objective, generator=gen).item() > 1e-2


def test_loss_of_zero_model_is_noise_power_and_reproducible(sched: NoiseSchedule) -> None:
    x0 = torch.randn(256, 1, 8, 8)
    zero = lambda x, t, labels: torch.zeros_like(x)  # noqa: E731
    objective = ObjectiveConfig()
    first = training_loss(zero, x0, sched, objective, generator=torch.Generator().manual_seed(3))
    again = training_loss(zero, x0, sched, objective, generator=torch.Generator().manual_seed(3))
    assert first.ndim == 0 and first.dtype == torch.float32
    assert first.item() == again.item()
    assert first.item() == pytest.approx(1.0, abs=0.05)  # E[eps^2] = 1


def test_min_snr_loss_applies_the_weight(sched: NoiseSchedule) -> None:
    x0 = torch.zeros(512, 1, 2, 2)
    zero = lambda x, t, labels: torch.zeros_like(x)  # noqa: E731
    gen = torch.Generator().manual_seed(5)
    t = sample_timesteps(512, sched, gen, x0.device)
    noise = torch.randn(x0.shape, generator=gen)
    weight = min_snr_weight(sched.log_snr[t].exp(), 5.0, "epsilon")
    expected = (noise.pow(2).flatten(1).mean(1) * weight).mean()
    objective = ObjectiveConfig(min_snr_gamma=5.0)
    got = training_loss(zero, x0, sched, objective, generator=torch.Generator().manual_seed(5))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_timesteps_are_uniform(sched: NoiseSchedule) -> None:
    t = sample_timesteps(200_000, sched, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 999
    counts = torch.bincount(t, minlength=1000).double()
    chi2 = ((counts - 200.0) ** 2 / 200.0).sum().item()
    assert chi2 < 1150  # 999 degrees of freedom: mean 999, sd 45


def test_zero_terminal_snr_refuses_epsilon_training() -> None:
    zt = NoiseSchedule.create("linear", 1000, zero_terminal_snr=True)
    zero = lambda x, t, labels: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ConfigError, match="zero_terminal_snr"):
        training_loss(zero, torch.zeros(2, 1, 2, 2), zt, ObjectiveConfig(prediction="epsilon"))
    v_objective = ObjectiveConfig(prediction="v", min_snr_gamma=5.0)
    loss = training_loss(zero, torch.zeros(2, 1, 2, 2), zt, v_objective)
    assert torch.isfinite(loss)


def test_objective_config_validates() -> None:
    with pytest.raises(ValidationError, match="prediction"):
        ObjectiveConfig(prediction="noise")
    with pytest.raises(ValidationError, match="min_snr_gamma"):
        ObjectiveConfig(min_snr_gamma=0.0)
