"""Requests without labels sample the model's marginal: labels drawn from the class prior by seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_core.checkpoint import DataSpec, LoadedModel, ModelSpec
from diffusion_core.class_prior import class_prior, marginal_labels
from diffusion_core.errors import ConfigError
from diffusion_core.objective import ObjectiveConfig
from diffusion_core.schedule import ScheduleConfig
from diffusion_core.unet import UNet, UNetConfig


def test_marginal_labels_follow_the_prior() -> None:
    """Frequencies of 20,000 draws match the prior within 4 standard errors (multinomial)."""
    prior = [0.5, 0.3, 0.15, 0.05]
    labels = np.asarray(marginal_labels(range(20_000), prior))
    freq = np.bincount(labels, minlength=4) / len(labels)
    stderr = np.sqrt(np.asarray(prior) * (1 - np.asarray(prior)) / len(labels))
    assert np.all(np.abs(freq - prior) < 4 * stderr)


def test_a_label_depends_only_on_its_own_seed() -> None:
    prior = class_prior([10, 20, 30, 40])
    together = marginal_labels([7, 99, 123456789, 2**63 - 1], prior)
    alone = [marginal_labels([s], prior)[0] for s in (7, 99, 123456789, 2**63 - 1)]
    assert together == alone


def test_class_prior_rejects_counts_without_a_total() -> None:
    with pytest.raises(ConfigError, match="class_counts"):
        class_prior([0, 0])


def _model(prior: list[float] | None) -> LoadedModel:
    unet = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                      attention_resolutions=(), num_heads=1, num_classes=3)
    spec = ModelSpec(unet=unet, schedule=ScheduleConfig(), objective=ObjectiveConfig(),
                     data=DataSpec(image_size=8, channels=1, class_prior=prior))
    torch.manual_seed(0)
    net = UNet(unet).eval()
    with torch.no_grad():  # a fresh UNet's output layer is zero: give the labels a visible effect
        for param in net.parameters():
            param.normal_(0.0, 0.2)
    return LoadedModel(net, spec, weights="raw")


def test_generate_without_labels_draws_each_image_label_from_the_prior() -> None:
    """No labels -> the labels of `default_labels`; a prior of (0, 1, 0) makes every image class 1."""
    loaded = _model([0.0, 1.0, 0.0])
    assert loaded.default_labels([3, 4, 5]) == [1, 1, 1]
    drawn = loaded.generate(3, steps=2, seeds=[3, 4, 5])
    explicit = loaded.generate(3, steps=2, seeds=[3, 4, 5], labels=[1, 1, 1])
    null = loaded.generate(3, steps=2, seeds=[3, 4, 5], unconditional=True)
    assert torch.equal(drawn, explicit)
    assert not torch.equal(drawn, null)


def test_a_spec_prior_must_be_a_distribution_over_the_classes() -> None:
    with pytest.raises(ValueError, match="class_prior"):
        _model([0.5, 0.5])
    with pytest.raises(ValueError, match="class_prior"):
        _model([0.5, 0.6, -0.1])
