"""Helpers shared by the registry and evaluation tests: tiny digit checkpoints and a digits dataset.

It holds no tests; pytest collects it like any test module and finds none.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sklearn.datasets import load_digits
from tiny_models import TINY_UNET

from diffusion_core.checkpoint import DataSpec, ModelSpec, save_checkpoint
from diffusion_core.objective import ObjectiveConfig, training_loss
from diffusion_core.schedule import NoiseSchedule, ScheduleConfig
from diffusion_core.unet import UNet

TINY_SCHEDULE = ScheduleConfig(name="cosine", num_timesteps=200)


def make_shapes_checkpoint(directory: Path, fingerprint: str = "shapes-test") -> Path:
    """A random-init 16x16 RGB model of two labelled classes: a different data spec from digits."""
    torch.manual_seed(0)
    unet = TINY_UNET.model_copy(update={"image_size": 16, "in_channels": 3, "num_classes": 2})
    spec = ModelSpec(unet=unet, schedule=TINY_SCHEDULE, objective=ObjectiveConfig(),
                     data=DataSpec(image_size=16, channels=3, label_names=["circle", "square"],
                                   dataset_fingerprint=fingerprint))
    return save_checkpoint(directory, UNet(unet).eval(), spec)


def digits_in_model_space() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, 8, 8) float32 in [-1, 1] and int64 labels."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16 * 2 - 1
    return images, torch.tensor(data.target, dtype=torch.int64)


def make_checkpoint(directory: Path, train_steps: int, seed: int = 0, fingerprint: str = "digits-test",
                    lr: float = 1e-3, data: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """A tiny class-conditional digits model, trained for `train_steps` Adam steps (0 = random init)
    on `data` (images (N, 1, 8, 8) in [-1, 1], labels (N,)), by default all 1,797 digits."""
    torch.manual_seed(seed)
    model = UNet(TINY_UNET)
    schedule, objective = NoiseSchedule.from_config(TINY_SCHEDULE), ObjectiveConfig()
    images, labels = data if data is not None else digits_in_model_space()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(train_steps):
        batch = torch.randint(0, len(images), (64,), generator=generator)
        loss = training_loss(model, images[batch], schedule, objective, labels=labels[batch],
                             generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    spec = ModelSpec(unet=TINY_UNET, schedule=TINY_SCHEDULE, objective=objective,
                     data=DataSpec(image_size=8, channels=1, label_names=[str(i) for i in range(10)],
                                   dataset_fingerprint=fingerprint))
    return save_checkpoint(directory, model.eval(), spec)
