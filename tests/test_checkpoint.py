"""Checkpoints: bit-exact round trips without pickle, clear errors, atomic replacement, generate()."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from diffusion_core.checkpoint import (
    DataSpec,
    LoadedModel,
    ModelSpec,
    data_range_clip,
    load_checkpoint,
    read_ema_state,
    save_checkpoint,
    spec_from_json,
    spec_to_json,
)
from diffusion_core.ema import EMA
from diffusion_core.errors import CheckpointError, ConfigError
from diffusion_core.objective import ObjectiveConfig
from diffusion_core.samplers import sample
from diffusion_core.schedule import ScheduleConfig
from diffusion_core.unet import UNet, UNetConfig

CHECKPOINT_FILES = {"model.safetensors", "ema.safetensors", "spec.json"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


# One residual block more than the digits default: a model of another shape.
DEEPER = UNetConfig.digits_default().num_res_blocks + 1


def make_spec(num_classes: int | None = 10, **unet_overrides) -> ModelSpec:
    unet = UNetConfig(**{**UNetConfig.digits_default(num_classes=num_classes).model_dump(), **unet_overrides})
    labels = [str(i) for i in range(num_classes)] if num_classes else None
    return ModelSpec(
        unet=unet,
        schedule=ScheduleConfig(name="cosine", num_timesteps=100),
        objective=ObjectiveConfig(prediction="epsilon"),
        data=DataSpec(image_size=8, channels=1, label_names=labels, dataset_fingerprint="abc123"),
    )


def trained_pair(spec: ModelSpec, seed: int = 0) -> tuple[UNet, EMA]:
    """A model with random non-zero weights and an EMA that differs from it."""
    torch.manual_seed(seed)
    model = UNet(spec.unet)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ema.update(model)
    return model, ema


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, UNet, EMA, ModelSpec]:
    spec = make_spec()
    model, ema = trained_pair(spec)
    return save_checkpoint(tmp_path / "ckpt", model, spec, ema=ema), model, ema, spec


def assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_round_trip_is_bit_exact_for_raw_and_ema_weights(saved) -> None:
    path, model, ema, spec = saved
    raw = load_checkpoint(path, use_ema=False)
    assert raw.weights == "raw" and raw.spec == spec
    assert_state_equal(raw.model, model.state_dict())
    averaged = load_checkpoint(str(path))  # use_ema defaults to True; str paths work too
    assert averaged.weights == "ema"
    assert_state_equal(averaged.model, ema.shadow)
    assert not averaged.model.training
    assert not any(p.requires_grad for p in averaged.model.parameters())
    assert averaged.schedule.num_timesteps == 100
    ema_state = read_ema_state(path)
    assert ema_state["num_updates"] == 1 and ema_state["decay"] == 0.9 and ema_state["warmup"] is False


def test_checkpoint_holds_only_safetensors_and_json_and_loads_without_pickle(saved, monkeypatch) -> None:
    path, model, _, _ = saved
    assert {p.name for p in path.iterdir()} == CHECKPOINT_FILES

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert_state_equal(load_checkpoint(path, use_ema=False).model, model.state_dict())


def test_checkpoint_without_ema_falls_back_to_raw_weights(tmp_path: Path) -> None:
    spec = make_spec()
    model, _ = trained_pair(spec)
    path = save_checkpoint(tmp_path / "ckpt", model, spec)
    assert {p.name for p in path.iterdir()} == CHECKPOINT_FILES - {"ema.safetensors"}
    loaded = load_checkpoint(path, use_ema=True)
    assert loaded.weights == "raw"
    assert_state_equal(loaded.model, model.state_dict())


def test_spec_json_round_trip() -> None:
    spec = make_spec()
    text = spec_to_json(spec)
    assert json.loads(text)["format_version"] == 1
    assert json.loads(text)["data"]["value_range"] == [-1.0, 1.0]
    assert spec_from_json(text) == spec


def _edit_spec(path: Path, edit) -> None:
    raw = json.loads((path / "spec.json").read_text())
    edit(raw)
    (path / "spec.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: (p / "spec.json").write_text("{not json"), "spec.json: not valid JSON"),
        (lambda p: (p / "spec.json").unlink(), "spec.json: missing"),
        (lambda p: (p / "model.safetensors").unlink(), "model.safetensors: missing"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 20), "model.safetensors: unreadable"),
        (lambda p: _edit_spec(p, lambda s: s.update(format_version=2)), "format_version 2 is not supported"),
        (lambda p: _edit_spec(p, lambda s: s["unet"].update(base_channels=40)), "has shape"),
        (lambda p: _edit_spec(p, lambda s: s["unet"].update(num_res_blocks=DEEPER)), "keys do not match"),
        (lambda p: _edit_spec(p, lambda s: s["data"].update(image_size=16)), "data: image_size/channels"),
        (lambda p: _edit_spec(p, lambda s: s["data"].update(label_names=["a"])), "label_names"),
        (lambda p: _edit_spec(p, lambda s: s["unet"].update(colour=True)), "unet.colour"),
    ],
    ids=["bad-json", "no-spec", "no-weights", "bad-weights", "version", "shape", "keys", "data-size",
         "label-names", "unknown-field"],
)
def test_broken_checkpoints_raise_checkpoint_error_naming_the_problem(saved, corrupt, message) -> None:
    path = saved[0]
    corrupt(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, use_ema=False)


def test_missing_directory_raises_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path / "nothing")


def test_save_refuses_a_spec_that_does_not_describe_the_model(tmp_path: Path) -> None:
    model, _ = trained_pair(make_spec())
    with pytest.raises(CheckpointError, match=r"spec\.unet"):
        save_checkpoint(tmp_path / "ckpt", model, make_spec(base_channels=40))


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    spec = make_spec()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        save_checkpoint(tmp_path / "precious", UNet(spec.unet), spec)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_replacing_a_checkpoint_swaps_it_completely(saved) -> None:
    path, _, _, spec = saved
    new_model, _ = trained_pair(spec, seed=1)
    save_checkpoint(path, new_model, spec)  # no EMA this time: the old ema file must not survive
    assert {p.name for p in path.iterdir()} == CHECKPOINT_FILES - {"ema.safetensors"}
    assert_state_equal(load_checkpoint(path).model, new_model.state_dict())
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_failed_save_leaves_previous_checkpoint_intact_and_no_temp_dir(saved, monkeypatch) -> None:
    path, model, ema, spec = saved
    import diffusion_core.checkpoint as checkpoint_module

    real_save_file = checkpoint_module.save_file
    calls = []

    def fail_on_second_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # model.safetensors written, crash while writing ema.safetensors
            raise OSError("disk full")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", fail_on_second_file)
    new_model, new_ema = trained_pair(spec, seed=1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, new_model, spec, ema=new_ema)
    assert len(calls) == 2
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]
    assert_state_equal(load_checkpoint(path, use_ema=False).model, model.state_dict())
    assert_state_equal(load_checkpoint(path).model, ema.shadow)


def test_model_fn_runs_without_autograd(saved) -> None:
    loaded = load_checkpoint(saved[0])
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    out = loaded.model_fn(x, torch.tensor([0, 50]), torch.tensor([3, -1]))
    assert out.shape == (2, 1, 8, 8) and not out.requires_grad


def test_generate_returns_images_in_unit_range_matching_the_sampler(saved) -> None:
    loaded: LoadedModel = load_checkpoint(saved[0])
    images = loaded.generate(3, steps=4, seeds=[1, 2, 3], labels=[0, 5, -1], guidance_scale=2.0)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    # "auto" clipping: x0_hat clamped to the data range [-1, 1] at every step.
    raw = sample(loaded.model_fn, (3, 1, 8, 8), loaded.schedule, steps=4, seeds=[1, 2, 3],
                 labels=torch.tensor([0, 5, -1]), guidance_scale=2.0, clip_x0=1.0)
    torch.testing.assert_close(images, ((raw + 1) / 2).clamp(0, 1))
    unclipped = sample(loaded.model_fn, (3, 1, 8, 8), loaded.schedule, steps=4, seeds=[1, 2, 3],
                       labels=torch.tensor([0, 5, -1]), guidance_scale=2.0)
    torch.testing.assert_close(loaded.generate(3, steps=4, seeds=[1, 2, 3], labels=[0, 5, -1],
                                               guidance_scale=2.0, clip_x0=None),
                               ((unclipped + 1) / 2).clamp(0, 1))
    # Image i depends only on its own seed and label.
    other = loaded.generate(2, steps=4, seeds=[1, 9], labels=[0, 7], guidance_scale=2.0)
    torch.testing.assert_close(other[0], images[0], rtol=0, atol=1e-5)


def test_generate_rejects_bad_requests(saved) -> None:
    loaded = load_checkpoint(saved[0])
    with pytest.raises(ConfigError, match="num_images"):
        loaded.generate(0)
    with pytest.raises(ConfigError, match="labels"):
        loaded.generate(2, steps=2, seeds=[0, 1], labels=[1])


def test_save_refuses_an_ema_of_another_model(tmp_path: Path) -> None:
    spec = make_spec()
    model, _ = trained_pair(spec)
    _, other_ema = trained_pair(make_spec(num_res_blocks=DEEPER))
    with pytest.raises(CheckpointError, match="ema"):
        save_checkpoint(tmp_path / "ckpt", model, spec, ema=other_ema)
    assert not (tmp_path / "ckpt").exists()


def test_auto_clip_is_the_symmetric_data_range() -> None:
    spec = make_spec()
    assert spec.data.value_range == (-1.0, 1.0) and data_range_clip(spec) == 1.0
    wide = spec.model_copy(update={"data": spec.data.model_copy(update={"value_range": (-2.0, 2.0)})})
    assert data_range_clip(wide) == 2.0
    unit = spec.model_copy(update={"data": spec.data.model_copy(update={"value_range": (0.0, 1.0)})})
    assert data_range_clip(unit) is None  # a symmetric clamp would cut valid data

