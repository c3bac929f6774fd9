"""Sample grids a person can read: enlarged pixels, and class-conditional samples one class per
column under the class's name.

Small images (8x8 digits) are a few dots at their own size, and viewers (the MLflow UI among them)
scale them up smoothly into a blur. `readable_grid` enlarges every pixel to a square block (nearest
neighbour) so that each tile is at least `min_tile_px` wide. Given labels, it puts the images of
each label in one column, columns in label order, with the label's name above it.

Pictures are uint8, (N, H, W, C) for a batch and (H, W, C) for a grid, C in (1, 3, 4) (images.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffusion_core.errors import ConfigError
from diffusion_core.images import make_grid

MIN_TILE_PX = 64   # a tile this wide shows an 8x8 digit at 8 screen pixels per pixel
PADDING_PX = 2
HEADER_FONT_PX = 12
NO_LABEL_NAME = "none"  # the null label (sampling_defaults.NULL_LABEL): an unconditional sample
_WHITE = {1: 255, 3: (255, 255, 255), 4: (255, 255, 255, 255)}


def enlarge(images: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel of uint8 (N, H, W, C) images as a `factor` x `factor` block: (N, H*f, W*f, C)."""
    if factor < 1:
        raise ConfigError(f"factor: must be >= 1, got {factor}")
    return np.asarray(images).repeat(factor, axis=1).repeat(factor, axis=2)


def readable_grid(images: np.ndarray, labels: Sequence[int] | None = None,
                  label_names: Sequence[str] | None = None, nrow: int = 8,
                  min_tile_px: int = MIN_TILE_PX) -> np.ndarray:
    """uint8 (N, H, W, C) images as one (H', W', C) grid with tiles at least `min_tile_px` wide.

    Without labels: `nrow` tiles per row, in order. With labels ((N,) ints; -1 = no label): one
    column per label present, in label order, each headed by label_names[label] (the number when
    there are no names), images in their original order down the column.
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.dtype != np.uint8 or arr.shape[0] == 0:
        raise ConfigError(f"images: expected non-empty uint8 (N, H, W, C), got {arr.dtype} {arr.shape}")
    big = enlarge(arr, max(1, math.ceil(min_tile_px / arr.shape[2])))
    if labels is None:
        return make_grid(big, nrow=nrow, padding=PADDING_PX)
    label_list = [int(v) for v in labels]
    if len(label_list) != arr.shape[0]:
        raise ConfigError(f"labels: expected {arr.shape[0]} labels (one per image)")
    columns = sorted(set(label_list))
    tiles = _by_column(big, label_list, columns)
    grid = make_grid(tiles, nrow=len(columns), padding=PADDING_PX)
    names = [_label_name(label, label_names) for label in columns]
    return np.concatenate([_header(names, grid.shape[1], big.shape[2], arr.shape[3]), grid], axis=0)


def _by_column(big: np.ndarray, labels: list[int], columns: list[int]) -> np.ndarray:
    """Tiles in row-major order for a grid with one column per label; blank tiles fill short columns."""
    members = [[i for i, label in enumerate(labels) if label == column] for column in columns]
    rows = max(len(m) for m in members)
    tiles = np.zeros((rows * len(columns), *big.shape[1:]), np.uint8)
    for col, indices in enumerate(members):
        for row, index in enumerate(indices):
            tiles[row * len(columns) + col] = big[index]
    return tiles


def _label_name(label: int, label_names: Sequence[str] | None) -> str:
    if label < 0:
        return NO_LABEL_NAME
    if label_names is not None and label < len(label_names):
        return str(label_names[label])
    return str(label)


def _header(names: list[str], width: int, tile_width: int, channels: int) -> np.ndarray:
    """A strip (h, width, channels) with names[j] written above column j, cut to the column's width."""
    font = _font()
    height = HEADER_FONT_PX + 2 * PADDING_PX
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    strip = Image.new(mode, (width, height), 0)
    draw = ImageDraw.Draw(strip)
    for col, name in enumerate(names):
        text = _fit(draw, font, name, tile_width)
        left = PADDING_PX + col * (tile_width + PADDING_PX)
        offset = (tile_width - draw.textlength(text, font=font)) / 2
        draw.text((left + max(offset, 0), PADDING_PX), text, fill=_WHITE[channels], font=font)
    out = np.asarray(strip, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def _fit(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def _font():
    """Pillow's built-in font (no file, no network); its bitmap form where FreeType is missing."""
    try:
        return ImageFont.load_default(size=HEADER_FONT_PX)
    except ImportError:
        return ImageFont.load_default()
