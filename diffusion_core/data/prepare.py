"""Prepare a dataset: stream a source into versioned, sharded Parquet plus a manifest, atomically.

Every sample is conformed (see `transforms`), keyed by a content hash, routed to train or val by
that hash, and appended to the split's current row group; nothing else is kept in memory, so peak
memory is bounded by one row group per split whatever the source's size. The fingerprint, the
per-channel statistics and the per-class counts are computed on the fly.

Split rule: row -> val  iff  int(key[:16], 16) / 2^64 < val_fraction. It depends on the row alone,
so adding images never moves existing ones between splits (for fixed size / channels).

Unusable items (corrupt or refused files, rows with bad labels) are skipped and listed; when they
are more than max_unreadable_share of the source, the preparation fails with the list instead of
publishing a dataset made of the rest (it fails as soon as that is certain).

Atomicity and concurrency: see `publish` (a directory swap on local filesystems; on object stores a
version folder per preparation with the manifest as the only pointer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

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
from diffusion_core.data.publish import Publisher, is_dataset_folder_entry, publisher_for
from diffusion_core.data.sources import ImageSource, Sample, Skipped, open_source
from diffusion_core.errors import DatasetError

logger = logging.getLogger(__name__)

KEY_HEX_CHARS = 32  # 128 bits: collisions are out of reach for any dataset size
Progress = Callable[[int], None]  # called with the number of source items consumed so far
ROW_GROUP_MAX_BYTES = 128 << 20  # pixels of one row group, the most a split writer holds
MAX_LISTED_SKIPS = 1000  # the manifest lists this many skipped items (and counts them all)
_LOGGED_SKIPS = 20
_ERROR_LISTS = 20
_LOG_EVERY_S = 10.0


class PrepareResult(BaseModel):
    """What a preparation produced; `reused` is True when an identical dataset was already there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    manifest: DatasetManifest
    reused: bool


def prepare(config: PrepareConfig, *, progress: Progress | None = None, force: bool = False,
            filesystem: pafs.FileSystem | None = None) -> PrepareResult:
    """Prepare `config.source` into `config.output`; skip the work when it is already up to date.

    Up to date means: the output's manifest has the same source identity (fingerprint and its kind)
    and the same content parameters. `force` rebuilds regardless (the result is still published
    atomically). With `filesystem` (e.g. an S3FileSystem configured with credentials and an
    endpoint), `config.output` is a path inside it rather than a URI.
    """
    params = config.parameters()
    source = open_source(config.source, params)
    fs, root = (filesystem, config.output) if filesystem is not None else resolve_uri(config.output)
    existing = _existing_manifest(fs, root, config.output)
    source_info = SourceInfo(kind=source.kind, location=source.location, fingerprint=source.fingerprint(),
                             fingerprint_kind=source.fingerprint_kind)
    if not force and existing is not None and _up_to_date(existing, source_info, params):
        logger.info("%s is up to date (fingerprint %s); nothing to do", config.output, existing.fingerprint)
        return PrepareResult(uri=config.output, manifest=existing, reused=True)
    manifest = _build_and_publish(source, source_info, params, fs, root, existing, progress)
    return PrepareResult(uri=config.output, manifest=manifest, reused=manifest == existing)


def _up_to_date(existing: DatasetManifest, source_info: SourceInfo, params: PrepareParameters) -> bool:
    return (existing.source == source_info
            and existing.parameters.content_parameters() == params.content_parameters())


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
    """Canonical JSON of the content parameters (sorted keys, no spaces): the fingerprint's prefix."""
    return json.dumps(params.content_parameters(), sort_keys=True, separators=(",", ":")).encode()


# ---- building -----------------------------------------------------------------------------------


def _existing_manifest(fs: pafs.FileSystem, root: str, uri: str) -> DatasetManifest | None:
    """The manifest already at the output; refuses to write into a non-empty directory that holds
    neither a dataset nor what a stopped preparation leaves (see publish.is_dataset_folder_entry)."""
    if fs.get_file_info(join(root, MANIFEST_NAME)).type != pafs.FileType.NotFound:
        return read_manifest_from(fs, root, uri)
    info = fs.get_file_info(root)
    foreign = info.type == pafs.FileType.File or (
        info.type == pafs.FileType.Directory
        and any(not is_dataset_folder_entry(entry.base_name)
                for entry in fs.get_file_info(pafs.FileSelector(root)))
    )
    if foreign:
        raise DatasetError(f"output {uri!r} exists and is not a prepared dataset; refusing to replace it",
                           hint="choose an empty or new output directory")
    return None


