"""The prepared dataset's manifest: what a reader needs to trust and decode the shards.

Layout of a prepared dataset on a local filesystem (published by swapping a directory in):

    manifest.json                  this model, written last; its absence means "not a dataset"
    train/part-NNNNN.parquet       rows: image (binary, raw uint8 HWC bytes), label (int64, -1 when
    val/part-NNNNN.parquet         unlabelled), key (hex content hash of pixels and label)

On object stores (which cannot rename directories) every preparation writes its own version
folder and the root manifest is the only pointer to it (see `publish`):

    manifest.json                  lists versions/<id>/train/part-NNNNN.parquet, ...
    versions/<id>/...              one preparation's shards (and, once published, its manifest)

Readers open exactly the shard files the manifest lists, so stray files never leak in, and every
listed path must be a plain relative path that stays inside the dataset folder. The manifest holds
no timestamps: on a local filesystem the same source and parameters give byte-identical manifests
(on object stores they differ only in the version folder's name).
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffusion_core.data.config import PrepareParameters
from diffusion_core.errors import DatasetError

SCHEMA_VERSION = 2  # 2: class_counts, skipped_count, source.fingerprint_kind (all optional in 1)
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
SPLITS = ("train", "val")
PARQUET_SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("key", pa.string())])
PATH_RULE = "must be a relative path inside the dataset folder ('/'-separated, no '.', '..' or empty parts)"


def check_relative_path(path: str) -> str:
    """`path` unchanged when it is a plain relative POSIX path that cannot leave its folder."""
    parts = path.split("/")
    if "\\" in path or "\0" in path or any(part in ("", ".", "..") for part in parts):
        raise ValueError(PATH_RULE)
    return path


class ShardFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # relative to the dataset root, e.g. "train/part-00000.parquet"
    rows: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _inside_the_dataset(cls, path: str) -> str:
        if not path.endswith(".parquet"):
            raise ValueError("must name a .parquet file")
        return check_relative_path(path)


class SkippedItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    reason: str


class SourceInfo(BaseModel):
    """Where the rows came from; `fingerprint` is the source identity used for the up-to-date check,
    of kind `fingerprint_kind` ("content": a hash of every byte; "metadata": names, sizes, times and
    inodes; None in manifests written before the kind was recorded)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    location: str
    fingerprint: str
    fingerprint_kind: Literal["content", "metadata"] | None = None


