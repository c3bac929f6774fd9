"""Hostile checkpoints: a spec.json or a weights file must not make a loader (a Serve replica, the
evaluator, a resumed training run) allocate more than the checkpoint really holds.

Every size in spec.json is bounded, and the weights' names, shapes and dtypes are read from the
safetensors header and compared with what the spec implies before any model or tensor is
allocated. The tests watch UNet construction: the loader may build one on the meta device (no
memory) to learn the expected shapes, never on a real device before the check has passed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import diffusion_core.checkpoint as checkpoint_module
from diffusion_core.checkpoint import (
    DataSpec,
    ModelSpec,
    load_checkpoint,
    read_ema_state,
    read_spec,
    save_checkpoint,
)
from diffusion_core.errors import CheckpointError
from diffusion_core.objective import ObjectiveConfig
from diffusion_core.schedule import ScheduleConfig
from diffusion_core.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def digits_spec() -> ModelSpec:
    return ModelSpec(
        unet=UNetConfig.digits_default(10), schedule=ScheduleConfig(num_timesteps=100),
        objective=ObjectiveConfig(),
        data=DataSpec(image_size=8, channels=1, label_names=[str(i) for i in range(10)]),
    )


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    spec = digits_spec()
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ckpt", UNet(spec.unet), spec)


@pytest.fixture()
def no_unchecked_allocation(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fails any UNet built on a real device by the loader before its weights were checked (a
    hostile spec could make that allocation unbounded), without performing it; yields the devices
    of the UNets the loader did build."""
    built: list[str] = []

    def watched_unet(config: UNetConfig) -> UNet:
        device = torch.empty(0).device.type  # the default device of the caller's context
        if device != "meta" and not built_after_check:
            raise AssertionError(f"a UNet was allocated on {device} before the weights were checked")
        built.append(device)
        return UNet(config)

    built_after_check: list[bool] = []
    original_read = checkpoint_module._read_weights

    def read_after_check(path: Path):  # reached only once the header check has passed
        built_after_check.append(True)
        return original_read(path)

    monkeypatch.setattr(checkpoint_module, "UNet", watched_unet)
    monkeypatch.setattr(checkpoint_module, "_read_weights", read_after_check)
    yield built


def edit_spec(path: Path, **unet_fields: object) -> None:
    raw = json.loads((path / "spec.json").read_text())
    raw["unet"].update(unet_fields)
    (path / "spec.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(("field", "value"), [
    ("channel_mult", [1, 100_000]),
    ("num_classes", 10**9),
    ("attention_resolutions", [4] * 10_000),
])
def test_spec_sizes_beyond_their_bounds_are_refused_naming_the_field(checkpoint: Path, field: str,
                                                                     value: object) -> None:
    edit_spec(checkpoint, **{field: value}, **({"num_classes": None} if field == "channel_mult" else {}))
    if field == "num_classes":  # the data's label names must agree with the classes
        raw = json.loads((checkpoint / "spec.json").read_text())
        raw["data"]["label_names"] = None
        (checkpoint / "spec.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=rf"spec\.json: unet\.{field}"):
        read_spec(checkpoint)


def test_too_many_label_names_are_refused(checkpoint: Path) -> None:
    raw = json.loads((checkpoint / "spec.json").read_text())
    raw["unet"]["num_classes"] = None
    raw["data"]["label_names"] = ["x"] * 200_000
    (checkpoint / "spec.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"data\.label_names"):
        read_spec(checkpoint)


def test_an_oversized_spec_file_is_refused_before_it_is_parsed(checkpoint: Path) -> None:
    path = checkpoint / "spec.json"
    path.write_text(path.read_text() + " " * (2 << 20))  # valid JSON, 2 MiB of padding
    with pytest.raises(CheckpointError, match=r"spec\.json: larger than"):
        read_spec(checkpoint)


def test_a_spec_larger_than_its_weights_is_refused_before_allocating(checkpoint: Path,
                                                                     no_unchecked_allocation) -> None:
    # Within every field's bounds, but about 100 times the digits model; the weights are the digits'.
    edit_spec(checkpoint, base_channels=128, channel_mult=[1, 4], num_res_blocks=4)
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*spec.unet"):
        load_checkpoint(checkpoint, use_ema=False)
    assert set(no_unchecked_allocation) <= {"meta"}


def test_a_spec_beyond_the_parameter_limit_is_refused_before_allocating(checkpoint: Path,
                                                                        no_unchecked_allocation) -> None:
    # Every field within its bounds, together billions of parameters (tens of GB of fp32).
    edit_spec(checkpoint, image_size=8, base_channels=512, channel_mult=[8, 8, 8, 8], num_res_blocks=4,
              attention_resolutions=[1])
    with pytest.raises(CheckpointError, match="parameters"):
        load_checkpoint(checkpoint, use_ema=False)
    assert set(no_unchecked_allocation) <= {"meta"}


def test_weights_of_a_wider_dtype_are_refused(checkpoint: Path) -> None:
    from safetensors.torch import load_file

    doubled = {k: v.double() for k, v in load_file(checkpoint / "model.safetensors").items()}
    save_file(doubled, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="F64"):
        load_checkpoint(checkpoint, use_ema=False)


def test_ema_weights_are_checked_against_the_spec_before_loading(checkpoint: Path) -> None:
    other = UNet(UNetConfig.digits_default(10).model_copy(update={"base_channels": 16}))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, checkpoint / "ema.safetensors",
              metadata={"num_updates": "1", "decay": "0.9", "warmup": "True"})
    with pytest.raises(CheckpointError, match=r"ema.safetensors: .*spec.unet"):
        read_ema_state(checkpoint)


def test_a_matching_checkpoint_still_loads(checkpoint: Path, no_unchecked_allocation) -> None:
    loaded = load_checkpoint(checkpoint, use_ema=False)
    assert loaded.spec == digits_spec()
    assert no_unchecked_allocation[-1] == "cpu"
