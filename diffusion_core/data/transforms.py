"""Turning any decoded image into the dataset's (size, size, channels) uint8 array: the policy.

Applied in this order to every image, whatever its source:

1. Bit depth. 16-bit samples keep their high byte (v >> 8), as Pillow itself does when it opens a
   16-bit colour PNG; 32-bit integer ("I") and float ("F") images are read as 16-bit and must lie in
   0..65535. Numeric arrays: uint8 as is; uint16 >> 8; other integers must lie in 0..255; floats
   must lie in [0, 1] and map to round(255 x). Anything else is an error (the row is skipped).
2. Palette and exotic modes. Palette images become RGBA when they carry transparency, RGB
   otherwise; bilevel becomes L; CMYK / YCbCr / LAB / HSV become RGB (Pillow's conversions).
3. Transparency. LA / RGBA pixels are composited onto a solid background, `alpha_background`
   (default white, the colour a transparent PNG shows on a page): c' = round((a c + (255 - a) b) / 255).
4. Channels. channels=1 takes ITU-R 601-2 luma (Pillow "L": L = 0.299 R + 0.587 G + 0.114 B);
   channels=3 replicates a grey image into R, G and B.
5. Geometry. An image that is not size x size is scaled (bicubic, antialiased when shrinking) so
   that its shorter side equals `size`, then centre-cropped to size x size. Images that already have
   the target size are never resampled, so lossless inputs survive bit for bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffusion_core.errors import DatasetError

BACKGROUND_VALUES = {"white": 255, "black": 0}
_TO_RGB_MODES = {"CMYK", "YCbCr", "LAB", "HSV"}
_ARRAY_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def digits_to_uint8(values: np.ndarray) -> np.ndarray:
    """scikit-learn's digits hold 0..16 intensities; v -> round(v * 255 / 16), so 16 -> 255."""
    return np.rint(np.asarray(values, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)


def array_to_uint8(values: np.ndarray) -> np.ndarray:
    """Step 1 of the policy for numeric arrays (see the module docstring)."""
    arr = np.asarray(values)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        return _float_to_uint8(arr)
    if np.issubdtype(arr.dtype, np.integer):
        return _int_to_uint8(arr)
    raise DatasetError(f"image dtype {arr.dtype} is not supported; accepted: uint8, uint16, other "
                       "integers in 0..255, floats in [0, 1]")


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.size and (not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0):
        raise DatasetError(f"float images must lie in [0, 1]; got values in "
                           f"[{np.nanmin(arr):.4g}, {np.nanmax(arr):.4g}]",
                           hint="scale the array to [0, 1] or store it as uint8")
    return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)


def _int_to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DatasetError(f"integer images of dtype {arr.dtype} must lie in 0..255; got values in "
                           f"[{arr.min()}, {arr.max()}]", hint="store 16-bit images as uint16")
    return arr.astype(np.uint8)


def array_to_image(pixels: np.ndarray) -> Image.Image:
    """An (H, W) or (H, W, C) uint8 array with C in 1..4 as a Pillow image (L / LA / RGB / RGBA)."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in _ARRAY_MODES:
        raise DatasetError(f"image array shape {pixels.shape} is not supported; accepted: (H, W) or "
                           "(H, W, C) with C in 1, 2, 3, 4")
    mode = _ARRAY_MODES[pixels.shape[2]]
    squeezed = pixels[:, :, 0] if mode == "L" else pixels
    return Image.fromarray(np.ascontiguousarray(squeezed), mode=mode)


def conform_array(pixels: np.ndarray, size: int, channels: int, background: str) -> np.ndarray:
    """A uint8 (H, W[, C]) array conformed to (size, size, channels); exact-size inputs untouched."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape == (size, size, channels):
        return np.ascontiguousarray(pixels)
    return conform_image(array_to_image(pixels), size, channels, background)


def conform_image(image: Image.Image, size: int, channels: int, background: str) -> np.ndarray:
    """Steps 1-5 of the policy: any Pillow image -> (size, size, channels) uint8."""
    image = _to_8bit(image)
    image = _flatten_alpha(image, background)
    image = image.convert("L" if channels == 1 else "RGB")
    image = _resize_and_centre_crop(image, size)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(size, size, channels)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Steps 1-2: a Pillow image in one of L, LA, RGB, RGBA."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_sixteen_bit_to_uint8(np.asarray(image)), mode="L")
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode in ("PA", "RGBa"):
        return image.convert("RGBA")
    if mode == "La":
        return image.convert("LA")
    if mode == "1":
        return image.convert("L")
    if mode in _TO_RGB_MODES:
        return image.convert("RGB")
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    raise DatasetError(f"image mode {mode!r} is not supported")


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DatasetError(f"a 16/32-bit image must lie in 0..65535; got [{values.min()}, {values.max()}]")
    return (values.astype(np.uint32) >> 8).astype(np.uint8)


def _flatten_alpha(image: Image.Image, background: str) -> Image.Image:
    """Step 3: c' = round((a c + (255 - a) b) / 255) with b the background value."""
    if image.mode not in ("LA", "RGBA"):
        return image
    rgba = np.asarray(image, dtype=np.uint32)
    colour, alpha = rgba[..., :-1], rgba[..., -1:]
    b = BACKGROUND_VALUES[background]
    flat = (alpha * colour + (255 - alpha) * b + 127) // 255
    mode = "L" if image.mode == "LA" else "RGB"
    flat = flat.astype(np.uint8)
    return Image.fromarray(flat[..., 0] if mode == "L" else flat, mode=mode)


def _resize_and_centre_crop(image: Image.Image, size: int) -> Image.Image:
    """Step 5: scale the shorter side to `size` (bicubic), then crop the centre size x size."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))
