"""Image sources: each streams conformed (size, size, channels) uint8 samples, one at a time.

A source never holds the whole dataset: image folders are decoded file by file, NumPy files are
read in chunks of bounded bytes straight from the file (or from inside the .npz zip), Parquet tables
a row group at a time. A file or row that cannot be used becomes a `Skipped` record instead of an
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
import io
import logging
import math
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from diffusion_core.data.config import PrepareParameters
from diffusion_core.data.local_files import (
    SourceTree,
    TreeEntry,
    hash_stream,
    metadata_identity,
    open_regular_file,
    stat_regular_file,
)
from diffusion_core.data.transforms import (
    check_geometry,
    conform_array,
    conform_image,
    digits_to_uint8,
)
from diffusion_core.errors import DatasetError

logger = logging.getLogger(__name__)

NO_LABEL = -1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# The decoders Pillow may use: only the formats the suffixes name, whatever a file's bytes claim.
ENCODED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
SOURCE_KINDS = "'digits', an image folder, a .npy / .npz file or a .parquet file"
MAX_LABEL_NAME_CHARS = 256
MAX_REASON_CHARS = 300
_CHUNK_ROWS = 256
_CHUNK_BYTES = 16 << 20  # NumPy sources read at most this many bytes at once (at least one image)

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
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(file, formats=ENCODED_FORMATS) as image:
            image.draft(None, (params.size, params.size))  # JPEG: decode at a reduced DCT scale
            check_geometry(*image.size, params.max_image_pixels, params.max_aspect_ratio)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return conform_image(image, params.size, params.channels, params.alpha_background)


def _decode_or_skip(name: str, opener: Callable[[], BinaryIO], label: int,
                    params: PrepareParameters) -> Sample | Skipped:
    try:
        with opener() as file:
            pixels = decode_image(file, params)
    except Exception as err:  # noqa: BLE001 - a decoder fed hostile bytes may raise anything: skip it
        return Skipped(name, skip_reason(err))
    return Sample(name, pixels, label)


def _conform_or_skip(name: str, pixels: np.ndarray, label: int,
                     params: PrepareParameters) -> Sample | Skipped:
    try:
        if pixels.ndim >= 2:
            check_geometry(pixels.shape[1], pixels.shape[0], params.max_image_pixels, params.max_aspect_ratio)
        conformed = conform_array(pixels, params.size, params.channels, params.alpha_background)
    except DatasetError as err:
        return Skipped(name, skip_reason(err))
    return Sample(name, conformed, label)


def _labelled_sample(name: str, pixels: np.ndarray | bytes, label: int | None, labelled: bool,
                     params: PrepareParameters) -> Sample | Skipped:
    """A sample from pixels (an array, or encoded image bytes). Rows of a labelled source need a
    label in [0, max_classes) (a null label is a missing one); unlabelled sources carry NO_LABEL."""
    if labelled and (label is None or label < 0):
        return Skipped(name, f"label is {label}; labels must be >= 0")
    if labelled and label >= params.max_classes:
        return Skipped(name, f"label must be below max_classes ({params.max_classes})")
    if isinstance(pixels, bytes):
        return _decode_or_skip(name, lambda: io.BytesIO(pixels), label, params)
    return _conform_or_skip(name, pixels, label, params)


def _check_class_count(count: int, params: PrepareParameters, location: str) -> None:
    if count > params.max_classes:
        raise DatasetError(f"source {location!r} has more than max_classes ({params.max_classes}) classes",
                           hint="raise max_classes, or check the label column / class folders")


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
            yield _conform_or_skip(f"digits[{i}]", pixels, int(label), params)


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
            _check_class_count(len(self._classes), params, self.location)
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
            yield _decode_or_skip(name, lambda t=entry.target: self.tree.open(t), label, params)


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


# ---- NumPy --------------------------------------------------------------------------------------


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
        self._check_length(total_bytes - fp.tell())

    def _check_length(self, data_bytes: int) -> None:
        rows = self.shape[0] if self.shape else 0
        if rows * self.row_bytes > data_bytes:
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
                yield _labelled_sample(name, pixels, label, labels is not None, params)
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
        return _NpyStream(f, f"{path.name}:images", stat_regular_file(path).st_size), None
    archive = stack.enter_context(zipfile.ZipFile(f))
    names = {n.removesuffix(".npy") for n in archive.namelist()}
    if "images" not in names:
        raise DatasetError(f"source {str(path)!r}: .npz has no 'images' array")

    def member(name: str) -> _NpyStream:
        entry = archive.getinfo(f"{name}.npy")
        return _NpyStream(stack.enter_context(archive.open(entry)), f"{path.name}:{name}", entry.file_size)

    return member("images"), member("labels") if "labels" in names else None


# ---- Parquet ------------------------------------------------------------------------------------


class ParquetSource:
    """A Parquet table with an image column and an optional label column, read batch by batch.

    Images are encoded bytes (PNG / JPEG / BMP / WebP; also a struct with a `bytes` field, as
    Hugging Face datasets store them; its `path` field is never opened) or fixed-shape arrays
    (nested lists or the fixed_shape_tensor type). Labels are integers, or strings mapped to their
    sorted order. Every row group is checked against max_source_row_group_bytes before any is read.
    """

    kind = "parquet"

    def __init__(self, path: Path, params: PrepareParameters) -> None:
        self.path = path
        self.location = str(path.resolve())
        info = stat_regular_file(path)
        with self._open() as table:
            schema = table.schema_arrow
            self.image_column = _require_column(schema, params.image_column, "image_column", self.location)
            self.label_column = self._resolve_label_column(schema, params.label_column)
            _check_image_type(schema.field(self.image_column).type, params, self.location)
            self._check_row_groups(table.metadata, params)
            self._count = table.metadata.num_rows
        self.has_labels = self.label_column is not None
        self._names = self._string_label_names(schema, params) if self.has_labels else None
        self.fingerprint_kind = fingerprint_kind_for(params, info.st_size)

    @contextmanager
    def _open(self) -> Iterator[pq.ParquetFile]:
        with open_regular_file(self.path) as f:
            try:
                yield pq.ParquetFile(f)
            except (OSError, pa.ArrowException) as err:
                raise DatasetError(f"source {self.location!r} is not a readable Parquet file: {err}") from err

    def _columns(self) -> list[str]:
        return [self.image_column] + ([self.label_column] if self.label_column else [])

    def _check_row_groups(self, metadata: pq.FileMetaData, params: PrepareParameters) -> None:
        """A row group is decoded whole: refuse the file when one would exceed the byte budget."""
        columns = set(self._columns())
        for i in range(metadata.num_row_groups):
            group = metadata.row_group(i)
            size = sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
                       if group.column(j).path_in_schema.split(".")[0] in columns)
            if size > params.max_source_row_group_bytes:
                raise DatasetError(
                    f"source {self.location!r}: a row group holds more than max_source_row_group_bytes "
                    f"({params.max_source_row_group_bytes}) bytes in the columns read",
                    hint="rewrite the table with smaller row groups (pyarrow.parquet.write_table("
                    "row_group_size=...)), or raise max_source_row_group_bytes")

    def _resolve_label_column(self, schema: pa.Schema, label_column: str | None) -> str | None:
        if label_column is not None:
            return _require_column(schema, label_column, "label_column", self.location)
        return "label" if "label" in schema.names else None

    def _string_label_names(self, schema: pa.Schema, params: PrepareParameters) -> list[str] | None:
        label_type = schema.field(self.label_column).type
        if pa.types.is_dictionary(label_type):
            label_type = label_type.value_type
        if pa.types.is_integer(label_type):
            return None
        if not (pa.types.is_string(label_type) or pa.types.is_large_string(label_type)):
            raise DatasetError(f"label_column {self.label_column!r} has type {label_type}; "
                               "accepted: integers or strings")
        names: set[str] = set()  # one pass over the label column only, to fix the class order
        with self._open() as table:
            for batch in table.iter_batches(columns=[self.label_column]):
                unique = pc.unique(batch.column(0).cast(pa.string())).to_pylist()
                names.update(v for v in unique if v is not None)
                _check_class_count(len(names), params, self.location)
        if any(len(name) > MAX_LABEL_NAME_CHARS for name in names):
            raise DatasetError(f"label_column {self.label_column!r}: label names must be at most "
                               f"{MAX_LABEL_NAME_CHARS} characters")
        return sorted(names)

    def fingerprint(self) -> str:
        prefix = f"{self.image_column}\0{self.label_column}\0".encode()
        if self.fingerprint_kind == "metadata":
            identity = metadata_identity(stat_regular_file(self.path)).encode()
            return hashlib.sha256(prefix + identity).hexdigest()
        with open_regular_file(self.path) as f:
            return hash_stream(f, prefix=prefix)

    def label_names(self) -> list[str] | None:
        return self._names

    def count_hint(self) -> int:
        return self._count

    def iter_samples(self, params: PrepareParameters) -> Iterator[Sample | Skipped]:
        row = 0
        with self._open() as table:
            for batch in table.iter_batches(batch_size=_CHUNK_ROWS, columns=self._columns()):
                labels = self._batch_labels(batch)
                cells = _image_cells(batch.column(0), params)
                for i, label in enumerate(labels):
                    name = f"{self.path.name}[row {row}]"
                    row += 1
                    yield _parquet_sample(name, cells, i, label, self.has_labels, params)

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


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _check_image_type(kind: pa.DataType, params: PrepareParameters, location: str) -> None:
    """Refuse an unsupported image column, or a tensor type whose declared shape breaks the limits."""
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return _check_image_type(kind.field("bytes").type, params, location)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or _is_list(kind):
        return None
    if isinstance(kind, pa.FixedShapeTensorType):
        shape = kind.shape
        if len(shape) not in (2, 3):
            raise DatasetError(f"image_column of {location!r}: tensor shape must be (H, W) or (H, W, C)")
        try:
            check_geometry(shape[1], shape[0], params.max_image_pixels, params.max_aspect_ratio)
        except DatasetError as err:
            raise DatasetError(f"image_column of {location!r}: {err}", hint=err.hint) from None
        return None
    raise DatasetError(f"image_column has type {kind}; accepted: binary (encoded images), "
                       "nested lists or fixed_shape_tensor arrays")


ImageCell = Callable[[int], "bytes | np.ndarray | None"]


def _image_cells(column: pa.Array, params: PrepareParameters) -> ImageCell:
    """Per row i: encoded bytes or a pixel array (None for a null); may raise DatasetError."""
    kind = column.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return _image_cells(pc.struct_field(column, "bytes"), params)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return column.to_pylist().__getitem__
    if isinstance(kind, pa.FixedShapeTensorType):
        arrays = column.to_numpy_ndarray()
        return lambda i: arrays[i] if column[i].is_valid else None
    return lambda i: _nested_list_cell(column.slice(i, 1), params)


def _nested_list_cell(cell: pa.Array, params: PrepareParameters) -> np.ndarray | None:
    """One row of nested lists -> an (H, W[, C]) array, refusing ragged lists and checking the size
    against the limits as soon as H and W are known (before the values are converted)."""
    if cell.null_count:
        return None
    shape: list[int] = []
    values: pa.Array = cell
    while _is_list(values.type):
        lengths = pc.list_value_length(values)
        if len(shape) == 3 or len(lengths) == 0 or lengths.null_count:
            raise DatasetError(_NESTED_LISTS_RULE)
        low, high = (v.as_py() for v in pc.min_max(lengths).values())
        if low != high:
            raise DatasetError(_NESTED_LISTS_RULE)
        shape.append(low)
        if len(shape) == 2:
            check_geometry(shape[1], shape[0], params.max_image_pixels, params.max_aspect_ratio)
        values = pc.list_flatten(values)
    if len(shape) < 2:
        raise DatasetError(_NESTED_LISTS_RULE)
    return values.to_numpy(zero_copy_only=False).reshape(shape)


_NESTED_LISTS_RULE = "image cell must hold equal-length nested lists of shape (H, W) or (H, W, C)"


def _parquet_sample(name: str, cells: ImageCell, i: int, label: int | None, labelled: bool,
                    params: PrepareParameters) -> Sample | Skipped:
    try:
        image = cells(i)
    except DatasetError as err:
        return Skipped(name, skip_reason(err))
    if image is None:
        return Skipped(name, "image is null")
    return _labelled_sample(name, image, label, labelled, params)

