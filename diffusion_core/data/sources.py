"""Image sources: each streams conformed (size, size, channels) uint8 samples, one at a time.

A source never holds the whole dataset: image folders are decoded file by file, NumPy files are
read in chunks straight from the file (or from inside the .npz zip), Parquet tables batch by batch.
A file or row that cannot be decoded becomes a `Skipped` record instead of an exception, so the
caller can count and list it. Sources are local paths; the output may live on any filesystem.

`open_source` validates the source up front (it exists, it is a supported kind, its layout is
consistent) so that a bad source fails before any work starts.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from diffusion_core.data.config import PrepareParameters
from diffusion_core.data.transforms import array_to_uint8, conform_array, conform_image, digits_to_uint8
from diffusion_core.errors import DatasetError

logger = logging.getLogger(__name__)

NO_LABEL = -1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SOURCE_KINDS = "'digits', an image folder, a .npy / .npz file or a .parquet file"
_CHUNK_ROWS = 256
_HASH_BLOCK = 1 << 20


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


class ImageSource(Protocol):
    kind: str
    location: str
    has_labels: bool

    def fingerprint(self) -> str:
        """A cheap identity of the source's content (changes whenever its images could)."""

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
        return ImageFolderSource(path, params.folder_labels)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return NumpySource(path)
    if suffix == ".parquet":
        return ParquetSource(path, params.image_column, params.label_column)
    raise DatasetError(f"source {source!r}: unsupported file type {suffix!r}", hint=f"use {SOURCE_KINDS}")


def _hash_file(path: Path, prefix: bytes = b"") -> str:
    """SHA-256 of `prefix` followed by the file's bytes, read in blocks."""
    digest = hashlib.sha256(prefix)
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _conform_or_skip(name: str, pixels: np.ndarray, label: int,
                     params: PrepareParameters) -> Sample | Skipped:
    try:
        conformed = conform_array(array_to_uint8(pixels), params.size, params.channels,
                                  params.alpha_background)
    except DatasetError as err:
        return Skipped(name, str(err))
    return Sample(name, conformed, label)


def _decode_or_skip(name: str, file: Path | BinaryIO, label: int,
                    params: PrepareParameters) -> Sample | Skipped:
    """Decode an encoded image (PNG / JPEG / ...) from a path or file object and conform it."""
    try:
        with Image.open(file) as image:
            image.load()
            pixels = conform_image(image, params.size, params.channels, params.alpha_background)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # DatasetError is a ValueError: unsupported modes are skipped the same way.
        return Skipped(name, f"{type(err).__name__}: {err}")
    return Sample(name, pixels, label)


def _labelled_sample(name: str, pixels: np.ndarray | bytes, label: int | None, labelled: bool,
                     params: PrepareParameters) -> Sample | Skipped:
    """A sample from pixels (an array, or encoded image bytes). Rows of a labelled source need a
    label >= 0 (a null label is a missing one); unlabelled sources carry NO_LABEL on every row."""
    if labelled and (label is None or label < 0):
        return Skipped(name, f"label is {label}; labels must be >= 0")
    if isinstance(pixels, bytes):
        return _decode_or_skip(name, io.BytesIO(pixels), label, params)
    return _conform_or_skip(name, pixels, label, params)


# ---- digits -------------------------------------------------------------------------------------


class DigitsSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, labels 0-9), scaled 0..16 -> 0..255."""

    kind = "digits"
    location = "sklearn.datasets.load_digits"
    has_labels = True

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
            yield _conform_or_skip(f"digits[{i}]", pixels, int(label), params)


# ---- image folder -------------------------------------------------------------------------------


class ImageFolderSource:
    """PNG / JPEG / BMP / WebP files under a folder, recursively, in sorted path order.

    With folder_labels, an image's class is its top-level sub-folder (classes sorted by name); a
    folder whose images all sit at the top level has no labels, and a mix of both is an error.
    """

    kind = "image_folder"

    def __init__(self, root: Path, folder_labels: bool) -> None:
        self.root = root
        self.location = str(root.resolve())
        self.files = _list_images(root)
        if not self.files:
            raise DatasetError(f"source {str(root)!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
        self._classes = _folder_classes(root, self.files) if folder_labels else None
        self.has_labels = self._classes is not None

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                          .encode())
        return digest.hexdigest()

    def label_names(self) -> list[str] | None:
        return self._classes

    def count_hint(self) -> int:
        return len(self.files)

    def iter_samples(self, params: PrepareParameters) -> Iterator[Sample | Skipped]:
        class_index = {name: i for i, name in enumerate(self._classes or [])}
        for path in self.files:
            rel = path.relative_to(self.root)
            label = class_index[rel.parts[0]] if self._classes else NO_LABEL
            yield _decode_or_skip(rel.as_posix(), path, label, params)


def _list_images(root: Path) -> list[Path]:
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()  # os.walk order is filesystem order; sorting makes the row order reproducible
        found.extend(Path(directory) / f for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES))
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _folder_classes(root: Path, files: list[Path]) -> list[str] | None:
    top_level = [p for p in files if len(p.relative_to(root).parts) == 1]
    if len(top_level) == len(files):
        return None
    if top_level:
        raise DatasetError(
            f"source {str(root)!r}: images such as {top_level[0].name!r} sit beside class sub-folders, "
            "so they have no class", hint="move them into a sub-folder, or set folder_labels to false",
        )
    return sorted({p.relative_to(root).parts[0] for p in files})


# ---- NumPy --------------------------------------------------------------------------------------


class _NpyStream:
    """Rows of a .npy stream read in chunks, never the whole array (works inside a zip too)."""

    def __init__(self, fp: BinaryIO, name: str) -> None:
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
        self.fp, self.shape, self.dtype = fp, shape, dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        remaining = self.shape[0] if self.shape else 0
        while remaining > 0:
            n = min(rows, remaining)
            data = self.fp.read(n * self.row_bytes)
            if len(data) != n * self.row_bytes:
                read = self.shape[0] - remaining
                raise DatasetError(f"array file ends after {read} of {self.shape[0]} rows")
            yield np.frombuffer(data, dtype=self.dtype).reshape((n, *self.shape[1:]))
            remaining -= n


class NumpySource:
    """A .npy array (N, H, W[, C]) or a .npz with `images` and optional `labels` (N,) integers."""

    kind = "numpy"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path.resolve())
        with _open_npy_members(self.path) as (images, labels):
            self._check_shapes(images, labels)
            self.has_labels = labels is not None
            self._count = images.shape[0]

    def _check_shapes(self, images: _NpyStream, labels: _NpyStream | None) -> None:
        if len(images.shape) not in (3, 4):
            raise DatasetError(f"source {self.location!r}: images must be (N, H, W) or (N, H, W, C); "
                               f"got shape {images.shape}")
        if labels is not None and (labels.shape != images.shape[:1] or labels.dtype.kind not in "iu"):
            raise DatasetError(f"source {self.location!r}: labels must be integers of shape "
                               f"({images.shape[0]},); got {labels.dtype} {labels.shape}")

    def fingerprint(self) -> str:
        return _hash_file(self.path)

    def label_names(self) -> None:
        return None

    def count_hint(self) -> int:
        return self._count

    def iter_samples(self, params: PrepareParameters) -> Iterator[Sample | Skipped]:
        with _open_npy_members(self.path) as (images, labels):
            labelled = labels is not None
            label_chunks = labels.chunks(_CHUNK_ROWS) if labelled else None
            index = 0
            for chunk in images.chunks(_CHUNK_ROWS):
                chunk_labels = next(label_chunks) if label_chunks else None
                for offset, pixels in enumerate(chunk):
                    label = NO_LABEL if chunk_labels is None else int(chunk_labels[offset])
                    yield _labelled_sample(f"{self.path.name}[{index}]", pixels, label, labelled, params)
                    index += 1


@contextmanager
def _open_npy_members(path: Path) -> Iterator[tuple[_NpyStream, _NpyStream | None]]:
    """(images, labels or None) streams of a .npy or .npz file, closed on exit."""
    with ExitStack() as stack:
        try:
            streams = _npy_streams(path, stack)
        except DatasetError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise DatasetError(f"source {str(path)!r} is not a readable NumPy file: {err}") from err
        yield streams


def _npy_streams(path: Path, stack: ExitStack) -> tuple[_NpyStream, _NpyStream | None]:
    if path.suffix.lower() == ".npy":
        return _NpyStream(stack.enter_context(path.open("rb")), f"{path.name}:images"), None
    archive = stack.enter_context(zipfile.ZipFile(path))
    names = {n.removesuffix(".npy") for n in archive.namelist()}
    if "images" not in names:
        raise DatasetError(f"source {str(path)!r}: .npz has no 'images' array; found {sorted(names)}")

    def member(name: str) -> _NpyStream:
        return _NpyStream(stack.enter_context(archive.open(f"{name}.npy")), f"{path.name}:{name}")

    return member("images"), member("labels") if "labels" in names else None


# ---- Parquet ------------------------------------------------------------------------------------


class ParquetSource:
    """A Parquet table with an image column and an optional label column, read batch by batch.

    Images are encoded bytes (PNG / JPEG / ...; also a struct with a `bytes` field, as Hugging Face
    datasets store them) or fixed-shape arrays (nested lists or the fixed_shape_tensor type).
    Labels are integers, or strings mapped to their sorted order.
    """

    kind = "parquet"

    def __init__(self, path: Path, image_column: str, label_column: str | None) -> None:
        self.path = path
        self.location = str(path.resolve())
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as err:
            raise DatasetError(f"source {self.location!r} is not a readable Parquet file: {err}") from err
        self.image_column = _require_column(schema, image_column, "image_column", self.location)
        self.label_column = self._resolve_label_column(schema, label_column)
        self.has_labels = self.label_column is not None
        self._names = self._string_label_names(schema) if self.has_labels else None

    def _resolve_label_column(self, schema: pa.Schema, label_column: str | None) -> str | None:
        if label_column is not None:
            return _require_column(schema, label_column, "label_column", self.location)
        return "label" if "label" in schema.names else None

    def _string_label_names(self, schema: pa.Schema) -> list[str] | None:
        label_type = schema.field(self.label_column).type
        if pa.types.is_dictionary(label_type):
            label_type = label_type.value_type
        if pa.types.is_integer(label_type):
            return None
        if not (pa.types.is_string(label_type) or pa.types.is_large_string(label_type)):
            raise DatasetError(f"label_column {self.label_column!r} has type {label_type}; "
                               "accepted: integers or strings")
        names: set[str] = set()  # one pass over the label column only, to fix the class order
        for batch in pq.ParquetFile(self.path).iter_batches(columns=[self.label_column]):
            names.update(v for v in pc.unique(batch.column(0).cast(pa.string())).to_pylist() if v is not None)
        return sorted(names)

    def fingerprint(self) -> str:
        return _hash_file(self.path, prefix=f"{self.image_column}\0{self.label_column}\0".encode())

    def label_names(self) -> list[str] | None:
        return self._names

    def count_hint(self) -> int:
        return pq.ParquetFile(self.path).metadata.num_rows

    def iter_samples(self, params: PrepareParameters) -> Iterator[Sample | Skipped]:
        columns = [self.image_column] + ([self.label_column] if self.label_column else [])
        row = 0
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=_CHUNK_ROWS, columns=columns):
            labels = self._batch_labels(batch)
            for image, label in zip(_image_values(batch.column(0)), labels, strict=True):
                name = f"{self.path.name}[row {row}]"
                row += 1
                yield _parquet_sample(name, image, label, self.has_labels, params)

    def _batch_labels(self, batch: pa.RecordBatch) -> list[int | None]:
        if not self.has_labels:
            return [NO_LABEL] * batch.num_rows
        column = batch.column(1)
        if self._names is None:
            return column.cast(pa.int64()).to_pylist()
        index = {name: i for i, name in enumerate(self._names)}
        return [None if v is None else index[v] for v in column.cast(pa.string()).to_pylist()]


def _require_column(schema: pa.Schema, column: str, field: str, location: str) -> str:
    if column not in schema.names:
        raise DatasetError(f"{field}: column {column!r} is not in {location!r}; columns: {schema.names}")
    return column


def _image_values(column: pa.Array) -> list[bytes | np.ndarray | None]:
    """Per row: encoded bytes or a pixel array (None for a null)."""
    kind = column.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return _image_values(pc.struct_field(column, "bytes"))
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return column.to_pylist()
    if isinstance(kind, pa.FixedShapeTensorType):
        return list(column.to_numpy_ndarray())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return [None if v is None else np.asarray(v) for v in column.to_pylist()]
    raise DatasetError(f"image_column has type {kind}; accepted: binary (encoded images), "
                       "nested lists or fixed_shape_tensor arrays")


def _parquet_sample(name: str, image: bytes | np.ndarray | None, label: int | None, labelled: bool,
                    params: PrepareParameters) -> Sample | Skipped:
    if image is None:
        return Skipped(name, "image is null")
    return _labelled_sample(name, image, label, labelled, params)
