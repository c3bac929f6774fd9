"""Turning any decoded image into the dataset's (size, size, channels) uint8 array: the policy.

Before any pixel is decoded, the image's size is checked against the limits (`check_geometry`):
more than `max_image_pixels` pixels, or a long side more than `max_aspect_ratio` times the short
one, and the image is refused (the caller skips and lists it). JPEGs are decoded at the smallest
DCT scale (1/2, 1/4 or 1/8: Pillow's `draft`) that keeps the short side at least `size`, so a large
photo never decodes at full resolution; the limits apply to the pixels that are decoded.

Then, in this order, whatever the source:

0. Orientation. An EXIF Orientation tag is applied (PIL.ImageOps.exif_transpose), so the image is
   upright as a viewer shows it.
1. Square. The centred square of side min(W, H) is cut out in source coordinates (left = (W - s) // 2,
   top = (H - s) // 2); nothing outside it is ever converted or resampled, so the work is bounded
   by the square whatever the image's shape. Arrays are cut the same way, as views, before any
   conversion.
2. Bit depth. 16-bit samples keep their high byte (v >> 8), as Pillow itself does when it opens a
   16-bit colour PNG; 32-bit integer ("I") and float ("F") images are read as 16-bit and must lie in
   0..65535. Numeric arrays: uint8 as is; uint16 >> 8; other integers must lie in 0..255; floats
   must lie in [0, 1] and map to round(255 x). Anything else is an error (the row is skipped).
3. Palette and exotic modes. Palette images become RGBA when they carry transparency, RGB
   otherwise; bilevel becomes L; CMYK / YCbCr / LAB / HSV become RGB (Pillow's conversions).
4. Transparency. LA / RGBA pixels are composited onto a solid background, `alpha_background`
   (default white, the colour a transparent PNG shows on a page): c' = round((a c + (255 - a) b) / 255).
5. Channels. channels=1 takes ITU-R 601-2 luma (Pillow "L": L = 0.299 R + 0.587 G + 0.114 B);
   channels=3 replicates a grey image into R, G and B.
6. Scale. The square is resized to size x size (bicubic, antialiased when shrinking). Images that
   already have the target size are never resampled, so lossless inputs survive bit for bit.
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
        raise DatasetError("float images must be finite and lie in [0, 1]",
                           hint="scale the array to [0, 1] or store it as uint8")
    return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)


def _int_to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DatasetError(f"integer images of dtype {arr.dtype} must lie in 0..255",
                           hint="store 16-bit images as uint16")
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


def check_geometry(width: int, height: int, max_pixels: int, max_aspect_ratio: float) -> None:
    """Refuse an image by its size alone, before any pixel is decoded (DatasetError names the limit)."""
    if width < 1 or height < 1:
        raise DatasetError("image has an empty side; accepted: width and height >= 1")
    if width * height > max_pixels:
        raise DatasetError(f"image has more than max_image_pixels ({max_pixels}) pixels",
                           hint="raise max_image_pixels, or shrink the image")
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise DatasetError(f"image's long side exceeds max_aspect_ratio ({max_aspect_ratio:g}) "
                           "times its short side", hint="raise max_aspect_ratio, or crop the image")


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """Step 1: the (left, top, right, bottom) box of the centred square of side min(width, height)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def conform_array(pixels: np.ndarray, size: int, channels: int, background: str) -> np.ndarray:
    """A numeric (H, W[, C]) array conformed to (size, size, channels); exact-size uint8 inputs are
    returned untouched. The square is cut (as a view) before any conversion."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim == 3:
        left, top, right, bottom = centre_square(pixels.shape[1], pixels.shape[0])
        pixels = pixels[top:bottom, left:right]
    pixels = array_to_uint8(pixels)
    if pixels.shape == (size, size, channels):
        return np.ascontiguousarray(pixels)
    return conform_image(array_to_image(pixels), size, channels, background)


def conform_image(image: Image.Image, size: int, channels: int, background: str) -> np.ndarray:
    """Steps 1-6 of the policy: any Pillow image (already upright) -> (size, size, channels) uint8."""
    box = centre_square(*image.size)
    if box != (0, 0, *image.size):
        image = image.crop(box)
    image = _to_8bit(image)
    image = _flatten_alpha(image, background)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(size, size, channels)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Steps 2-3: a Pillow image in one of L, LA, RGB, RGBA."""
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
        raise DatasetError("a 16/32-bit image must lie in 0..65535")
    return (values.astype(np.uint32) >> 8).astype(np.uint8)


def _flatten_alpha(image: Image.Image, background: str) -> Image.Image:
    """Step 4: c' = round((a c + (255 - a) b) / 255) with b the background value.

    In uint16: a c + (255 - a) b <= 255 * 255, plus 127, stays below 2^16, at half uint32's memory.
    """
    if image.mode not in ("LA", "RGBA"):
        return image
    rgba = np.asarray(image).astype(np.uint16)
    colour, alpha = rgba[..., :-1], rgba[..., -1:]
    b = BACKGROUND_VALUES[background]
    flat = (alpha * colour + (255 - alpha) * b + 127) // 255
    mode = "L" if image.mode == "LA" else "RGB"
    flat = flat.astype(np.uint8)
    return Image.fromarray(flat[..., 0] if mode == "L" else flat, mode=mode)
