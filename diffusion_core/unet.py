"""The denoiser: a time- and class-conditioned U-Net (Ho et al. 2020; Nichol & Dhariwal 2021).

Layout, for `channel_mult = (1, 2)` and `num_res_blocks = 2` (the papers' two blocks per level; the
digits default has one) on 8x8 inputs::

    x (N,C,8,8) -> conv -> [Res, Res, Down] (8x8) -> [Res, Res] (4x4) -> Res, Attn, Res (4x4)
                -> [Res, Res, Res, Up] (4x4) -> [Res, Res, Res] (8x8) -> GroupNorm, SiLU, conv -> (N,C,8,8)

every up-path block takes the matching down-path activation as a skip connection, every residual
block receives the time (+ class) embedding as a scale and shift of its second GroupNorm
("adaptive group norm", Nichol & Dhariwal 2021 / Dhariwal & Nichol 2021), and self-attention runs at
the feature-map sides listed in `attention_resolutions` and always in the middle.

Only per-sample operations are used (GroupNorm, convolutions, attention within one image), so the
output for sample i never depends on the other samples of the batch. No BatchNorm, on purpose.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, NamedTuple, Self

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from diffusion_core.errors import ConfigError, config_error_from
from diffusion_core.sampling_defaults import NULL_LABEL

# GroupNorm uses at most this many groups and at least this many channels per group.
_MAX_GROUPS = 32
_MIN_CHANNELS_PER_GROUP = 4

# Bounds of every size a config (or a checkpoint's spec.json) can ask for: above the largest
# networks this project trains (256-pixel images at the papers' widths), so that no config makes a
# process allocate without limit. checkpoint.MAX_PARAMETERS bounds their product.
MAX_IMAGE_SIZE = 256
MAX_LEVELS = 6
MAX_CHANNEL_MULT = 8
MAX_CLASSES = 100_000


class SizeLayout(NamedTuple):
    """The U-Net layout chosen for an image side: channel multiplier per level, the feature-map
    sides that get self-attention, a base width and the residual blocks per level."""

    channel_mult: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    base_channels: int
    num_res_blocks: int = 2


# Per power-of-two image side. 32 and 256 are Ho et al. 2020 (CIFAR-10; LSUN and CelebA-HQ:
# ch_mult (1,2,2,2) and (1,1,2,2,4,4), attention at 16x16); 64 and 128 are Nichol & Dhariwal 2021
# (improved-diffusion: (1,2,3,4) and (1,1,2,3,4), attention at 16 and 8). 8 and 16 follow the same
# rule (halve down to 4x4, attention at half the input side) at widths that train on a CPU; 8 is
# the digits model. The papers' width is 128; the base widths here suit the CPU-first defaults and
# are meant to be raised for real data on GPUs. The digits model has one residual block per level
# where the papers have two: its training step is 1.6x faster on a CPU, and in the same training
# time it samples better where the budget is tight (benchmarks/results/train_sweep.json: 2100
# steps of one block against 1400 of two, which take 1.1x as long, mean FD over two seeds 10.2
# against 11.1 on the null label and 8.1 against 8.6 on the marginal, 8.3 against 7.9 labelled).
_LAYOUTS: dict[int, SizeLayout] = {
    8: SizeLayout((1, 2), (4,), 32, num_res_blocks=1),
    16: SizeLayout((1, 2, 2), (8,), 64),
    32: SizeLayout((1, 2, 2, 2), (16,), 64),
    64: SizeLayout((1, 2, 3, 4), (16, 8), 64),
    128: SizeLayout((1, 1, 2, 3, 4), (16, 8), 64),
    256: SizeLayout((1, 1, 2, 2, 4, 4), (16,), 64),
}


class UNetConfig(BaseModel):
    """Shape of the U-Net. Sides are in pixels; `channel_mult[i]` scales `base_channels` at level i,
    whose feature maps have side `image_size / 2**i`. `for_image_size` derives a layout from the
    image side. Every size is bounded (see MAX_IMAGE_SIZE)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(32, ge=8, le=MAX_IMAGE_SIZE, description="side of the square input in pixels")
    in_channels: int = Field(3, description="1 (grey) or 3 (RGB)")
    base_channels: int = Field(64, ge=8, le=512, multiple_of=8, description="channels at level 0")
    channel_mult: tuple[Annotated[int, Field(ge=1, le=MAX_CHANNEL_MULT)], ...] = Field(
        (1, 2, 2), min_length=1, max_length=MAX_LEVELS,
        description="channel multiplier per level; one level per entry",
    )
    num_res_blocks: int = Field(2, ge=1, le=4, description="residual blocks per level (down path)")
    attention_resolutions: tuple[int, ...] = Field(
        (8,), max_length=MAX_LEVELS,
        description="feature-map sides at which self-attention follows each residual block",
    )
    num_heads: int = Field(4, ge=1, description="attention heads; must divide the attention channels")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout inside residual blocks")
    num_classes: int | None = Field(None, ge=1, le=MAX_CLASSES,
                                    description="number of classes; None = unconditional")

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels: must be 1 or 3, got {self.in_channels}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size: {self.image_size} is not divisible by 2**(len(channel_mult)-1) = {factor}"
                f" for channel_mult={self.channel_mult}"
            )
        sides = self.feature_sides()
        unknown = [r for r in self.attention_resolutions if r not in sides]
        if unknown:
            raise ValueError(f"attention_resolutions: {unknown} are not feature-map sides; accepted: {sides}")
        for level in [*self.attention_levels(), len(self.channel_mult) - 1]:
            channels = self.base_channels * self.channel_mult[level]
            if channels % self.num_heads:
                raise ValueError(
                    f"num_heads: {self.num_heads} does not divide the {channels} channels of the"
                    f" attention layer at side {sides[level]}"
                )
        return self

    def feature_sides(self) -> list[int]:
        """Feature-map side at each level: image_size / 2**level."""
        return [self.image_size // 2**level for level in range(len(self.channel_mult))]

    def attention_levels(self) -> list[int]:
        """Levels whose residual blocks are followed by self-attention."""
        return [lvl for lvl, side in enumerate(self.feature_sides()) if side in self.attention_resolutions]

    @classmethod
    def for_image_size(cls, image_size: int, in_channels: int, num_classes: int | None = None,
                       **fields: Any) -> UNetConfig:
        """The layout of `_LAYOUTS` for the largest tabulated side <= image_size, at the same
        levels (a 48-pixel input gets the 32-pixel layout, attention at 24); `fields` override any
        field (e.g. base_channels=128, the papers' width). image_size must be divisible by
        2**(levels - 1)."""
        if not 8 <= image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"image_size: must be between 8 and {MAX_IMAGE_SIZE}")
        tabulated = max(side for side in _LAYOUTS if side <= image_size)
        layout = _LAYOUTS[tabulated]
        attention = tuple(side * image_size // tabulated for side in layout.attention_resolutions)
        derived = {"image_size": image_size, "in_channels": in_channels, "num_classes": num_classes,
                   "channel_mult": layout.channel_mult, "attention_resolutions": attention,
                   "base_channels": layout.base_channels, "num_res_blocks": layout.num_res_blocks}
        try:
            return cls(**{**derived, **fields})
        except ValidationError as err:
            raise config_error_from(err, prefix="unet") from None

    @classmethod
    def digits_default(cls, num_classes: int | None = 10) -> UNetConfig:
        """A 0.76M-parameter U-Net for 8x8 grey digits (sklearn load_digits), small enough to train
        to recognisable digits in minutes on two CPU cores."""
        return cls.for_image_size(8, 1, num_classes)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of `module` (only those with requires_grad if trainable_only)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, as used by Ho et al. 2020).

    emb(t)[i] = cos(t * w_i), emb(t)[half + i] = sin(t * w_i), w_i = max_period^(-i / half),
    i = 0..half-1, half = dim // 2; a zero column is appended when dim is odd.
    t: (N,) timesteps (int or float) -> (N, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(min(_MAX_GROUPS, max(1, channels // _MIN_CHANNELS_PER_GROUP)), channels)
    return nn.GroupNorm(groups, channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer so that the residual branch (or the whole net) starts as identity / 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding injected as h = norm(h) * (1 + scale) + shift."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of one image, residual, zero-initialised output."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # each (N, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """One residual block, optionally followed by self-attention."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, cfg: UNetConfig, attention: bool) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.dropout)
        self.attn = SelfAttention(out_ch, cfg.num_heads) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """eps-, v- or x0-predicting U-Net: forward(x (N,C,H,W), t (N,) int64, labels (N,) int64 | None)
    -> (N,C,H,W).

    Labels: `NULL_LABEL` (-1) selects the extra "null class" embedding row (index num_classes) used for
    classifier-free guidance (Ho & Salimans 2022); `labels=None` on a class-conditional model means
    "all null". Labels on an unconditional model, or outside [-1, num_classes), raise ConfigError.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.base_channels
        self.emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(
            nn.Linear(ch, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim)
        )
        self.class_emb = (
            nn.Embedding(config.num_classes + 1, self.emb_dim) if config.num_classes is not None else None
        )
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        skip_channels = self._build_down()
        self.mid = nn.ModuleList([
            Stage(self._mid_ch, self._mid_ch, self.emb_dim, config, attention=True),
            Stage(self._mid_ch, self._mid_ch, self.emb_dim, config, attention=False),
        ])
        out_ch = self._build_up(skip_channels)
        self.norm_out = _group_norm(out_ch)
        self.conv_out = _zero(nn.Conv2d(out_ch, config.in_channels, 3, padding=1))

    def _build_down(self) -> list[int]:
        cfg, attn_levels = self.config, set(self.config.attention_levels())
        self.down = nn.ModuleList()
        ch, skips = cfg.base_channels, [cfg.base_channels]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out = cfg.base_channels * mult
                self.down.append(Stage(ch, out, self.emb_dim, cfg, attention=level in attn_levels))
                ch = out
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
        self._mid_ch = ch
        return skips

    def _build_up(self, skips: list[int]) -> int:
        cfg, attn_levels = self.config, set(self.config.attention_levels())
        self.up = nn.ModuleList()
        ch = self._mid_ch
        for level in reversed(range(len(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                out = cfg.base_channels * cfg.channel_mult[level]
                attention = level in attn_levels
                self.up.append(Stage(ch + skips.pop(), out, self.emb_dim, cfg, attention=attention))
                ch = out
            if level > 0:
                self.up.append(Upsample(ch))
        return ch

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        self._check_inputs(x, t)
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        if self.class_emb is not None:
            emb = emb + self.class_emb(self._class_indices(labels, x.shape[0], x.device))
        elif labels is not None:
            raise ConfigError("labels: this UNet is unconditional (num_classes=None); pass labels=None")
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, Stage) else block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(block, Stage) else block(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _check_inputs(self, x: Tensor, t: Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ConfigError(f"x: expected shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ConfigError(f"t: expected shape ({x.shape[0]},) (one per sample), got {tuple(t.shape)}")

    def _class_indices(self, labels: Tensor | None, n: int, device: torch.device) -> Tensor:
        """Map labels to embedding rows: class c -> row c, NULL_LABEL -> row num_classes."""
        num_classes = self.config.num_classes
        if labels is None:
            return torch.full((n,), num_classes, dtype=torch.long, device=device)
        if labels.shape != (n,) or labels.dtype.is_floating_point:
            raise ConfigError(f"labels: expected an integer tensor of shape ({n},), got {labels.dtype} "
                              f"{tuple(labels.shape)}")
        bad = (labels < NULL_LABEL) | (labels >= num_classes)
        if bool(bad.any()):
            raise ConfigError(f"labels: each must be a class of this model; accepted: integers "
                              f"0..{num_classes - 1}, or {NULL_LABEL} for an unconditional image")
        return torch.where(labels == NULL_LABEL, torch.full_like(labels, num_classes), labels).long()
