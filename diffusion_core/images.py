"""Picture helpers shared by training logs, evaluation, serving and the CLI.

Conventions: networks work in "model space", pixels scaled linearly to a value range
(MODEL_VALUE_RANGE = [-1, 1] unless a checkpoint's DataSpec says otherwise); `to_unit_range` is the
one map from model space to float (N, C, H, W) in [0, 1], the form LoadedModel.generate returns and
every helper here takes. Pictures on disk and on the wire are uint8 (H, W, C) with C = 1 (grey),
3 (RGB) or 4 (RGBA).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from diffusion_core.atomic_io import atomic_write_bytes
from diffusion_core.errors import ConfigError

if TYPE_CHECKING:  # torch loads only where tensors are used: the Serve front end encodes PNGs without it
    import torch

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Values this far outside [0, 1] are accepted as float rounding; anything further is a caller bug.
_RANGE_TOLERANCE = 1e-4
MODEL_VALUE_RANGE: tuple[float, float] = (-1.0, 1.0)  # prepared datasets decode to [-1, 1] (data.readers)


def to_unit_range(x: torch.Tensor, value_range: tuple[float, float] = MODEL_VALUE_RANGE) -> torch.Tensor:
    """Model-space images with pixels in `value_range` = (low, high) -> float32 in [0, 1]:

        u = clamp((x - low) / (high - low), 0, 1)

    The clamp is deliberate: samplers may overshoot the data range slightly, and every consumer
    (to_uint8, the feature networks) expects [0, 1]. Shape and device are kept.
    """
    low, high = value_range
    if not low < high:
        raise ConfigError(f"value_range: low must be below high, got {value_range}")
    return ((x.float() - low) / (high - low)).clamp(0.0, 1.0)


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] -> (N, H, W, C) uint8, rounding v * 255 to the nearest integer."""
    is_tensor = hasattr(images, "detach")  # a torch.Tensor, told apart without importing torch
    arr = images.detach().cpu().float().numpy() if is_tensor else np.asarray(images)
    if arr.ndim != 4 or arr.shape[1] not in _MODES:
        raise ConfigError(f"images: expected shape (N, C, H, W) with C in (1, 3, 4), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ConfigError(f"images: expected floats in [0, 1], got dtype {arr.dtype}")
    lo, hi = float(np.min(arr, initial=0.0)), float(np.max(arr, initial=1.0))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        raise ConfigError(f"images: values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [0, 1]; the inverse of `to_uint8`."""
    import torch

    arr = np.asarray(images)
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise ConfigError(f"images: expected uint8 (N, H, W, C), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 1, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 (N, H, W, C) images into one (rows*(H+p)+p, nrow*(W+p)+p, C) picture, `nrow` per
    row, row-major, with `padding` pixels of `pad_value` around every tile; missing tiles stay blank."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.dtype != np.uint8 or arr.shape[0] == 0:
        raise ConfigError(f"images: expected non-empty uint8 (N, H, W, C), got {arr.dtype} {arr.shape}")
    if nrow < 1:
        raise ConfigError(f"nrow: must be >= 1, got {nrow}")
    if padding < 0:
        raise ConfigError(f"padding: must be >= 0, got {padding}")
    n, h, w, c = arr.shape
    cols, rows = min(nrow, n), -(-n // nrow)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.uint8)
    for i, img in enumerate(arr):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = img
    return grid


def enlarge(images: np.ndarray, min_size: int = 32) -> np.ndarray:
    """uint8 (N, H, W, C) zoomed by nearest neighbour (each pixel a k x k block) with the smallest
    integer k that makes min(H, W) * k >= `min_size`: 8x8 digits are unreadable at 1:1."""
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ConfigError(f"images: expected (N, H, W, C), got shape {arr.shape}")
    zoom = max(1, -(-min_size // min(arr.shape[1:3])))
    return arr.repeat(zoom, axis=1).repeat(zoom, axis=2)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) with C in (1, 3, 4), or (H, W) grey -> PNG bytes (lossless)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.dtype != np.uint8 or arr.shape[2] not in _MODES:
        raise ConfigError(f"image: expected uint8 (H, W, C) with C in (1, 3, 4), got {arr.dtype} {arr.shape}")
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)  # mode inferred: L, RGB or RGBA
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (H, W, C): C = 1 for grey, 3 for RGB, 4 for RGBA; other modes become RGB."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            if pil.format != "PNG":
                raise ConfigError(f"data: expected a PNG, got {pil.format}")
            if pil.mode not in _MODES.values():
                pil = pil.convert("RGBA" if "A" in pil.getbands() else "RGB")
            arr = np.asarray(pil, dtype=np.uint8)
    except (OSError, Image.DecompressionBombError) as err:
        raise ConfigError(f"data: not a readable PNG ({err})") from err
    return arr[:, :, None] if arr.ndim == 2 else arr


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write `image` (see encode_png) to `path` atomically (atomic_io.atomic_write_bytes)."""
    return atomic_write_bytes(path, encode_png(image))
