"""UNet: shapes, conditioning, per-sample independence, config validation, and that it can learn."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from diffusion_core.errors import ConfigError
from diffusion_core.guidance import NULL_LABEL
from diffusion_core.unet import UNet, UNetConfig, count_parameters, timestep_embedding

SMALL = {"base_channels": 16, "num_res_blocks": 1, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


def randomised(model: UNet, seed: int = 0) -> UNet:
    """Give the zero-initialised layers random weights, so that every input path affects the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def inputs(cfg: UNetConfig, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    return x, torch.randint(0, 1000, (n,), generator=gen)


@pytest.mark.parametrize(
    "cfg",
    [
        UNetConfig.digits_default(num_classes=None),
        UNetConfig(image_size=8, in_channels=3, channel_mult=(1, 2), attention_resolutions=(4,), **SMALL),
        UNetConfig(image_size=32, in_channels=3, channel_mult=(1, 2, 2), attention_resolutions=(8,), **SMALL),
        UNetConfig(
            image_size=64, in_channels=3, channel_mult=(1, 1, 2, 2), attention_resolutions=(8,), **SMALL
        ),
    ],
    ids=["1ch-8px", "3ch-8px", "3ch-32px", "3ch-64px"],
)
def test_output_has_input_shape_and_starts_at_zero(cfg: UNetConfig) -> None:
    model = UNet(cfg).eval()
    x, t = inputs(cfg, 2)
    out = model(x, t)
    assert out.shape == x.shape and out.dtype == torch.float32
    # The output conv is zero-initialised (so an untrained eps-model predicts 0, the prior mean).
    assert torch.count_nonzero(out) == 0
    assert torch.isfinite(randomised(model)(x, t)).all()


def test_digits_default_is_small_and_count_parameters_counts_every_scalar() -> None:
    model = UNet(UNetConfig.digits_default())
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters())
    assert 500_000 <= n <= 2_000_000
    model.conv_in.requires_grad_(False)
    frozen = sum(p.numel() for p in model.conv_in.parameters())
    assert count_parameters(model, trainable_only=True) == n - frozen


def test_timestep_embedding_matches_the_sinusoidal_formula() -> None:
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 6)
    assert emb.shape == (3, 6)
    half = 3
    for row, step in enumerate(t.tolist()):
        for i in range(half):
            w = 10_000.0 ** (-i / half)
            assert emb[row, i].item() == pytest.approx(math.cos(step * w), abs=1e-5)
            assert emb[row, half + i].item() == pytest.approx(math.sin(step * w), abs=1e-5)


def test_class_labels_change_the_output_and_null_label_is_its_own_class() -> None:
    cfg = UNetConfig.digits_default(num_classes=10)
    model = randomised(UNet(cfg))
    x, t = inputs(cfg, 1)
    x4, t4 = x.repeat(4, 1, 1, 1), t.repeat(4)
    out = model(x4, t4, torch.tensor([3, 5, NULL_LABEL, NULL_LABEL]))
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert (out[2] - out[0]).abs().max() > 1e-4 and (out[2] - out[1]).abs().max() > 1e-4
    torch.testing.assert_close(out[2], out[3])
    # labels=None on a conditional model means "all null".
    torch.testing.assert_close(model(x, t, None)[0], out[2], rtol=0, atol=1e-5)
    # The null class is the extra embedding row num_classes.
    assert model.class_emb.num_embeddings == cfg.num_classes + 1


def test_unconditional_model_rejects_labels() -> None:
    cfg = UNetConfig.digits_default(num_classes=None)
    model = UNet(cfg)
    x, t = inputs(cfg, 2)
    with pytest.raises(ConfigError, match="labels"):
        model(x, t, torch.tensor([1, 2]))


@pytest.mark.parametrize("bad", [[10, 0], [-2, 0], [0]], ids=["too-high", "below-null", "wrong-length"])
def test_conditional_model_rejects_bad_labels(bad: list[int]) -> None:
    cfg = UNetConfig.digits_default(num_classes=10)
    x, t = inputs(cfg, 2)
    with pytest.raises(ConfigError, match="labels"):
        UNet(cfg)(x, t, torch.tensor(bad))


def test_wrong_input_shapes_are_rejected_naming_the_argument() -> None:
    cfg = UNetConfig.digits_default(num_classes=None)
    model = UNet(cfg)
    x, t = inputs(cfg, 2)
    with pytest.raises(ConfigError, match="x:"):
        model(x[:, :, :4], t)
    with pytest.raises(ConfigError, match="t:"):
        model(x, t[:1])


