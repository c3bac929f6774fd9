"""EMA: closed forms of the average with and without warm-up, buffers, state round trip, DDP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from diffusion_core.ema import EMA, unwrap_model, warmup_decay
from diffusion_core.errors import CheckpointError, ConfigError


def linear64(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 2).double()


def set_weights(model: nn.Module, source: nn.Module) -> None:
    with torch.no_grad():
        for p, q in zip(model.parameters(), source.parameters(), strict=True):
            p.copy_(q)


def assert_average_toward_fixed_target(decay: float, warmup: bool, k: int, factor: float) -> None:
    """EMA from a model's initial weights, updated k times with the model held at a fixed target:
    the shadow must be target + (init - target) * factor."""
    model, target = linear64(0), linear64(1)
    init = {name: v.clone() for name, v in model.state_dict().items()}
    ema = EMA(model, decay=decay, warmup=warmup)
    set_weights(model, target)
    for _ in range(k):
        ema.update(model)
    assert ema.num_updates == k
    for name, value in target.state_dict().items():
        expected = value + (init[name] - value) * factor
        torch.testing.assert_close(ema.shadow[name], expected, rtol=1e-12, atol=1e-12)


def test_constant_decay_matches_closed_form() -> None:
    """Without warm-up, k updates toward a fixed target give target + (init - target) * decay**k."""
    assert_average_toward_fixed_target(decay=0.9, warmup=False, k=7, factor=0.9**7)


def test_warmup_decay_formula() -> None:
    assert [warmup_decay(0.999, n) for n in range(3)] == [pytest.approx(v) for v in (1 / 10, 2 / 11, 3 / 12)]
    assert warmup_decay(0.5, 8) == pytest.approx(0.5)  # 9/18 = 0.5
    assert warmup_decay(0.5, 100) == 0.5  # capped at decay
    assert warmup_decay(0.9999, 10**6) == 0.9999


def test_warmup_average_matches_product_of_decays() -> None:
    """With warm-up, ema_k = target + (init - target) * prod_{n<k} min(decay, (1+n)/(10+n))."""
    factor = math.prod(min(0.5, (1 + n) / (10 + n)) for n in range(12))
    assert_average_toward_fixed_target(decay=0.5, warmup=True, k=12, factor=factor)


def test_float_buffers_are_averaged_and_integer_buffers_copied() -> None:
    torch.manual_seed(0)
    model = nn.BatchNorm1d(4).double()
    ema = EMA(model, decay=0.5, warmup=False)
    model(torch.randn(8, 4, dtype=torch.float64) + 3.0)  # train mode: updates running stats
    ema.update(model)
    state = model.state_dict()
    # running_mean starts at 0: after one update with d = 0.5 the average is half the new value.
    torch.testing.assert_close(ema.shadow["running_mean"], 0.5 * state["running_mean"])
    assert ema.shadow["num_batches_tracked"].item() == 1


def test_copy_to_and_averaged_model_use_the_average() -> None:
    model, target = linear64(0), linear64(1)
    ema = EMA(model, decay=0.5, warmup=False)
    set_weights(model, target)
    ema.update(model)
    averaged = ema.averaged_model(model)
    assert not averaged.training and not any(p.requires_grad for p in averaged.parameters())
    torch.testing.assert_close(averaged.weight, ema.shadow["weight"])
    torch.testing.assert_close(model.weight, target.weight)  # the original is untouched
    ema.copy_to(model)
    torch.testing.assert_close(model.weight, ema.shadow["weight"])


def test_low_precision_models_keep_a_float32_average() -> None:
    model = nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(model, decay=0.9999, warmup=False)
    assert ema.shadow["weight"].dtype == torch.float32
    ema.update(model)
    ema.copy_to(model)
    assert model.weight.dtype == torch.bfloat16


def test_state_dict_round_trip_continues_identically() -> None:
    model, other = linear64(0), linear64(5)
    ema = EMA(model, decay=0.99, warmup=True)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(0.1)
        ema.update(model)
    restored = EMA(other, decay=0.5, warmup=False)
    restored.load_state_dict(ema.state_dict())
    assert (restored.num_updates, restored.decay, restored.warmup) == (3, 0.99, True)
    ema.update(model)
    restored.update(model)
    for name in ema.shadow:
        assert torch.equal(ema.shadow[name], restored.shadow[name])


def test_mismatched_state_and_bad_decay_are_rejected() -> None:
    ema = EMA(nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="weight"):
        bad_shadow = {"weight": torch.zeros(5, 5), "bias": torch.zeros(2)}
        ema.load_state_dict({"shadow": bad_shadow, "num_updates": 0})
    with pytest.raises(CheckpointError, match="missing"):
        ema.update(nn.Linear(3, 2, bias=False))
    with pytest.raises(ConfigError, match="decay"):
        EMA(nn.Linear(3, 2), decay=1.0)


def test_ddp_wrapped_model_is_unwrapped(tmp_path) -> None:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = linear64(0)
        wrapped = nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(wrapped) is model
        ema = EMA(wrapped, decay=0.5, warmup=False)
        assert set(ema.shadow) == {"weight", "bias"}  # no "module." prefix
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(wrapped)
        ema.copy_to(wrapped)
        torch.testing.assert_close(model.weight, ema.shadow["weight"])
    finally:
        dist.destroy_process_group()
