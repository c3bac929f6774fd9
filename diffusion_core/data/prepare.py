"""Prepare a dataset: stream a source into versioned, sharded Parquet plus a manifest, atomically.

Every sample is conformed (see `transforms`), keyed by a content hash, routed to train or val by
that hash, and appended to the split's current row group; nothing else is kept in memory, so peak
memory is bounded by one row group per split whatever the source's size. The fingerprint and the
per-channel statistics are computed on the fly.

Split rule: row -> val  iff  int(key[:16], 16) / 2^64 < val_fraction. It depends on the row alone,
so adding images never moves existing ones between splits (for fixed size / channels).

Atomicity: shards and manifest are written into a hidden sibling staging directory and published
only when complete. On a local filesystem publishing is two directory renames (old dataset aside,
staging in place), so the output path holds the old dataset, nothing, or the new one. On object
stores, which cannot rename directories, shards (named after the fingerprint) are moved first and
the manifest, which lists them, is written last; readers only open what a manifest lists.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from diffusion_core.atomic_io import replace_directory
from diffusion_core.data.config import PrepareConfig, PrepareParameters
from diffusion_core.data.manifest import (
    MANIFEST_NAME,
    PARQUET_SCHEMA,
    SPLITS,
    DatasetManifest,
    ShardFile,
    SkippedItem,
    SourceInfo,
    join,
    read_manifest_from,
    resolve_uri,
)
from diffusion_core.data.sources import ImageSource, Sample, Skipped, open_source
from diffusion_core.errors import DatasetError

logger = logging.getLogger(__name__)

KEY_HEX_CHARS = 32  # 128 bits: collisions are out of reach for any dataset size
Progress = Callable[[int], None]  # called with the number of source items consumed so far
_LOG_EVERY_S = 10.0


class PrepareResult(BaseModel):
    """What a preparation produced; `reused` is True when an identical dataset was already there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    manifest: DatasetManifest
    reused: bool


def prepare(config: PrepareConfig, *, progress: Progress | None = None, force: bool = False) -> PrepareResult:
    """Prepare `config.source` into `config.output`; skip the work when it is already up to date.

    Up to date means: the output's manifest has the same source fingerprint and parameters.
    `force` rebuilds regardless (the result is still published atomically).
    """
    params = config.parameters()
    source = open_source(config.source, params)
    fs, root = resolve_uri(config.output)
    source_info = SourceInfo(kind=source.kind, location=source.location, fingerprint=source.fingerprint())
    existing = _existing_manifest(fs, root, config.output)
    if not force and existing is not None and (existing.source, existing.parameters) == (source_info, params):
        logger.info("%s is up to date (fingerprint %s); nothing to do", config.output, existing.fingerprint)
        return PrepareResult(uri=config.output, manifest=existing, reused=True)
    manifest = _build_and_publish(source, source_info, params, fs, root, existing, progress)
    return PrepareResult(uri=config.output, manifest=manifest, reused=manifest == existing)


