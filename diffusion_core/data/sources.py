"""Image sources: each streams conformed (size, size, channels) uint8 samples, one at a time.

A source never holds the whole dataset: image folders are decoded file by file (here), NumPy
files are read in chunks of bounded bytes (`numpy_source`), Parquet tables in batches of bounded
bytes (`parquet_source`). A file or row that cannot be used becomes a `Skipped` record instead of an
exception, so the caller can count and list it. Sources are local paths, read through
`local_files` (regular files only, nothing outside a source folder); the output may live on any
filesystem.

What any one input may cost is bounded before it is paid: an image's size is checked from its
header (or an array's shape) before a pixel is decoded; a .npy header must agree with the bytes
that follow it; a Parquet row group must fit max_source_row_group_bytes; labels must lie in
[0, max_classes). See `transforms` for the image limits and the conversion policy.

`open_source` validates the source up front (it exists, it is a supported kind, its layout is
consistent) so that a bad source fails before any work starts.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from diffusion_core.data.config import PrepareParameters
from diffusion_core.data.local_files import SourceTree, TreeEntry, hash_stream, metadata_identity
from diffusion_core.data.numpy_source import NumpySource
from diffusion_core.data.parquet_source import ParquetSource
from diffusion_core.data.samples import (
    NO_LABEL,
    FingerprintKind,
    Sample,
    Skipped,
    check_class_count,
    conform_or_skip,
    decode_or_skip,
    fingerprint_kind_for,
)
from diffusion_core.data.transforms import digits_to_uint8
from diffusion_core.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = ["NO_LABEL", "ImageSource", "Sample", "Skipped", "open_source"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SOURCE_KINDS = "'digits', an image folder, a .npy / .npz file or a .parquet file"


class ImageSource(Protocol):
    kind: str
    location: str
    has_labels: bool
    fingerprint_kind: FingerprintKind

    def fingerprint(self) -> str:
        """The source's identity (changes whenever its images could), of kind `fingerprint_kind`."""

    def label_names(self) -> list[str] | None:
        """Class names indexed by label, when the source names them; None for numeric or no labels."""

    def count_hint(self) -> int | None:
        """How many rows the source will yield, when known without decoding (for progress bars)."""

    def iter_samples(self, params: PrepareParameters) -> Iterator[Sample | Skipped]: ...


def open_source(source: str, params: PrepareParameters) -> ImageSource:
    """The source named by `source`: "digits" or a local folder / .npy / .npz / .parquet path."""
    if source == "digits":
        return DigitsSource()
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"source {source!r} does not exist", hint=f"SOURCE is one of {SOURCE_KINDS}")
    if path.is_dir():
        return ImageFolderSource(path, params)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return NumpySource(path, params)
    if suffix == ".parquet":
        return ParquetSource(path, params)
    raise DatasetError(f"source {source!r}: unsupported file type {suffix!r}", hint=f"use {SOURCE_KINDS}")


# ---- digits -------------------------------------------------------------------------------------


class DigitsSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, labels 0-9), scaled 0..16 -> 0..255."""

    kind = "digits"
    location = "sklearn.datasets.load_digits"
    has_labels = True
    fingerprint_kind: FingerprintKind = "content"

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return digits_to_uint8(bunch.images), bunch.target.astype(np.int64)

    def fingerprint(self) -> str:
        images, labels = self._load()
        return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()

    def label_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    def count_hint(self) -> int:
        return 1797

    def iter_samples(self, params: PrepareParameters) -> Iterator[Sample | Skipped]:
        images, labels = self._load()  # 115 KB: the one source small enough to load whole
        for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            yield conform_or_skip(f"digits[{i}]", pixels, int(label), params)


# ---- image folder -------------------------------------------------------------------------------


class ImageFolderSource:
    """PNG / JPEG / BMP / WebP files under a folder, recursively, in sorted path order.

    With folder_labels, an image's class is its top-level sub-folder (classes sorted by name); a
    folder whose images all sit at the top level has no labels, and a mix of both is an error.
    Only regular files inside the folder are read (see `local_files`); the rest are listed as
    skipped.
    """

    kind = "image_folder"

    def __init__(self, root: Path, params: PrepareParameters) -> None:
        self.tree = SourceTree(root)
        self.location = str(self.tree.root)
        self.entries = self.tree.entries(lambda name: name.lower().endswith(IMAGE_SUFFIXES))
        readable = [e for e in self.entries if e.target is not None]
        if not readable:
            raise DatasetError(f"source {str(root)!r}: no readable image files "
                               f"({', '.join(IMAGE_SUFFIXES)}) found")
        self._classes = _folder_classes(root, readable) if params.folder_labels else None
        if self._classes is not None:
            check_class_count(len(self._classes), params, self.location)
        self.has_labels = self._classes is not None
        self.fingerprint_kind = fingerprint_kind_for(params, sum(e.info.st_size for e in readable))

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.kind}:{self.fingerprint_kind}\n".encode())
        for entry in self.entries:
            digest.update(f"{entry.rel.as_posix()}\0{self._identity(entry)}\n".encode())
        return digest.hexdigest()

    def _identity(self, entry: TreeEntry) -> str:
        if entry.target is None:
            return f"unusable\0{entry.problem}"
        if self.fingerprint_kind == "metadata":
            return f"{entry.target.as_posix()}\0{metadata_identity(entry.info)}"
        try:
            with self.tree.open(entry.target) as f:
                return hash_stream(f)
        except (OSError, DatasetError):
            return "unreadable"

    def label_names(self) -> list[str] | None:
        return self._classes

    def count_hint(self) -> int:
        return len(self.entries)

    def iter_samples(self, params: PrepareParameters) -> Iterator[Sample | Skipped]:
        class_index = {name: i for i, name in enumerate(self._classes or [])}
        for entry in self.entries:
            name = entry.rel.as_posix()
            if entry.target is None:
                yield Skipped(name, entry.problem or "unusable")
                continue
            label = class_index[entry.rel.parts[0]] if self._classes else NO_LABEL
            yield decode_or_skip(name, lambda t=entry.target: self.tree.open(t), label, params)


def _folder_classes(root: Path, entries: list[TreeEntry]) -> list[str] | None:
    top_level = [e.rel for e in entries if len(e.rel.parts) == 1]
    if len(top_level) == len(entries):
        return None
    if top_level:
        raise DatasetError(
            f"source {str(root)!r}: images such as {top_level[0].name!r} sit beside class sub-folders, "
            "so they have no class", hint="move them into a sub-folder, or set folder_labels to false",
        )
    return sorted({e.rel.parts[0] for e in entries})
