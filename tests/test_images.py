"""Picture helpers: exact uint8 conversion, grid layout, lossless PNG round trips, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_core.errors import ConfigError
from diffusion_core.images import (
    MODEL_VALUE_RANGE,
    decode_png,
    encode_png,
    enlarge,
    from_uint8,
    make_grid,
    save_png,
    to_uint8,
    to_unit_range,
)


def test_to_uint8_rounds_to_nearest_and_moves_channels_last() -> None:
    x = torch.tensor([0.0, 1.0, 0.5, 1 / 255, 0.499 / 255, 1.00001]).reshape(1, 1, 2, 3)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3, 1)
    assert out.ravel().tolist() == [0, 255, 128, 1, 0, 255]
    rgb = torch.zeros(2, 3, 4, 5)
    rgb[:, 1] = 1.0
    assert to_uint8(rgb).shape == (2, 4, 5, 3)
    assert (to_uint8(rgb)[..., 1] == 255).all() and (to_uint8(rgb)[..., 0] == 0).all()


def test_from_uint8_inverts_to_uint8() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8(from_uint8(pixels)), pixels)


@pytest.mark.parametrize("bad", [torch.full((1, 1, 2, 2), 1.5), torch.full((1, 1, 2, 2), float("nan")),
                                 torch.zeros(1, 2, 2, 2), torch.zeros(2, 2)])
def test_to_uint8_rejects_out_of_range_or_misshaped_input(bad: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="images"):
        to_uint8(bad)


def test_make_grid_places_tiles_row_major_with_padding() -> None:
    tiles = np.stack([np.full((2, 3, 1), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = make_grid(tiles, nrow=3, padding=1, pad_value=7)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert grid[1:3, 1:4].min() == grid[1:3, 1:4].max() == 10  # tile 0 at row 0, col 0
    assert (grid[1:3, 9:12] == 30).all()  # tile 2 at row 0, col 2
    assert (grid[4:6, 5:8] == 50).all()  # tile 4 at row 1, col 1
    assert (grid[4:6, 9:12] == 7).all()  # missing tile 5 stays blank
    assert (grid[0] == 7).all() and (grid[:, 0] == 7).all()


@pytest.mark.parametrize(("size", "zoomed"), [(8, 32), (28, 56), (32, 32), (64, 64)])
def test_enlarge_zooms_by_the_smallest_integer_factor_reaching_the_minimum(size: int, zoomed: int) -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    big = enlarge(images, min_size=32)
    zoom = zoomed // size
    assert big.shape == (2, zoomed, zoomed, 3) and big.dtype == np.uint8
    assert np.array_equal(big[:, ::zoom, ::zoom], images)  # each pixel became a zoom x zoom block
    assert np.array_equal(big[:, zoom - 1 :: zoom, zoom - 1 :: zoom], images)


def test_make_grid_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="nrow"):
        make_grid(np.zeros((2, 2, 2, 1), np.uint8), nrow=0)
    with pytest.raises(ConfigError, match="images"):
        make_grid(np.zeros((2, 2, 2, 1), np.float32))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_round_trip_is_lossless(channels: int) -> None:
    rng = np.random.default_rng(channels)
    image = rng.integers(0, 256, size=(5, 7, channels), dtype=np.uint8)
    data = encode_png(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(decode_png(data), image)


def test_decode_png_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="PNG"):
        decode_png(b"not a png")


def test_save_png_writes_atomically_and_leaves_no_temp_file(tmp_path, monkeypatch) -> None:
    image = np.full((4, 4, 1), 200, np.uint8)
    path = save_png(tmp_path / "sub" / "a.png", image)
    assert np.array_equal(decode_png(path.read_bytes()), image)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("diffusion_core.atomic_io.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_png(path, np.zeros((4, 4, 1), np.uint8))
    assert np.array_equal(decode_png(path.read_bytes()), image)  # previous file intact
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]


def test_to_unit_range_maps_the_value_range_linearly_and_clamps_overshoot() -> None:
    x = torch.tensor([-1.2, -1.0, 0.0, 0.5, 1.0, 1.3], dtype=torch.float64)
    assert to_unit_range(x).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]  # default: MODEL_VALUE_RANGE
    assert MODEL_VALUE_RANGE == (-1.0, 1.0) and to_unit_range(x).dtype == torch.float32
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert to_unit_range(pixels, (0.0, 255.0)).tolist() == pytest.approx([0.0, 0.2, 1.0])
    with pytest.raises(ConfigError, match="value_range"):
        to_unit_range(x, (1.0, 1.0))
