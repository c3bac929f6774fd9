"""Exponential moving average of model weights, the weights diffusion models are sampled from.

After every optimiser step n = 0, 1, 2, ... (n = number of updates done before this one):

    d_n       = min(decay, (1 + n) / (10 + n))    if warmup else decay
    ema_{n+1} = d_n * ema_n + (1 - d_n) * theta_{n+1}

The warm-up (the `num_updates` rule of TensorFlow's tf.train.ExponentialMovingAverage) keeps the
average from being dominated by the random initialisation early on: d_0 = 0.1, d_1 = 2/11, ...
approaching `decay`. With warmup=False and a
fixed target theta the closed form is ema_k = theta + (ema_0 - theta) * decay**k.

Every floating-point entry of the model's state_dict is averaged (parameters and float buffers);
integer buffers (counters) are copied. Shadow tensors are kept in float32 even when the model
runs in bf16/fp16, so that small increments (1 - d) * delta are not lost to rounding.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from diffusion_core.errors import CheckpointError, ConfigError


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel (`.module`) or torch.compile
    (`._orig_mod`) wrappers, so that state_dict keys carry no wrapper prefix."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def warmup_decay(decay: float, num_updates: int) -> float:
    """d_n = min(decay, (1 + n) / (10 + n)): the decay used for update number n (0-based)."""
    return min(decay, (1 + num_updates) / (10 + num_updates))


def _shadow_copy(t: Tensor) -> Tensor:
    t = t.detach()
    return t.clone().float() if t.dtype in (torch.float16, torch.bfloat16) else t.clone()


class EMA:
    """EMA of a model's state_dict. `update(model)` after each optimiser step; `copy_to(model)` or
    `averaged_model(model)` to sample with the averaged weights."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay: must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            k: _shadow_copy(v) for k, v in unwrap_model(model).state_dict().items()
        }

    def current_decay(self) -> float:
        """The decay the next update will use."""
        return warmup_decay(self.decay, self.num_updates) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- d * ema + (1 - d) * theta for every float tensor of the model (see module docstring)."""
        d = self.current_decay()
        state = unwrap_model(model).state_dict()
        self._check_keys(state.keys(), "model")
        for name, shadow in self.shadow.items():
            value = state[name].detach()
            if shadow.is_floating_point():
                shadow.lerp_(value.to(shadow.dtype), 1.0 - d)
            else:
                shadow.copy_(value)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights (and buffers) with the averaged ones."""
        target = unwrap_model(model)
        self._check_keys(target.state_dict().keys(), "model")
        target.load_state_dict(self.shadow, strict=True)

    def averaged_model(self, model: nn.Module) -> nn.Module:
        """A deep copy of the (unwrapped) model holding the EMA weights, in eval mode, without grads."""
        clone = copy.deepcopy(unwrap_model(model))
        self.copy_to(clone)
        return clone.eval().requires_grad_(False)

    def state_dict(self) -> dict[str, object]:
        """{"decay", "warmup", "num_updates", "shadow": {name: tensor}}; tensors are copies."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore from `state_dict()` output; keys and shapes must match this EMA's model."""
        shadow = state["shadow"]
        self._check_keys(shadow.keys(), "state['shadow']")
        for name, value in shadow.items():
            if tuple(value.shape) != tuple(self.shadow[name].shape):
                raise CheckpointError(
                    f"ema: tensor {name!r} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(self.shadow[name].shape)}"
                )
        with torch.no_grad():
            for name, value in shadow.items():
                self.shadow[name].copy_(value)
        self.num_updates = int(state["num_updates"])
        self.decay = float(state.get("decay", self.decay))
        self.warmup = bool(state.get("warmup", self.warmup))

    def _check_keys(self, keys, source: str) -> None:
        keys = set(keys)
        missing, unexpected = sorted(set(self.shadow) - keys), sorted(keys - set(self.shadow))
        if missing or unexpected:
            raise CheckpointError(
                f"ema: {source} does not match the averaged model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