@pytest.mark.parametrize("num_classes", [None, 10])
def test_sample_output_does_not_depend_on_the_rest_of_the_batch(num_classes: int | None) -> None:
    cfg = UNetConfig.digits_default(num_classes=num_classes)
    model = randomised(UNet(cfg))
    x_a, t_a = inputs(cfg, 5, seed=1)
    x_b, t_b = inputs(cfg, 5, seed=2)
    x_b[0], t_b[0] = x_a[0], t_a[0]
    labels_a = torch.tensor([4, 1, 2, NULL_LABEL, 7]) if num_classes else None
    labels_b = torch.tensor([4, NULL_LABEL, 9, 0, 3]) if num_classes else None
    with torch.no_grad():
        out_a = model(x_a, t_a, labels_a)[0]
        out_b = model(x_b, t_b, labels_b)[0]
        out_single = model(x_a[:1], t_a[:1], None if labels_a is None else labels_a[:1])[0]
    assert out_a.abs().max() > 1e-3  # a non-trivial output, so the comparison means something
    assert (out_a - out_b).abs().max() < 1e-5
    assert (out_a - out_single).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"image_size": 4}, "image_size"),
        ({"image_size": 512}, "image_size"),
        ({"image_size": 12, "channel_mult": (1, 2, 2, 2)}, "image_size"),
        ({"in_channels": 2}, "in_channels"),
        ({"base_channels": 12}, "base_channels"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"channel_mult": (1, 0)}, "channel_mult"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"attention_resolutions": (3,)}, "attention_resolutions"),
        ({"num_heads": 5}, "num_heads"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_classes": 0}, "num_classes"),
        ({"colour": True}, "colour"),
    ],
)
def test_invalid_config_fields_are_rejected_by_name(override: dict, field: str) -> None:
    base = UNetConfig.digits_default().model_dump()
    with pytest.raises(ValidationError, match=field):
        UNetConfig(**{**base, **override})


def test_config_is_frozen_and_round_trips_through_json() -> None:
    cfg = UNetConfig.digits_default()
    assert UNetConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValidationError):
        cfg.base_channels = 64


def test_unet_overfits_a_fixed_batch_on_the_eps_objective() -> None:
    """The eps-MSE on one fixed noisy batch must fall well below its starting value (~1, since an
    untrained model predicts 0 and eps ~ N(0, 1)): the net, its conditioning and gradients work."""
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=8, in_channels=1, channel_mult=(1, 2), attention_resolutions=(4,),
                     num_classes=10, **SMALL)
    model = UNet(cfg).train()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (8,), generator=gen)
    alpha_bar = torch.rand(8, 1, 1, 1, generator=gen) * 0.8 + 0.1
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    labels = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 9])  # includes NULL_LABEL
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(50):
        loss = (model(x_t, t, labels) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(eps.pow(2).mean().item(), rel=1e-6)
    assert losses[-1] < 0.05 * losses[0]


@pytest.mark.parametrize(("size", "mult", "attention"), [
    (32, (1, 2, 2, 2), (16,)),  # Ho et al. 2020, CIFAR-10
    (64, (1, 2, 3, 4), (16, 8)),  # Nichol & Dhariwal 2021, ImageNet 64
    (256, (1, 1, 2, 2, 4, 4), (16,)),  # Ho et al. 2020, LSUN / CelebA-HQ
    (48, (1, 2, 2, 2), (24,)),  # between tabulated sides: the smaller side's levels
])
def test_layout_follows_the_image_size(size: int, mult: tuple[int, ...], attention: tuple[int, ...]) -> None:
    cfg = UNetConfig.for_image_size(size, 3, num_classes=7)
    assert (cfg.image_size, cfg.in_channels, cfg.num_classes) == (size, 3, 7)
    assert (cfg.channel_mult, cfg.attention_resolutions) == (mult, attention)
    assert cfg.feature_sides()[-1] == size // 2 ** (len(mult) - 1)
    assert UNetConfig.for_image_size(size, 3, base_channels=128).base_channels == 128


def test_digits_default_is_the_layout_of_8_pixel_images() -> None:
    assert UNetConfig.digits_default(10) == UNetConfig.for_image_size(8, 1, 10)
    assert UNetConfig.digits_default(10).base_channels == 32


@pytest.mark.parametrize("size", [4, 100, 512])
def test_sizes_without_a_layout_are_refused_naming_image_size(size: int) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        UNetConfig.for_image_size(size, 3)


@pytest.mark.parametrize("size", [128, 256])
def test_large_images_train_on_the_cpu_at_tiny_width(size: int) -> None:
    """Shapes and gradients through every level at 128 and 256 pixels (base width 8), and two
    training steps that change the weights."""
    from diffusion_core.training import TrainConfig, build_train_state, train_step

    unet = UNetConfig.for_image_size(size, 3, num_classes=3, base_channels=8, num_res_blocks=1)
    model = UNet(unet)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=gen)
    out = model(x, torch.tensor([10, 900]), torch.tensor([0, 2]))
    assert out.shape == x.shape
    model.conv_out.weight.data.normal_(generator=gen)  # zero-initialised: open the path for gradients
    model(x, torch.tensor([10, 900]), torch.tensor([0, 2])).pow(2).mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["conv_in.weight"].abs().sum() > 0  # reached the first layer through all levels

    config = TrainConfig(dataset="unused", unet=unet, steps=2, warmup_steps=0, batch_size=2, lr=1e-3)
    state = build_train_state(config)
    before = state.model.conv_in.weight.detach().clone()
    for _ in range(2):
        result = train_step(state, config, x.clamp(-1, 1), torch.tensor([1, 2]))
        assert not result.skipped and result.loss > 0
    assert not torch.equal(before, state.model.conv_in.weight)
