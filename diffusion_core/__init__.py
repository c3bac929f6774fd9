"""diffusion_core: the math of denoising diffusion, the denoiser, and the data it learns from.

Pure PyTorch / NumPy / PyArrow: Ray and MLflow appear only in `diffusion_core.adapters`.

    from diffusion_core import NoiseSchedule, sample
    sched = NoiseSchedule.create("cosine", num_timesteps=1000)
    x0 = sample(model_fn, shape=(n, c, h, w), schedule=sched, sampler="dpmpp_2m", steps=20, seeds=[...])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names load on first use (PEP 562) so that the torch-free modules of this package (errors,
# sampling_defaults, redact, images) import without torch: the Serve HTTP front end uses them.
_EXPORTS = {
    "DataSpec": "checkpoint", "LoadedModel": "checkpoint", "ModelSpec": "checkpoint",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "EMA": "ema",
    "CheckpointError": "errors", "ConfigError": "errors", "DatasetError": "errors",
    "DiffusionPipelineError": "errors",
    "q_posterior": "forward", "q_sample": "forward", "q_step": "forward",
    "ObjectiveConfig": "objective", "convert_prediction": "objective", "training_loss": "objective",
    "SAMPLERS": "samplers", "sample": "samplers",
    "NULL_LABEL": "sampling_defaults",
    "NoiseSchedule": "schedule", "ScheduleConfig": "schedule",
    "UNet": "unet", "UNetConfig": "unet",
}

if TYPE_CHECKING:
    from diffusion_core.checkpoint import DataSpec, LoadedModel, ModelSpec, load_checkpoint, save_checkpoint
    from diffusion_core.ema import EMA
    from diffusion_core.errors import CheckpointError, ConfigError, DatasetError, DiffusionPipelineError
    from diffusion_core.forward import q_posterior, q_sample, q_step
    from diffusion_core.objective import ObjectiveConfig, convert_prediction, training_loss
    from diffusion_core.samplers import SAMPLERS, sample
    from diffusion_core.sampling_defaults import NULL_LABEL
    from diffusion_core.schedule import NoiseSchedule, ScheduleConfig
    from diffusion_core.unet import UNet, UNetConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "EMA",
    "NULL_LABEL",
    "SAMPLERS",
    "CheckpointError",
    "ConfigError",
    "DataSpec",
    "DatasetError",
    "DiffusionPipelineError",
    "LoadedModel",
    "ModelSpec",
    "NoiseSchedule",
    "ObjectiveConfig",
    "ScheduleConfig",
    "UNet",
    "UNetConfig",
    "convert_prediction",
    "load_checkpoint",
    "q_posterior",
    "q_sample",
    "q_step",
    "sample",
    "save_checkpoint",
    "training_loss",
]