def row_key(pixels: np.ndarray, label: int) -> str:
    """Content hash of one row: SHA-256 of its shape, label and pixel bytes, first 128 bits in hex."""
    h, w, c = pixels.shape
    digest = hashlib.sha256(f"{h}x{w}x{c}:{label}:".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()[:KEY_HEX_CHARS]


def split_of(key: str, val_fraction: float) -> str:
    """"val" iff the key's first 64 bits, read as a fraction of 2^64, fall below val_fraction."""
    return "val" if int(key[:16], 16) < val_fraction * 2.0**64 else "train"


def parameters_json(params: PrepareParameters) -> bytes:
    return params.model_dump_json().encode()


# ---- building -----------------------------------------------------------------------------------


def _existing_manifest(fs: pafs.FileSystem, root: str, uri: str) -> DatasetManifest | None:
    """The manifest already at the output; refuses to replace a non-empty directory that has none."""
    if fs.get_file_info(join(root, MANIFEST_NAME)).type != pafs.FileType.NotFound:
        return read_manifest_from(fs, root, uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File or (
        info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(root))
    ):
        raise DatasetError(f"output {uri!r} exists and is not a prepared dataset; refusing to replace it",
                           hint="choose an empty or new output directory")
    return None


def _build_and_publish(source: ImageSource, source_info: SourceInfo, params: PrepareParameters,
                       fs: pafs.FileSystem, root: str, existing: DatasetManifest | None,
                       progress: Progress | None) -> DatasetManifest:
    staging = _staging_dir(root)
    fs.create_dir(staging, recursive=True)
    try:
        manifest, staged = _write_staging(source, source_info, params, fs, staging, progress)
        if existing is not None and existing.to_json_bytes() == manifest.to_json_bytes():
            logger.info("rebuilt dataset is identical to the existing one (%s)", manifest.fingerprint)
        else:
            _publish(fs, staging, root, manifest, staged)
    finally:
        if fs.get_file_info(staging).type != pafs.FileType.NotFound:
            fs.delete_dir(staging)
    return manifest


def _staging_dir(root: str) -> str:
    parent, slash, name = root.rstrip("/").rpartition("/")
    return f"{parent}{slash}.{name}.staging-{uuid.uuid4().hex[:12]}"


def _write_staging(source: ImageSource, source_info: SourceInfo, params: PrepareParameters,
                   fs: pafs.FileSystem, staging: str, progress: Progress | None,
                   ) -> tuple[DatasetManifest, dict[str, str]]:
    """Stream every sample into the staging shards; the manifest and {final path: staged path}."""
    tally = _Tally(params)
    writers = {split: _SplitWriter(fs, staging, split, params) for split in SPLITS}
    writers["train"].stats = tally.channel_stats  # statistics describe the training data
    for sample in _with_progress(source, params, progress):
        if isinstance(sample, Skipped):
            tally.skip(sample)
            continue
        key = row_key(sample.pixels, sample.label)
        split = split_of(key, params.val_fraction)
        writers[split].add(sample, key)
        tally.add(key, sample.label, split)
    staged = {split: writers[split].close() for split in SPLITS}
    tally.check_usable(source)
    manifest = tally.manifest(source, source_info, staged)
    final_names = _final_shard_names(staged, manifest.fingerprint)
    return manifest.model_copy(update={"shards": final_names.shards}), final_names.moves


def _with_progress(source: ImageSource, params: PrepareParameters,
                   progress: Progress | None) -> Iterator[Sample | Skipped]:
    total, start, last_log = source.count_hint(), time.monotonic(), time.monotonic()
    for count, item in enumerate(source.iter_samples(params), start=1):
        yield item
        if progress is not None and (count % 256 == 0 or count == total):
            progress(count)
        if time.monotonic() - last_log > _LOG_EVERY_S:
            last_log = time.monotonic()
            _log_rate(count, total, last_log - start)


def _log_rate(count: int, total: int | None, elapsed: float) -> None:
    rate = count / max(elapsed, 1e-9)
    eta = f", ETA {(total - count) / rate:.0f}s" if total else ""
    logger.info("prepared %d%s images (%.0f images/s%s)", count, f"/{total}" if total else "", rate, eta)


@dataclass
class _FinalNames:
    shards: dict[str, list[ShardFile]]
    moves: dict[str, str]


def _final_shard_names(staged: dict[str, list[ShardFile]], fingerprint: str) -> _FinalNames:
    """Shard names carry the fingerprint so that shards of two versions never collide."""
    shards: dict[str, list[ShardFile]] = {}
    moves: dict[str, str] = {}
    for split, files in staged.items():
        shards[split] = []
        for index, shard in enumerate(files):
            final = f"{split}/part-{index:05d}-{fingerprint[:12]}.parquet"
            shards[split].append(ShardFile(path=final, rows=shard.rows))
            moves[final] = shard.path
    return _FinalNames(shards, moves)


class _ChannelStats:
    """Exact per-channel mean and std of uint8 pixels, streamed as 256-bin histograms h_c.

    With n = sum_v h_c(v), S1 = sum_v h_c(v) v and S2 = sum_v h_c(v) v^2 (exact integers):
    mean_c = S1 / n,  std_c = sqrt(n S2 - S1^2) / n  (population), reported for x = v / 255.
    Integers make the result independent of chunking and free of cancellation error.
    """

    def __init__(self, channels: int) -> None:
        self.histograms = np.zeros((channels, 256), dtype=np.int64)

    def add(self, images: np.ndarray) -> None:
        flat = images.reshape(-1, images.shape[-1])
        for c in range(flat.shape[1]):
            self.histograms[c] += np.bincount(flat[:, c], minlength=256)

    def result(self) -> tuple[list[float], list[float]]:
        values = range(256)
        means, stds = [], []
        for hist in self.histograms.tolist():
            n = sum(hist)
            s1 = sum(h * v for h, v in zip(hist, values, strict=True))
            s2 = sum(h * v * v for h, v in zip(hist, values, strict=True))
            means.append(round(s1 / n / 255.0, 8) if n else 0.0)
            stds.append(round(math.sqrt(n * s2 - s1 * s1) / n / 255.0, 8) if n else 0.0)
        return means, stds


@dataclass
class _Tally:
    """Running fingerprint, counts, label range, statistics and skip list of one preparation."""

    params: PrepareParameters
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped: list[SkippedItem] = field(default_factory=list)
    max_label: int = -1

    def __post_init__(self) -> None:
        self.digest = hashlib.sha256(parameters_json(self.params))
        self.channel_stats = _ChannelStats(self.params.channels)

    def add(self, key: str, label: int, split: str) -> None:
        self.digest.update(key.encode())
        self.counts[split] += 1
        self.max_label = max(self.max_label, label)

    def skip(self, item: Skipped) -> None:
        logger.warning("skipping %s: %s", item.name, item.reason)
        self.skipped.append(SkippedItem(name=item.name, reason=item.reason))

    def check_usable(self, source: ImageSource) -> None:
        if sum(self.counts.values()) == 0:
            first = ""
            if self.skipped:
                first = f"; first problem: {self.skipped[0].name}: {self.skipped[0].reason}"
            raise DatasetError(f"source {source.location!r} yielded no images "
                               f"({len(self.skipped)} skipped){first}")
        if self.counts["train"] == 0:
            raise DatasetError(f"val_fraction={self.params.val_fraction} left no rows for training "
                               f"({self.counts['val']} rows, all in val)", hint="lower val_fraction")

    def manifest(self, source: ImageSource, source_info: SourceInfo,
                 shards: dict[str, list[ShardFile]]) -> DatasetManifest:
        size, channels = self.params.size, self.params.channels
        mean, std = self.channel_stats.result()
        return DatasetManifest(
            fingerprint=self.digest.hexdigest(), image_size=size, channels=channels,
            image_shape=(size, size, channels), label_names=self._label_names(source),
            counts=self.counts, mean=mean, std=std, parameters=self.params, source=source_info,
            shards=shards, skipped=self.skipped,
        )

    def _label_names(self, source: ImageSource) -> list[str] | None:
        if not source.has_labels:
            return None
        return source.label_names() or [str(i) for i in range(self.max_label + 1)]


class _SplitWriter:
    """Appends rows to one split's shards, a row group at a time (the only pixels held in memory)."""

    def __init__(self, fs: pafs.FileSystem, staging: str, split: str, params: PrepareParameters) -> None:
        self.fs, self.staging, self.split, self.params = fs, staging, split, params
        self.shards: list[ShardFile] = []
        self.writer: pq.ParquetWriter | None = None
        self.rows_in_shard = 0
        self.stats: _ChannelStats | None = None
        self._reset_buffer()

    def _reset_buffer(self) -> None:
        self.images: list[bytes] = []
        self.labels: list[int] = []
        self.keys: list[str] = []
        self.pixels: list[np.ndarray] = []

    def add(self, sample: Sample, key: str) -> None:
        self.images.append(sample.pixels.tobytes())
        self.labels.append(sample.label)
        self.keys.append(key)
        if self.stats is not None:
            self.pixels.append(sample.pixels)
        if len(self.images) >= min(self.params.rows_per_row_group,
                                   self.params.rows_per_shard - self.rows_in_shard):
            self._flush()

    def _flush(self) -> None:
        if self.writer is None:
            self._open_shard()
        columns = {"image": self.images, "label": self.labels, "key": self.keys}
        table = pa.table(columns, schema=PARQUET_SCHEMA)
        self.writer.write_table(table, row_group_size=len(self.images))
        if self.pixels:
            self.stats.add(np.stack(self.pixels))
        self.rows_in_shard += len(self.images)
        self.shards[-1] = ShardFile(path=self.shards[-1].path, rows=self.rows_in_shard)
        self._reset_buffer()
        if self.rows_in_shard >= self.params.rows_per_shard:
            self._close_shard()

    def _open_shard(self) -> None:
        rel = f"{self.split}/part-{len(self.shards):05d}.parquet"
        self.fs.create_dir(join(self.staging, self.split), recursive=True)
        sink = self.fs.open_output_stream(join(self.staging, rel))
        self.writer = pq.ParquetWriter(sink, PARQUET_SCHEMA, compression="zstd")
        self.shards.append(ShardFile(path=rel, rows=0))
        self.rows_in_shard = 0

    def _close_shard(self) -> None:
        self.writer.close()
        self.writer = None
        self.rows_in_shard = 0  # the next row starts a new shard with a full-size row group

    def close(self) -> list[ShardFile]:
        """Flush the last rows; a split with no rows still gets one empty shard (schema only)."""
        if self.images or not self.shards:
            self._flush() if self.images else self._open_shard()
        if self.writer is not None:
            self._close_shard()
        return self.shards


# ---- publishing ---------------------------------------------------------------------------------


def _publish(fs: pafs.FileSystem, staging: str, root: str, manifest: DatasetManifest,
             moves: dict[str, str]) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        _publish_by_rename(fs, staging, root, manifest, moves)
    else:
        _publish_manifest_last(fs, staging, root, manifest, moves)
    logger.info("published dataset %s: %s", manifest.fingerprint, manifest.counts)


def _publish_by_rename(fs: pafs.FileSystem, staging: str, root: str, manifest: DatasetManifest,
                       moves: dict[str, str]) -> None:
    """Local: finish the staging directory, then swap it in (atomic_io.replace_directory: old
    aside, new in, old restored if that fails)."""
    for final, staged in moves.items():
        fs.move(join(staging, staged), join(staging, final))
    _write_file(fs, join(staging, MANIFEST_NAME), manifest.to_json_bytes())
    fs.create_dir(root.rstrip("/").rpartition("/")[0], recursive=True)
    replace_directory(staging, root)


def _publish_manifest_last(fs: pafs.FileSystem, staging: str, root: str, manifest: DatasetManifest,
                           moves: dict[str, str]) -> None:
    """Object stores: new shards beside the old ones, then the manifest, then drop unlisted shards."""
    for split in SPLITS:
        fs.create_dir(join(root, split), recursive=True)
    for final, staged in moves.items():
        fs.copy_file(join(staging, staged), join(root, final))
    _write_file(fs, join(root, MANIFEST_NAME), manifest.to_json_bytes())
    for split in SPLITS:
        listed = {join(root, shard.path) for shard in manifest.shards[split]}
        for info in fs.get_file_info(pafs.FileSelector(join(root, split))):
            if info.path not in listed:
                fs.delete_file(info.path)


def _write_file(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def summary_rows(result: PrepareResult) -> list[dict[str, str]]:
    """The run's summary as (item, value) rows, shared by the CLI and the Prefect artifact."""
    m = result.manifest
    rows = {
        "dataset": result.uri,
        "fingerprint": m.fingerprint,
        "status": "reused (up to date)" if result.reused else "written",
        "source": f"{m.source.kind}: {m.source.location}",
        "image shape (H, W, C)": "x".join(str(v) for v in m.image_shape),
        "classes": "none" if m.label_names is None else f"{len(m.label_names)}",
        **{f"{split} rows": str(n) for split, n in m.counts.items()},
        "mean / std (per channel, [0, 1])": f"{m.mean} / {m.std}",
        "skipped": str(len(m.skipped)),
    }
    rows.update({f"skipped: {item.name}": item.reason for item in m.skipped[:20]})
    return [{"item": k, "value": v} for k, v in rows.items()]
