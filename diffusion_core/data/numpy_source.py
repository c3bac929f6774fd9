"""NumPy sources: a .npy array (N, H, W[, C]) or a .npz with `images` and optional `labels`.

Rows are read in chunks of bounded bytes straight from the file (or from inside the .npz zip),
never the whole array. The header is checked before any row is read: a supported dtype and shape,
an image size within the limits, and a row count that the bytes after the header hold.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from diffusion_core.data.config import PrepareParameters
from diffusion_core.data.local_files import (
    hash_stream,
    metadata_identity,
    open_regular_file,
    stat_regular_file,
)
from diffusion_core.data.samples import NO_LABEL, Sample, Skipped, fingerprint_kind_for, labelled_sample
from diffusion_core.data.transforms import check_geometry
from diffusion_core.errors import DatasetError

_CHUNK_ROWS = 256
_CHUNK_BYTES = 16 << 20  # read at most this many bytes at once (at least one image)


class _NpyStream:
    """Rows of a .npy stream read in chunks of bounded bytes, never the whole array (works inside a
    zip too). The header is checked before any row is read: a supported dtype, and a row count
    that the bytes after the header (`data_bytes`, from the file size or the zip entry) hold."""

    def __init__(self, fp: BinaryIO, name: str, total_bytes: int) -> None:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise DatasetError(f"{name}: .npy format version {version} is not supported; accepted 1.0, 2.0")
        if dtype.hasobject:
            raise DatasetError(f"{name}: object arrays are refused (they would need unpickling)")
        if fortran_order and len(shape) > 1:
            raise DatasetError(f"{name}: Fortran-ordered arrays cannot be streamed",
                               hint="save it with np.save(path, np.ascontiguousarray(array))")
        self.fp, self.name, self.shape, self.dtype = fp, name, shape, dtype
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize  # Python ints: no overflow
        self.data_bytes = total_bytes - fp.tell()

    def check_length(self) -> None:
        """Refuse a header that declares more rows than the bytes after it hold."""
        rows = self.shape[0] if self.shape else 0
        if rows * self.row_bytes > self.data_bytes:
            raise DatasetError(f"{self.name}: the header declares more rows than the file holds",
                               hint="the file is truncated or its header is wrong")

    def chunks(self) -> Iterator[np.ndarray]:
        rows_per_chunk = max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // max(1, self.row_bytes)))
        remaining = self.shape[0] if self.shape else 0
        while remaining > 0:
            n = min(rows_per_chunk, remaining)
            data = self.fp.read(n * self.row_bytes)
            if len(data) != n * self.row_bytes:
                read = self.shape[0] - remaining
                raise DatasetError(f"array file ends after {read} of {self.shape[0]} rows")
            yield np.frombuffer(data, dtype=self.dtype).reshape((n, *self.shape[1:]))
            remaining -= n


class NumpySource:
    """A .npy array (N, H, W[, C]) or a .npz with `images` and optional `labels` (N,) integers."""

    kind = "numpy"

    def __init__(self, path: Path, params: PrepareParameters) -> None:
        self.path = path
        self.location = str(path.resolve())
        info = stat_regular_file(path)
        with _open_npy_members(self.path) as (images, labels):
            self._check_images(images, params)
            self._check_labels(images, labels)
            for stream in (images, labels):
                if stream is not None:
                    stream.check_length()
            self.has_labels = labels is not None
            self._count = images.shape[0]
        self.fingerprint_kind = fingerprint_kind_for(params, info.st_size)

    def _check_images(self, images: _NpyStream, params: PrepareParameters) -> None:
        shape, dtype = images.shape, images.dtype
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 2, 3, 4)):
            raise DatasetError(f"source {self.location!r}: images must be (N, H, W) or (N, H, W, C) with "
                               f"C in 1..4; got shape {shape}")
        if dtype.kind not in "uif":
            raise DatasetError(f"source {self.location!r}: images must be integers or floats; "
                               f"got dtype {dtype}")
        try:
            check_geometry(shape[2], shape[1], params.max_image_pixels, params.max_aspect_ratio)
        except DatasetError as err:
            raise DatasetError(f"source {self.location!r}: {err}", hint=err.hint) from None

    def _check_labels(self, images: _NpyStream, labels: _NpyStream | None) -> None:
        if labels is not None and (labels.shape != images.shape[:1] or labels.dtype.kind not in "iu"):
            raise DatasetError(f"source {self.location!r}: labels must be integers of shape "
                               f"({images.shape[0]},); got {labels.dtype} {labels.shape}")

    def fingerprint(self) -> str:
        if self.fingerprint_kind == "metadata":
            return hashlib.sha256(metadata_identity(stat_regular_file(self.path)).encode()).hexdigest()
        with open_regular_file(self.path) as f:
            return hash_stream(f)

    def label_names(self) -> None:
        return None

    def count_hint(self) -> int:
        return self._count

    def iter_samples(self, params: PrepareParameters) -> Iterator[Sample | Skipped]:
        with _open_npy_members(self.path) as (images, labels):
            yield from self._samples(images, labels, params)

    def _samples(self, images: _NpyStream, labels: _NpyStream | None,
                 params: PrepareParameters) -> Iterator[Sample | Skipped]:
        pending_labels = np.zeros(0, dtype=np.int64)
        label_chunks = labels.chunks() if labels is not None else None
        index = 0
        for chunk in images.chunks():
            if label_chunks is not None:
                while len(pending_labels) < len(chunk):  # label chunks are sized by bytes too
                    pending_labels = np.concatenate([pending_labels, next(label_chunks).astype(np.int64)])
            for pixels in chunk:
                label = NO_LABEL if label_chunks is None else int(pending_labels[0])
                pending_labels = pending_labels[1:]
                name = f"{self.path.name}[{index}]"
                yield labelled_sample(name, pixels, label, labels is not None, params)
                index += 1


@contextmanager
def _open_npy_members(path: Path) -> Iterator[tuple[_NpyStream, _NpyStream | None]]:
    """(images, labels or None) streams of a .npy or .npz file, closed on exit."""
    with ExitStack() as stack:
        try:
            streams = _npy_streams(path, stack)
        except DatasetError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DatasetError(f"source {str(path)!r} is not a readable NumPy file: {err}") from err
        yield streams


def _npy_streams(path: Path, stack: ExitStack) -> tuple[_NpyStream, _NpyStream | None]:
    f = stack.enter_context(open_regular_file(path))
    if path.suffix.lower() == ".npy":
        return _NpyStream(f, f"{path.name}:images", os.fstat(f.fileno()).st_size), None
    archive = stack.enter_context(zipfile.ZipFile(f))
    names = {n.removesuffix(".npy") for n in archive.namelist()}
    if "images" not in names:
        raise DatasetError(f"source {str(path)!r}: .npz has no 'images' array")

    def member(name: str) -> _NpyStream:
        entry = archive.getinfo(f"{name}.npy")
        return _NpyStream(stack.enter_context(archive.open(entry)), f"{path.name}:{name}", entry.file_size)

    return member("images"), member("labels") if "labels" in names else None
