"""The pure-PyTorch training core: LR schedule, data position, label dropout, non-finite handling,
checkpoint round trip and exact resume (no Ray, no MLflow)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_UNET

from diffusion_core.checkpoint import DataSpec, ModelSpec, load_checkpoint
from diffusion_core.data.manifest import DatasetManifest
from diffusion_core.errors import CheckpointError, ConfigError
from diffusion_core.guidance import NULL_LABEL
from diffusion_core.objective import ObjectiveConfig
from diffusion_core.seeds import Stream, derived_seed
from diffusion_core.training import (
    TRAINING_STATE_DIR,
    TrainConfig,
    TrainingDivergedError,
    TrainPlacement,
    TrainRecipe,
    TrainTracking,
    build_train_state,
    drop_labels,
    load_training_checkpoint,
    load_weights,
    lr_factor,
    read_training_step,
    save_training_checkpoint,
    train_step,
)
from flows.config import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


def tiny_config(**overrides: object) -> TrainConfig:
    base = dict(dataset="unused", unet=TINY_UNET, steps=8, batch_size=16, warmup_steps=2, lr=1e-3)
    return TrainConfig(**{**base, **overrides})


def tiny_spec(config: TrainConfig) -> ModelSpec:
    data = DataSpec(image_size=8, channels=1, label_names=[str(i) for i in range(10)])
    return ModelSpec(unet=config.unet, schedule=config.schedule, objective=config.objective, data=data)


def fake_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1, torch.randint(0, 10, (n,), generator=gen)


def run_steps(state, config: TrainConfig, images: torch.Tensor, labels: torch.Tensor, until: int) -> None:
    """Steps on consecutive slices of the data (the order the workers read is tested elsewhere)."""
    while state.step < until:
        rows = (state.step * config.batch_size + torch.arange(config.batch_size)) % images.shape[0]
        train_step(state, config, images[rows], labels[rows])


def test_lr_schedule_matches_warmup_and_cosine_closed_form() -> None:
    warmup, total, r = 10, 110, 0.1
    assert lr_factor(0, warmup, total, r) == pytest.approx(1 / 10)
    assert lr_factor(9, warmup, total, r) == pytest.approx(1.0)
    assert lr_factor(10, warmup, total, r) == pytest.approx(1.0)
    assert lr_factor(60, warmup, total, r) == pytest.approx(r + (1 - r) * 0.5)  # cos(pi/2) = 0
    assert lr_factor(35, warmup, total, r) == pytest.approx(r + (1 - r) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, warmup, total, r) == pytest.approx(r)


def test_label_dropout_rate_is_p() -> None:
    n, p = 20_000, 0.1
    dropped = drop_labels(torch.zeros(n, dtype=torch.long), p, torch.Generator().manual_seed(0))
    rate = (dropped == NULL_LABEL).float().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 binomial standard deviations
    assert set(dropped.unique().tolist()) == {0, NULL_LABEL}


def test_config_rejects_bad_values_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(TrainConfig, "train", overrides={"dataset": "d", "batch_size": 10, "num_workers": 3})
    with pytest.raises(ConfigError, match="lr"):
        load_config(TrainConfig, "train", overrides={"dataset": "d", "lr": -1.0})
    with pytest.raises(ConfigError, match="nonsense"):
        load_config(TrainConfig, "train", overrides={"dataset": "d", "nonsense": 1})


@pytest.mark.parametrize(("overrides", "field"), [
    ({"sampler": "euler"}, "sampler"),
    ({"sample_steps": 5000}, "sample_steps"),
    ({"steps": 100, "warmup_steps": 100}, "warmup_steps"),
    ({"schedule.zero_terminal_snr": True}, "objective.prediction"),
    ({"run_name": "it's"}, "run_name"),
])
def test_config_rejects_what_would_only_fail_in_the_workers(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_config(TrainConfig, "train", overrides={"dataset": "d", **overrides})


def test_config_accepts_zero_terminal_snr_with_v_prediction() -> None:
    config = load_config(TrainConfig, "train", overrides={
        "dataset": "d", "schedule.zero_terminal_snr": True, "objective.prediction": "v"})
    assert config.schedule.zero_terminal_snr and config.objective.prediction == "v"


def test_random_streams_of_a_step_and_an_epoch_have_distinct_seeds() -> None:
    seeds = {derived_seed(0, 0, 3, stream) for stream in Stream}
    assert len(seeds) == len(Stream)


def test_environment_fills_tracking_uri_and_ray_address() -> None:
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "RAY_ADDRESS": "ray://h:10001"}
    config = load_config(TrainConfig, "train", overrides={"dataset": "d"}, environ=env)
    assert (config.tracking_uri, config.ray_address) == ("http://127.0.0.1:1", "ray://h:10001")


def test_flat_train_section_fills_recipe_placement_and_tracking(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("train: {steps: 5000, batch_size: 256, num_workers: 2, tracking_uri: 'sqlite:///m.db'}\n")
    config = load_config(TrainConfig, "train", path, overrides={"dataset": "d", "unet.base_channels": 16})
    recipe = config.recipe
    assert (recipe.steps, recipe.batch_size, recipe.unet.base_channels) == (5000, 256, 16)
    assert (config.num_workers, config.per_worker_batch_size, config.tracking_uri) == (2, 128, "sqlite:///m.db")
    assert not {"num_workers", "tracking_uri"} & set(recipe.model_dump())


def test_every_field_has_one_group_and_only_the_recipe_defines_the_model() -> None:
    groups = [set(group.model_fields) for group in (TrainRecipe, TrainPlacement, TrainTracking)]
    inputs = {"dataset", "run_name", "warm_start"}  # this run's inputs (the key has the data's fingerprint)
    assert sum(map(len, groups)) + len(inputs) == len(TrainConfig.model_fields)
    assert set().union(*groups, inputs) == set(TrainConfig.model_fields)
    base = tiny_config()
    moved = tiny_config(num_workers=2, ray_address="ray://h:1", storage_path="s3://b/r", tracking_uri="x://",
                        log_every=1, sample_every=None, compile=True, max_failures=3, run_name="other",
                        dataset="elsewhere", warm_start="/ckpt")
    assert moved.recipe == base.recipe
    assert tiny_config(lr=1e-4).recipe != base.recipe and tiny_config(seed=1).recipe != base.recipe


def test_training_key_of_registered_versions_is_stable() -> None:
    """Registered versions carry their training key as a tag; the pipeline skips retraining when it
    finds the same key, so the key of a given config must not change. Both values are the keys of
    these configs as registered versions carry them; they change only when what the config learns
    changes (a new default of the recipe, a new derived UNet layout), and then on purpose."""
    from flows.pipeline import PipelineConfig, training_key

    digits = DatasetManifest.model_construct(**{**dict.fromkeys(DatasetManifest.model_fields),
                                                "image_size": 8, "channels": 1,
                                                "label_names": [str(i) for i in range(10)]})
    rgb = DatasetManifest.model_construct(**{**dict.fromkeys(DatasetManifest.model_fields),
                                             "image_size": 32, "channels": 3, "label_names": None})
    default = PipelineConfig().train_config(digits, "/data/a", "run-a", None)
    assert training_key("fp", default) == "d6df6454aee4433e32d758468bca1fe07006bdd24f786bb4c622b18c1eada6ec"
    tuned = PipelineConfig(train={"lr": 1e-4, "precision": "bf16", "compile": True})
    assert training_key("fp", tuned.train_config(rgb, "/data/a", "run-a", None)) == (
        "d247782d88f03f67e10e101987d21fd22bc3655f4d6d21a40341eea4c6682933")


def test_non_finite_loss_skips_the_step_and_a_streak_stops_training() -> None:
    config = tiny_config(max_consecutive_nonfinite=3)
    state = build_train_state(config)
    images, labels = fake_data(16)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    for _ in range(2):
        assert train_step(state, config, bad, labels).skipped
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    assert (state.step, state.nonfinite_total, state.nonfinite_streak, state.ema.num_updates) == (2, 2, 2, 0)
    assert not train_step(state, config, images, labels).skipped  # a good step resets the streak
    assert state.nonfinite_streak == 0
    for _ in range(2):
        train_step(state, config, bad, labels)
    with pytest.raises(TrainingDivergedError, match="3 consecutive non-finite"):
        train_step(state, config, bad, labels)


def test_loss_falls_on_a_fixed_batch() -> None:
    config = tiny_config(steps=60, lr=3e-3, warmup_steps=0, label_dropout=0.0)
    state = build_train_state(config)
    images, labels = fake_data(16)
    losses = []
    for _ in range(60):
        # Same noise every step (seed fixed by resetting the step) so only the weights change.
        state.step = 0
        losses.append(train_step(state, config, images, labels).loss)
    assert losses[-1] < 0.5 * losses[0]


def test_checkpoint_loads_through_diffusion_core_and_resume_is_exact(tmp_path: Path) -> None:
    config = tiny_config(steps=8)
    images, labels = fake_data(64)

    straight = build_train_state(config)
    run_steps(straight, config, images, labels, until=8)

    first = build_train_state(config)
    run_steps(first, config, images, labels, until=3)
    path = save_training_checkpoint(tmp_path / "ckpt", first, config, tiny_spec(config))
    loaded = load_checkpoint(path, use_ema=True)
    assert loaded.spec.unet == TINY_UNET
    assert read_training_step(path) == 3

    resumed = build_train_state(config.model_copy(update={"seed": 99}))  # different init, overwritten
    load_training_checkpoint(path, resumed, config)
    assert resumed.step == 3 and resumed.ema.num_updates == 3
    run_steps(resumed, config, images, labels, until=8)

    for name, value in straight.model.state_dict().items():
        assert (value - resumed.model.state_dict()[name]).abs().max().item() < 1e-6, name
    for name, value in straight.ema.shadow.items():
        assert (value - resumed.ema.shadow[name]).abs().max().item() < 1e-6, name


@pytest.mark.parametrize(("update", "field"), [
    ({"objective": {"prediction": "v"}}, "objective.prediction"),
    ({"objective": {"min_snr_gamma": 5.0}}, "objective.min_snr_gamma"),
    ({"schedule": {"name": "linear"}}, "schedule.name"),
])
def test_resume_refuses_a_checkpoint_of_another_schedule_or_objective(tmp_path: Path, update: dict,
                                                                      field: str) -> None:
    config = tiny_config()
    path = save_training_checkpoint(tmp_path / "ckpt", build_train_state(config), config, tiny_spec(config))
    other = TrainConfig.model_validate({**config.model_dump(), **update})
    with pytest.raises(CheckpointError, match=rf"cannot resume .*{field}: the checkpoint has"):
        load_training_checkpoint(path, build_train_state(other), other)


def test_warm_start_needs_the_same_schedule_and_prediction_but_not_loss_weighting(tmp_path: Path) -> None:
    config = tiny_config()
    trained = build_train_state(config)
    path = save_training_checkpoint(tmp_path / "ckpt", trained, config, tiny_spec(config))
    for update, field in [({"prediction": "x0"}, "objective.prediction")]:
        other = config.model_copy(update={"objective": config.objective.model_copy(update=update)})
        with pytest.raises(CheckpointError, match=rf"warm_start: cannot warm-start .*{field}") as err:
            load_weights(path, build_train_state(other), other)
        assert "drop warm_start" in err.value.hint
    linear = config.model_copy(update={"schedule": config.schedule.model_copy(update={"name": "linear"})})
    with pytest.raises(CheckpointError, match=r"schedule\.name: the checkpoint has 'cosine'"):
        load_weights(path, build_train_state(linear), linear)
    weighted = config.model_copy(update={"objective": ObjectiveConfig(min_snr_gamma=5.0)})
    fresh = build_train_state(weighted)
    load_weights(path, fresh, weighted)
    assert all(torch.equal(v, fresh.ema.shadow[k]) for k, v in trained.ema.shadow.items())


def test_failed_checkpoint_write_leaves_the_previous_checkpoint_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusion_core.training as training

    config = tiny_config()
    images, labels = fake_data(64)
    state = build_train_state(config)
    run_steps(state, config, images, labels, until=2)
    path = save_training_checkpoint(tmp_path / "ckpt", state, config, tiny_spec(config))
    saved = load_checkpoint(path, use_ema=False).model.state_dict()
    run_steps(state, config, images, labels, until=4)

    def broken_writer(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(training, "write_optimizer_state", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save_training_checkpoint(path, state, config, tiny_spec(config))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or half checkpoint left
    assert read_training_step(path) == 2
    assert (path / TRAINING_STATE_DIR / "optimizer.safetensors").is_file()
    after = load_checkpoint(path, use_ema=False).model.state_dict()
    assert all(torch.equal(saved[k], after[k]) for k in saved)
    load_training_checkpoint(path, build_train_state(config), config)  # still resumable


def test_plain_model_checkpoint_is_not_a_training_checkpoint(tmp_path: Path) -> None:
    from diffusion_core.checkpoint import save_checkpoint

    config = tiny_config()
    state = build_train_state(config)
    path = save_checkpoint(tmp_path / "plain", state.model, tiny_spec(config), ema=state.ema)
    with pytest.raises(CheckpointError, match="not a training checkpoint") as err:
        load_training_checkpoint(path, state, config)
    assert "warm_start" in err.value.hint


def test_cli_reports_a_bad_flag_naming_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "some/dataset", "--batch-size", "10", "--num-workers", "3"])
    assert exit_info.value.code == 2
    assert "batch_size" in capsys.readouterr().err


def test_warm_start_takes_the_weights_but_not_the_counters(tmp_path: Path) -> None:
    config = tiny_config()
    images, labels = fake_data(64)
    trained = build_train_state(config)
    run_steps(trained, config, images, labels, until=3)
    path = save_training_checkpoint(tmp_path / "champion", trained, config, tiny_spec(config))

    fresh = build_train_state(config.model_copy(update={"seed": 5}))
    load_weights(path, fresh, config)
    assert fresh.step == 0 and fresh.ema.num_updates == 0
    for name, value in trained.model.state_dict().items():
        assert torch.equal(value, fresh.model.state_dict()[name])
    for name, value in trained.ema.shadow.items():
        assert torch.equal(value, fresh.ema.shadow[name])

    other = tiny_config(unet=TINY_UNET.model_copy(update={"base_channels": 16}))
    with pytest.raises(CheckpointError, match="warm_start"):
        load_weights(path, build_train_state(other), other)


def test_cli_refuses_fewer_steps_than_warmup_and_offers_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "some/dataset", "--steps", "50"])  # default warmup_steps is 100
    assert exit_info.value.code == 2
    assert "warmup_steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "some/dataset", "--steps", "50", "--warmup-steps", "60"])
    assert exit_info.value.code == 2


def test_default_run_names_are_unique_and_safe_and_bad_names_are_refused() -> None:
    import re

    from diffusion_core.adapters.mlflow_tracking import check_run_name
    from diffusion_core.adapters.ray_train import default_run_name
    from diffusion_core.training import RUN_NAME_PATTERN

    names = {default_run_name() for _ in range(20)}  # all within the same second
    assert len(names) == 20 and all(re.fullmatch(RUN_NAME_PATTERN, n) for n in names)
    with pytest.raises(ConfigError, match="run_name"):
        check_run_name("x' OR tags.a = 'b")


def test_sample_grid_is_what_the_saved_checkpoint_generates(tmp_path: Path) -> None:
    from diffusion_core.adapters.ray_train import sample_grid
    from diffusion_core.image_grids import readable_grid
    from diffusion_core.images import to_uint8

    config = tiny_config(num_sample_images=10, sample_steps=2)
    images, labels = fake_data(64)
    state = build_train_state(config)
    run_steps(state, config, images, labels, until=3)
    spec = tiny_spec(config)
    grid = sample_grid(state, spec, config)

    path = save_training_checkpoint(tmp_path / "ckpt", state, config, spec)
    loaded = load_checkpoint(path, use_ema=True)
    expected = loaded.generate(10, steps=2, sampler=config.sampler, seeds=range(10), labels=list(range(10)))
    # one column per class (image i has label i), each tile enlarged to 64 pixels, under a header
    expected_grid = readable_grid(to_uint8(expected), labels=list(range(10)),
                                  label_names=spec.data.label_names)
    assert grid.shape == expected_grid.shape and grid.shape[1] == 2 + 10 * (64 + 2)
    assert (grid == expected_grid).all()


def test_mixed_precision_and_channels_last_are_off_on_cpu_by_default() -> None:
    state = build_train_state(tiny_config())
    assert state.autocast is None and state.memory_format == torch.contiguous_format


@pytest.mark.parametrize("option", [{"precision": "bf16"}, {"channels_last": True},
                                    {"precision": "bf16", "channels_last": True}])
def test_cpu_train_step_with_each_execution_option(option: dict) -> None:
    """Each option really changes how the step runs (seen inside the network), and the step's loss
    stays that of the plain fp32 step on the same seeds (within bf16's 8-bit mantissa)."""
    from diffusion_core.training import bf16_autocast_supported

    config = tiny_config(**option)
    bf16 = option.get("precision") == "bf16"
    if bf16 and not bf16_autocast_supported(torch.device("cpu")):
        with pytest.raises(ConfigError, match="precision"):
            build_train_state(config)
        return
    images, labels = fake_data(16)
    plain_state = build_train_state(tiny_config())
    plain = train_step(plain_state, tiny_config(), images, labels)

    state = build_train_state(config)
    seen: dict[str, object] = {}

    def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["nhwc"] = inputs[0].is_contiguous(memory_format=torch.channels_last)
        seen["dtype"] = output.dtype

    conv = state.model.down[0].res.conv1
    conv.register_forward_hook(record)
    before = state.model.conv_out.weight.detach().clone()  # zero-initialised: the first step moves it
    result = train_step(state, config, images, labels)
    assert not result.skipped and not torch.equal(before, state.model.conv_out.weight)
    assert seen["dtype"] == (torch.bfloat16 if bf16 else torch.float32)
    channels_last = option.get("channels_last", False)
    assert seen["nhwc"] == channels_last
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert result.loss == pytest.approx(plain.loss, rel=3e-2 if bf16 else 1e-5)


def test_options_a_device_cannot_run_are_refused_naming_the_field() -> None:
    meta = torch.device("meta")  # a device without autocast or NHWC convolution kernels
    with pytest.raises(ConfigError, match="precision: bf16 autocast is not supported") as err:
        build_train_state(tiny_config(precision="bf16"), meta)
    assert "fp32" in err.value.hint
    with pytest.raises(ConfigError, match="channels_last: not supported on meta"):
        build_train_state(tiny_config(channels_last=True), meta)
