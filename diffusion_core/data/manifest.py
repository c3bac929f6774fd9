"""The prepared dataset's manifest: what a reader needs to trust and decode the shards.

Layout of a prepared dataset (any pyarrow filesystem):

    manifest.json                  this model, written last; its absence means "not a dataset"
    train/part-NNNNN-<fp>.parquet  rows: image (binary, raw uint8 HWC bytes), label (int64, -1 when
    val/part-NNNNN-<fp>.parquet    unlabelled), key (hex content hash of pixels and label)

Readers open exactly the shard files the manifest lists, so stray files never leak in. The
manifest holds no timestamps: the same source and parameters give byte-identical manifests.
"""

from __future__ import annotations

import json
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffusion_core.data.config import PrepareParameters
from diffusion_core.errors import DatasetError, describe_validation_error

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
PARQUET_SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("key", pa.string())])


class ShardFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # relative to the dataset root, e.g. "train/part-00000-0123abcd4567.parquet"
    rows: int


class SkippedItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    reason: str


class SourceInfo(BaseModel):
    """Where the rows came from; `fingerprint` is the cheap source identity used for caching."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    location: str
    fingerprint: str


class DatasetManifest(BaseModel):
    """A prepared dataset's description; `fingerprint` is its version (log it with every run).

    fingerprint = SHA-256 over the canonical parameters JSON followed by every row's key in row
    order, where key = SHA-256(shape, label, pixel bytes) truncated to 128 bits. mean / std are
    per channel over the train split with pixels scaled to [0, 1] (x = v / 255).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    fingerprint: str
    image_size: int
    channels: int
    image_shape: tuple[int, int, int]  # (H, W, C) of the stored bytes
    dtype: Literal["uint8"] = "uint8"
    value_range: tuple[int, int] = (0, 255)  # stored values; readers map them to [-1, 1]
    label_names: list[str] | None
    counts: dict[str, int]
    mean: list[float]
    std: list[float]
    parameters: PrepareParameters
    source: SourceInfo
    shards: dict[str, list[ShardFile]]
    skipped: list[SkippedItem] = Field(default_factory=list)

    @property
    def num_classes(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)

    def shard_paths(self, split: str) -> list[str]:
        if split not in self.shards:
            raise DatasetError(f"split {split!r} is not in this dataset; accepted: {sorted(self.shards)}")
        return [shard.path for shard in self.shards[split]]

    def to_json_bytes(self) -> bytes:
        """Canonical JSON (sorted keys): equal manifests are byte-identical."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it: URIs with a scheme, or a local path."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowException, ValueError) as err:
            raise DatasetError(f"cannot open filesystem for {uri!r}: {err}") from err
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, relative: str) -> str:
    return f"{base.rstrip('/')}/{relative}"


def read_manifest(uri: str) -> DatasetManifest:
    """The manifest of the prepared dataset at `uri`; DatasetError when there is none or it is invalid."""
    fs, root = resolve_uri(uri)
    return read_manifest_from(fs, root, uri)


def read_manifest_from(fs: pafs.FileSystem, root: str, uri: str | None = None) -> DatasetManifest:
    uri = uri or root
    try:
        with fs.open_input_stream(join(root, MANIFEST_NAME)) as f:
            raw = f.read()
    except FileNotFoundError:
        raise DatasetError(
            f"{uri!r} is not a prepared dataset: it has no {MANIFEST_NAME}",
            hint="run `diffusion-pipeline prepare` (a preparation that did not finish leaves no manifest)",
        ) from None
    try:
        return DatasetManifest.model_validate_json(raw)
    except ValidationError as err:
        raise DatasetError(f"{uri!r}: invalid {MANIFEST_NAME}: {describe_validation_error(err)}") from None


def shard_uris(fs: pafs.FileSystem, root: str, manifest: DatasetManifest, split: str) -> list[str]:
    """Paths (inside `fs`) of the split's shards, in order."""
    return [join(root, rel) for rel in manifest.shard_paths(split)]
