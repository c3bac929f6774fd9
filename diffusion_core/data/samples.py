"""One sample of a source, and the shared steps every source takes to produce it: decoding an
encoded image within the limits, conforming an array, checking a label, saying why an item is
skipped. A source never raises for one bad item: it yields `Skipped` so the caller can count and
list it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from diffusion_core.data.config import PrepareParameters
from diffusion_core.data.transforms import check_geometry, conform_array, conform_image
from diffusion_core.errors import DatasetError

NO_LABEL = -1
# The decoders Pillow may use: only the formats the suffixes name, whatever a file's bytes claim.
ENCODED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
MAX_REASON_CHARS = 300

FingerprintKind = Literal["content", "metadata"]


@dataclass(frozen=True)
class Sample:
    """One conformed image: `pixels` (size, size, channels) uint8, `label` >= 0 or NO_LABEL."""

    name: str
    pixels: np.ndarray
    label: int


@dataclass(frozen=True)
class Skipped:
    """A file or row that could not be used, and why."""

    name: str
    reason: str


def fingerprint_kind_for(params: PrepareParameters, total_bytes: int) -> FingerprintKind:
    """`source_fingerprint` resolved: auto hashes the content of sources up to the size limit."""
    if params.source_fingerprint == "auto":
        return "content" if total_bytes <= params.content_fingerprint_max_bytes else "metadata"
    return params.source_fingerprint


def skip_reason(err: BaseException) -> str:
    """One line that says why an item was skipped (the exception type and message, capped)."""
    text = str(err) if isinstance(err, DatasetError) else f"{type(err).__name__}: {err}"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def decode_image(file: BinaryIO, params: PrepareParameters) -> np.ndarray:
    """Decode an encoded image (PNG / JPEG / BMP / WebP) and conform it; see `transforms`.

    The size is checked from the header before a pixel is decoded; Pillow's decompression-bomb
    warning is an error here (a warning would let the decode go ahead).
    """
    # catch_warnings swaps the process-wide filter list (Python 3.11 has no per-thread one); the
    # filter added touches only DecompressionBombWarning, and a preparation decodes in one thread.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(file, formats=ENCODED_FORMATS) as image:
            image.draft(None, (params.size, params.size))  # JPEG: decode at a reduced DCT scale
            check_geometry(*image.size, params.max_image_pixels, params.max_aspect_ratio)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return conform_image(image, params.size, params.channels, params.alpha_background)


def decode_or_skip(name: str, opener: Callable[[], BinaryIO], label: int,
                   params: PrepareParameters) -> Sample | Skipped:
    """Open and decode one encoded image; any failure skips it with the reason."""
    try:
        with opener() as file:
            pixels = decode_image(file, params)
    except Exception as err:  # noqa: BLE001 - a decoder fed hostile bytes may raise anything: skip it
        return Skipped(name, skip_reason(err))
    return Sample(name, pixels, label)


def conform_or_skip(name: str, pixels: np.ndarray, label: int,
                    params: PrepareParameters) -> Sample | Skipped:
    """Conform one numeric array (its shape checked against the limits first), or skip it."""
    try:
        if pixels.ndim >= 2:
            check_geometry(pixels.shape[1], pixels.shape[0], params.max_image_pixels, params.max_aspect_ratio)
        conformed = conform_array(pixels, params.size, params.channels, params.alpha_background)
    except DatasetError as err:
        return Skipped(name, skip_reason(err))
    return Sample(name, conformed, label)


def labelled_sample(name: str, pixels: np.ndarray | pa.Buffer, label: int | None, labelled: bool,
                    params: PrepareParameters) -> Sample | Skipped:
    """A sample from pixels (an array, or an Arrow buffer of encoded image bytes). Rows of a labelled
    source need a label in [0, max_classes) (a null label is a missing one); unlabelled sources
    carry NO_LABEL."""
    if labelled and (label is None or label < 0):
        return Skipped(name, f"label is {label}; labels must be >= 0")
    if labelled and label >= params.max_classes:
        return Skipped(name, f"label must be below max_classes ({params.max_classes})")
    if isinstance(pixels, pa.Buffer):
        return decode_or_skip(name, lambda: pa.BufferReader(pixels), label, params)
    return conform_or_skip(name, pixels, label, params)


def check_class_count(count: int, params: PrepareParameters, location: str) -> None:
    if count > params.max_classes:
        raise DatasetError(f"source {location!r} has more than max_classes ({params.max_classes}) classes",
                           hint="raise max_classes, or check the label column / class folders")
