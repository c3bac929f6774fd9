"""Parquet sources: a table with an image column and an optional label column.

Every row group is checked against max_source_row_group_bytes before any is read, and read in
batches sized to stay within it; encoded cells are decoded in place (no copy), nested-list cells
are checked against the image limits as soon as their height and width are known.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffusion_core.data.config import PrepareParameters
from diffusion_core.data.local_files import (
    hash_stream,
    metadata_identity,
    open_regular_file,
    stat_regular_file,
)
from diffusion_core.data.samples import (
    NO_LABEL,
    Sample,
    Skipped,
    check_class_count,
    fingerprint_kind_for,
    labelled_sample,
    skip_reason,
)
from diffusion_core.data.transforms import check_geometry
from diffusion_core.errors import DatasetError

MAX_LABEL_NAME_CHARS = 256
_CHUNK_ROWS = 256
_DECODE_OVERHEAD = 4  # bytes Arrow holds while decoding, per byte of values (3 measured)


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
                table = pq.ParquetFile(f)
            except (OSError, pa.ArrowException) as err:
                raise DatasetError(f"source {self.location!r} is not a readable Parquet file: {err}") from err
            yield table

    def _columns(self) -> list[str]:
        return [self.image_column] + ([self.label_column] if self.label_column else [])

    def _check_row_groups(self, metadata: pq.FileMetaData, params: PrepareParameters) -> None:
        """Refuse the file when a row group's columns exceed the byte budget (their pages are read
        whole, and no one value can be larger); remember each group's size to size its batches."""
        columns = set(self._columns())
        self._group_bytes: list[int] = []
        for i in range(metadata.num_row_groups):
            group = metadata.row_group(i)
            size = sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
                       if group.column(j).path_in_schema.split(".")[0] in columns)
            self._group_bytes.append(size)
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
                check_class_count(len(names), params, self.location)
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
            for group, group_bytes in enumerate(self._group_bytes):
                for batch in table.iter_batches(batch_size=_batch_rows(group_bytes, params),
                                                row_groups=[group], columns=self._columns()):
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


def _batch_rows(group_bytes: int, params: PrepareParameters) -> int:
    """Rows per batch so that reading a batch stays within max_source_row_group_bytes even when every
    row repeats the row group's largest value (dictionary encoding stores a repeated value once, and
    no value is larger than its row group's pages). Arrow's builders hold up to about three times
    the values they decode while they grow (measured: 256 rows of 1 MB peak at 0.8 GB), hence
    _DECODE_OVERHEAD."""
    per_row = _DECODE_OVERHEAD * max(1, group_bytes)
    return max(1, min(_CHUNK_ROWS, params.max_source_row_group_bytes // per_row))


def _require_column(schema: pa.Schema, column: str, field: str, location: str) -> str:
    if column not in schema.names:
        raise DatasetError(f"{field}: column {column!r} is not in {location!r}; columns: {schema.names}")
    return column


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _check_image_type(kind: pa.DataType, params: PrepareParameters, location: str) -> None:
    """Refuse an unsupported image column, or a tensor type whose declared shape breaks the limits."""
    if pa.types.is_dictionary(kind):
        return _check_image_type(kind.value_type, params, location)
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


ImageCell = Callable[[int], "pa.Buffer | np.ndarray | None"]


def _image_cells(column: pa.Array, params: PrepareParameters) -> ImageCell:
    """Per row i: encoded bytes (an Arrow buffer) or a pixel array (None for a null); may raise
    DatasetError."""
    kind = column.type
    if pa.types.is_dictionary(kind):  # each distinct value is read once, whatever the row count
        values, indices = _image_cells(column.dictionary, params), column.indices
        return lambda i: values(indices[i].as_py()) if indices[i].is_valid else None
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return _image_cells(pc.struct_field(column, "bytes"), params)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return lambda i: column[i].as_buffer()  # a view: no copy
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
    return labelled_sample(name, image, label, labelled, params)