def _build_and_publish(source: ImageSource, source_info: SourceInfo, params: PrepareParameters,
                       fs: pafs.FileSystem, root: str, existing: DatasetManifest | None,
                       progress: Progress | None) -> DatasetManifest:
    publisher = publisher_for(fs, root)
    try:
        manifest = _write_shards(source, source_info, params, fs, publisher, progress)
        if existing is not None and existing.same_dataset(manifest):
            logger.info("rebuilt dataset is identical to the existing one (%s)", manifest.fingerprint)
            publisher.discard()
            return existing
        publisher.publish(manifest, existing)
    except BaseException:
        publisher.discard()
        raise
    logger.info("published dataset %s: %s", manifest.fingerprint, manifest.counts)
    return manifest


def _write_shards(source: ImageSource, source_info: SourceInfo, params: PrepareParameters,
                  fs: pafs.FileSystem, publisher: Publisher, progress: Progress | None) -> DatasetManifest:
    """Stream every sample into the publisher's shards; the manifest that lists them."""
    tally = _Tally(params)
    writers = {split: _SplitWriter(fs, publisher, split, params) for split in SPLITS}
    writers["train"].stats = tally.channel_stats  # statistics describe the training data
    total = source.count_hint()
    for sample in _with_progress(source, params, progress):
        if isinstance(sample, Skipped):
            tally.skip(sample)
            tally.fail_when_too_many_certain(total, source)
            continue
        key = row_key(sample.pixels, sample.label)
        split = split_of(key, params.val_fraction)
        writers[split].add(sample, key)
        tally.add(key, sample.label, split)
    shards = {split: writers[split].close() for split in SPLITS}
    tally.check_usable(source)
    return tally.manifest(source, source_info, shards)


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
    """Running fingerprint, counts, class counts, label range, statistics and skip list of one
    preparation (the skip list keeps the first MAX_LISTED_SKIPS items; skipped_count counts all)."""

    params: PrepareParameters
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    class_counts: list[int] = field(default_factory=list)  # train rows per label; labels < max_classes
    skipped: list[SkippedItem] = field(default_factory=list)
    skipped_count: int = 0
    max_label: int = -1

    def __post_init__(self) -> None:
        self.digest = hashlib.sha256(parameters_json(self.params))
        self.channel_stats = _ChannelStats(self.params.channels)

    def add(self, key: str, label: int, split: str) -> None:
        self.digest.update(key.encode())
        self.counts[split] += 1
        self.max_label = max(self.max_label, label)
        if split == "train" and label >= 0:
            if label >= len(self.class_counts):
                self.class_counts.extend([0] * (label + 1 - len(self.class_counts)))
            self.class_counts[label] += 1

    def skip(self, item: Skipped) -> None:
        self.skipped_count += 1
        if self.skipped_count <= _LOGGED_SKIPS:
            logger.warning("skipping %s: %s", item.name, item.reason)
        elif self.skipped_count == _LOGGED_SKIPS + 1:
            logger.warning("skipping more items; the manifest lists the first %d", MAX_LISTED_SKIPS)
        if len(self.skipped) < MAX_LISTED_SKIPS:
            self.skipped.append(SkippedItem(name=item.name, reason=item.reason))

    def fail_when_too_many_certain(self, total: int | None, source: ImageSource) -> None:
        """Stop early once the skips exceed the allowed share of everything the source will yield."""
        if total is not None and self.skipped_count > self.params.max_unreadable_share * total:
            raise self._too_many(total, source, early=True)

    def check_usable(self, source: ImageSource) -> None:
        rows = sum(self.counts.values())
        if rows == 0:
            first = ""
            if self.skipped:
                first = f"; first problem: {self.skipped[0].name}: {self.skipped[0].reason}"
            raise DatasetError(f"source {source.location!r} yielded no images "
                               f"({self.skipped_count} skipped){first}")
        if self.skipped_count > self.params.max_unreadable_share * (rows + self.skipped_count):
            raise self._too_many(rows + self.skipped_count, source, early=False)
        if self.counts["train"] == 0:
            raise DatasetError(f"val_fraction={self.params.val_fraction} left no rows for training "
                               f"({self.counts['val']} rows, all in val)", hint="lower val_fraction")

    def _too_many(self, total: int, source: ImageSource, early: bool) -> DatasetError:
        shown = self.skipped[:_ERROR_LISTS]
        listing = "".join(f"\n  {item.name}: {item.reason}" for item in shown)
        more = self.skipped_count - len(shown)
        at_least = "at least " if early else ""
        return DatasetError(
            f"source {source.location!r}: {at_least}{self.skipped_count} of {total} items cannot be used, "
            f"more than max_unreadable_share ({self.params.max_unreadable_share:g}); nothing was "
            f"published:{listing}" + (f"\n  ... and {more} more" if more > 0 else ""),
            hint="fix or remove these files, or raise max_unreadable_share")

    def manifest(self, source: ImageSource, source_info: SourceInfo,
                 shards: dict[str, list[ShardFile]]) -> DatasetManifest:
        size, channels = self.params.size, self.params.channels
        mean, std = self.channel_stats.result()
        names = self._label_names(source)
        return DatasetManifest(
            fingerprint=self.digest.hexdigest(), image_size=size, channels=channels,
            image_shape=(size, size, channels), label_names=names, class_counts=self._aligned_counts(names),
            counts=self.counts, mean=mean, std=std, parameters=self.params, source=source_info,
            shards=shards, skipped=self.skipped, skipped_count=self.skipped_count,
        )

    def _label_names(self, source: ImageSource) -> list[str] | None:
        if not source.has_labels:
            return None
        return source.label_names() or [str(i) for i in range(self.max_label + 1)]

    def _aligned_counts(self, names: list[str] | None) -> list[int] | None:
        if names is None:
            return None
        return self.class_counts + [0] * (len(names) - len(self.class_counts))