class DatasetManifest(BaseModel):
    """A prepared dataset's description; `fingerprint` is its version (log it with every run).

    fingerprint = SHA-256 over the canonical JSON of the content parameters (sorted keys; the run
    policy is left out) followed by every row's key in row order, where key = SHA-256(shape, label,
    pixel bytes) truncated to 128 bits. mean / std are per channel over the train split with pixels
    scaled to [0, 1] (x = v / 255). class_counts[i] is the number of train rows of label i, aligned
    with label_names (None when unlabelled, and in manifests written before it was recorded): the
    class prior p(y) of the training data. `skipped` lists the first unusable items, `skipped_count`
    counts them all.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1, 2] = SCHEMA_VERSION
    fingerprint: str
    image_size: int = Field(ge=1, le=4096)
    channels: Literal[1, 3]
    image_shape: tuple[int, int, int]  # (H, W, C) of the stored bytes
    dtype: Literal["uint8"] = "uint8"
    value_range: tuple[int, int] = (0, 255)  # stored values; readers map them to [-1, 1]
    label_names: list[str] | None
    class_counts: list[int] | None = None
    counts: dict[Literal["train", "val"], int]
    mean: list[float]
    std: list[float]
    parameters: PrepareParameters
    source: SourceInfo
    shards: dict[Literal["train", "val"], list[ShardFile]]
    skipped: list[SkippedItem] = Field(default_factory=list)
    skipped_count: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _count_listed_skips_in_older_manifests(cls, data: Any) -> Any:
        if isinstance(data, dict) and "skipped_count" not in data:
            data = {**data, "skipped_count": len(data.get("skipped") or [])}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> DatasetManifest:
        if self.image_shape != (self.image_size, self.image_size, self.channels):
            raise ValueError("image_shape must be (image_size, image_size, channels)")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std must have one value per channel")
        if set(self.counts) != set(self.shards):
            raise ValueError("counts and shards must name the same splits")
        for split, files in self.shards.items():
            if sum(f.rows for f in files) != self.counts[split]:
                raise ValueError(f"shards.{split}: the rows of the shards must add up to counts.{split}")
        self._check_labels()
        return self

    def _check_labels(self) -> None:
        if self.label_names is not None and len(self.label_names) > self.parameters.max_classes:
            raise ValueError("label_names: more names than parameters.max_classes")
        if self.class_counts is None:
            return
        if self.label_names is None or len(self.class_counts) != len(self.label_names):
            raise ValueError("class_counts must have one count per label name")
        if min(self.class_counts, default=0) < 0 or sum(self.class_counts) != self.counts.get("train", 0):
            raise ValueError("class_counts must be non-negative and add up to counts.train")

    @property
    def num_classes(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)

    def shard_paths(self, split: str) -> list[str]:
        if split not in self.shards:
            raise DatasetError(f"split {split!r} is not in this dataset; accepted: {sorted(self.shards)}")
        return [shard.path for shard in self.shards[split]]

    def same_dataset(self, other: DatasetManifest) -> bool:
        """Equal in everything but where the shards are stored (object stores: the version folder)."""
        return _without_storage(self) == _without_storage(other)

    def to_json_bytes(self) -> bytes:
        """Canonical JSON (sorted keys): equal manifests are byte-identical."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def _without_storage(manifest: DatasetManifest) -> dict[str, Any]:
    dump = manifest.model_dump(mode="json")
    dump["shards"] = {split: [f["rows"] for f in files] for split, files in dump["shards"].items()}
    return dump


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it: URIs with a scheme, or a local path."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowException, ValueError) as err:
            raise DatasetError(f"cannot open filesystem for {uri!r}: {err}") from err
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, relative: str) -> str:
    return f"{base.rstrip('/')}/{relative}"


def read_manifest(uri: str) -> DatasetManifest:
    """The manifest of the prepared dataset at `uri`; DatasetError when there is none or it is invalid."""
    fs, root = resolve_uri(uri)
    return read_manifest_from(fs, root, uri)


def read_manifest_from(fs: pafs.FileSystem, root: str, uri: str | None = None,
                       name: str = MANIFEST_NAME) -> DatasetManifest:
    """The manifest `name` under `root`, validated (at most MAX_MANIFEST_BYTES are read)."""
    uri = uri or root
    try:
        with fs.open_input_stream(join(root, name)) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise DatasetError(
            f"{uri!r} is not a prepared dataset: it has no {MANIFEST_NAME}",
            hint="run `diffusion-pipeline prepare` (a preparation that did not finish leaves no manifest)",
        ) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise DatasetError(f"{uri!r}: {name} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return DatasetManifest.model_validate_json(raw)
    except ValidationError as err:
        raise DatasetError(f"{uri!r}: invalid {name}: {_problems(err)}") from None


def _problems(err: ValidationError) -> str:
    """Each problem as `field.path: rule`, without the offending value (a manifest may be hostile)."""
    problems = []
    for e in err.errors(include_input=False):
        location = ".".join(str(part) for part in e["loc"]) or "<root>"
        problems.append(f"{location}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def shard_uris(fs: pafs.FileSystem, root: str, manifest: DatasetManifest, split: str) -> list[str]:
    """Paths (inside `fs`) of the split's shards, in order. On a local filesystem each is resolved
    (links followed) and must stay inside the dataset folder."""
    paths = [join(root, rel) for rel in manifest.shard_paths(split)]
    if isinstance(fs, pafs.LocalFileSystem):
        real_root = os.path.realpath(root)
        for i, path in enumerate(paths):
            if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
                raise DatasetError(f"{root!r}: manifest field shards.{split}[{i}].path leads outside the "
                                   "dataset folder (through a symbolic link)")
    return paths
