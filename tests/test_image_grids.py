"""Readable sample grids: enlarged pixels, one column per label under its name."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_core.errors import ConfigError
from diffusion_core.image_grids import HEADER_FONT_PX, PADDING_PX, enlarge, readable_grid
from diffusion_core.images import make_grid


def _images(n: int, size: int = 8, channels: int = 1) -> np.ndarray:
    # Tile i is filled with the value 10 * (i + 1): every tile is told apart by its value.
    return np.stack([np.full((size, size, channels), 10 * (i + 1), np.uint8) for i in range(n)])


def test_enlarge_turns_each_pixel_into_a_square_block() -> None:
    image = np.arange(6, dtype=np.uint8).reshape(1, 2, 3, 1)
    big = enlarge(image, 4)
    assert big.shape == (1, 8, 12, 1)
    for r in range(2):
        for c in range(3):
            assert (big[0, 4 * r:4 * r + 4, 4 * c:4 * c + 4, 0] == image[0, r, c, 0]).all()
    with pytest.raises(ConfigError, match="factor"):
        enlarge(image, 0)


def test_unlabelled_grid_is_the_plain_grid_of_enlarged_tiles() -> None:
    images = _images(10)
    grid = readable_grid(images, nrow=4, min_tile_px=64)
    assert (grid == make_grid(enlarge(images, 8), nrow=4, padding=PADDING_PX)).all()
    # 8-pixel tiles become 64 pixels: 4 columns and 3 rows of them
    assert grid.shape == (3 * (64 + PADDING_PX) + PADDING_PX, 4 * (64 + PADDING_PX) + PADDING_PX, 1)


def test_large_images_are_not_enlarged() -> None:
    images = _images(2, size=96, channels=3)
    assert readable_grid(images, min_tile_px=64).shape == (96 + 2 * PADDING_PX, 2 * 96 + 3 * PADDING_PX, 3)


def test_labelled_grid_puts_each_label_in_its_column_under_its_name() -> None:
    images = _images(7)
    labels = [2, 0, 1, 2, 0, 2, -1]  # -1: an unconditional sample
    grid = readable_grid(images, labels=labels, label_names=["zero", "one", "two"], min_tile_px=16)
    header = HEADER_FONT_PX + 2 * PADDING_PX
    tile, pitch = 16, 16 + PADDING_PX
    columns = [-1, 0, 1, 2]  # label order
    expected_rows = {-1: [6], 0: [1, 4], 1: [2], 2: [0, 3, 5]}
    assert grid.shape == (header + 3 * pitch + PADDING_PX, 4 * pitch + PADDING_PX, 1)
    for col, label in enumerate(columns):
        left = PADDING_PX + col * pitch
        for row in range(3):
            top = header + PADDING_PX + row * pitch
            cell = grid[top:top + tile, left:left + tile, 0]
            members = expected_rows[label]
            value = 10 * (members[row] + 1) if row < len(members) else 0  # blank below short columns
            assert (cell == value).all(), (label, row)
        assert grid[:header, left:left + tile].max() > 200  # the name is written above the column


def test_labelled_grid_refuses_a_label_count_that_does_not_match() -> None:
    with pytest.raises(ConfigError, match="labels"):
        readable_grid(_images(3), labels=[0, 1])