def rows_per_row_group(params: PrepareParameters) -> int:
    """rows_per_row_group, lowered so that one row group of pixels stays within ROW_GROUP_MAX_BYTES."""
    row_bytes = params.size * params.size * params.channels
    return min(params.rows_per_row_group, max(1, ROW_GROUP_MAX_BYTES // row_bytes))


class _SplitWriter:
    """Appends rows to one split's shards, a row group at a time (the only pixels held in memory)."""

    def __init__(self, fs: pafs.FileSystem, publisher: Publisher, split: str,
                 params: PrepareParameters) -> None:
        self.fs, self.publisher, self.split, self.params = fs, publisher, split, params
        self.rows_per_group = rows_per_row_group(params)
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
        if len(self.images) >= min(self.rows_per_group, self.params.rows_per_shard - self.rows_in_shard):
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
        rel = f"{self.publisher.shard_prefix}{self.split}/part-{len(self.shards):05d}.parquet"
        self.fs.create_dir(join(self.publisher.write_dir, rel.rpartition("/")[0]), recursive=True)
        sink = self.fs.open_output_stream(join(self.publisher.write_dir, rel))
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


def summary_rows(result: PrepareResult) -> list[dict[str, str]]:
    """The run's summary as (item, value) rows, shared by the CLI and the Prefect artifact."""
    m = result.manifest
    rows = {
        "dataset": result.uri,
        "fingerprint": m.fingerprint,
        "status": "reused (up to date)" if result.reused else "written",
        "source": f"{m.source.kind}: {m.source.location}",
        "source fingerprint": f"{m.source.fingerprint_kind or 'unrecorded'}: {m.source.fingerprint[:16]}",
        "image shape (H, W, C)": "x".join(str(v) for v in m.image_shape),
        "classes": "none" if m.label_names is None else f"{len(m.label_names)}",
        **{f"{split} rows": str(n) for split, n in m.counts.items()},
        "mean / std (per channel, [0, 1])": f"{m.mean} / {m.std}",
        "skipped": str(m.skipped_count),
    }
    if m.class_counts is not None:
        pairs = list(zip(m.label_names or [], m.class_counts, strict=True))
        shown = ", ".join(f"{name}: {n}" for name, n in pairs[:20])
        rows["train rows per class"] = shown + (f", ... ({len(pairs)} classes)" if len(pairs) > 20 else "")
    rows.update({f"skipped: {item.name}": item.reason for item in m.skipped[:20]})
    return [{"item": k, "value": v} for k, v in rows.items()]
