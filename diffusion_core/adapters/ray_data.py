"""Ray Data readers of a prepared dataset: whole splits, and the training workers' window streams.

    ds = read_split(uri, "train")                    # ray.data.Dataset of image/label/key rows
    for batch in shard.iter_batches(batch_size=64, batch_format="numpy"):
        images, labels = decode_batch(batch, manifest)   # (B, C, H, W) float32 in [-1, 1], (B,) int64

    windows = data_order.worker_windows(...)
    for images, labels in stream_batches(uri, "train", windows, manifest, batch_size=64):
        ...                                          # the rows of the windows, in order

`stream_batches` reads the windows with Ray Data: one read task per window (the window's chunks,
read from their Parquet row groups and permuted), in window order (preserve_order). The windows
are cut into segments of about SEGMENT_BYTES of stored rows, one Ray Data execution each; the next
segment's execution starts while the current one is consumed, so at most two segments of stored
uint8 bytes (a quarter of the decoded float size) are in flight, whatever the dataset's size.
Batches are cut from the stream and decoded on the consumer's side.

Why segments rather than one execution with a memory budget: Ray Data's scheduling loop polls
without pause while backpressure holds back its next task and no task is running (Ray 2.60,
StreamingExecutor), and a training worker consumes far slower than the reads produce, so a
throttled execution would spin for the whole run in the worker's own process (a CPU core, and the
GIL the training loop needs). An execution bounded by its input finishes and stops instead.

Only the shard files the manifest lists are read, so a directory that is not a complete prepared
dataset (no manifest) is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
import torch

from diffusion_core.data.manifest import DatasetManifest, read_manifest_from, resolve_uri, shard_uris
from diffusion_core.data.readers import decode_images
from diffusion_core.data_order import ROW_OVERHEAD_BYTES, Chunk, Window

# Stored bytes of rows one Ray Data execution reads (a segment; two may be in flight), and read
# tasks run at once.
SEGMENT_BYTES = 128 * 2**20
_READ_CONCURRENCY = 2
T = TypeVar("T")


def read_split(uri: str, split: str = "train", **read_parquet_kwargs: Any) -> ray.data.Dataset:
    """A Ray Dataset over one split's shards (columns image, label, key); extra kwargs go to
    ray.data.read_parquet (e.g. override_num_blocks)."""
    dataset, _ = read_split_with_manifest(uri, split, **read_parquet_kwargs)
    return dataset


def read_split_with_manifest(uri: str, split: str = "train", **read_parquet_kwargs: Any,
                             ) -> tuple[ray.data.Dataset, DatasetManifest]:
    fs, root = resolve_uri(uri)
    manifest = read_manifest_from(fs, root, uri)
    paths = shard_uris(fs, root, manifest, split)
    return ray.data.read_parquet(paths, filesystem=fs, **read_parquet_kwargs), manifest


def decode_batch(batch: dict[str, np.ndarray],
                 manifest: DatasetManifest) -> tuple[torch.Tensor, torch.Tensor]:
    """A numpy batch from Ray Data -> (images float32 (B, C, H, W) in [-1, 1], labels int64 (B,))."""
    images = decode_images(list(batch["image"]), manifest)
    labels = np.array(batch["label"], dtype=np.int64)  # a writable copy for torch
    return torch.from_numpy(images), torch.from_numpy(labels)


def row_group_rows(uri: str, split: str) -> list[list[int]]:
    """Rows of each row group of each shard of `split` (shards in manifest order), from the Parquet
    footers only."""
    fs, root = resolve_uri(uri)
    manifest = read_manifest_from(fs, root, uri)
    sizes = []
    for path in shard_uris(fs, root, manifest, split):
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            sizes.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    return sizes


def window_dataset(uri: str, split: str, windows: Sequence[Window]) -> ray.data.Dataset:
    """A Ray Dataset whose rows (image, label) are those of `windows`, in order, one block per
    window."""
    fs, root = resolve_uri(uri)
    manifest = read_manifest_from(fs, root, uri)
    paths = shard_uris(fs, root, manifest, split)
    items = [{"window": json.dumps(dataclasses.asdict(w))} for w in windows]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_windows, batch_size=1, batch_format="numpy", fn_kwargs={"fs": fs, "paths": paths},
        compute=ray.data.TaskPoolStrategy(size=min(_READ_CONCURRENCY, len(items))),
    )
    ds.context.execution_options.preserve_order = True
    return ds


def _read_windows(batch: dict[str, np.ndarray], fs: pafs.FileSystem, paths: list[str]) -> pa.Table:
    tables = [_read_window(_window_from_json(text), fs, paths) for text in batch["window"]]
    return pa.concat_tables(tables)


def _window_from_json(text: str) -> Window:
    raw = json.loads(text)
    return Window(**{**raw, "chunks": tuple(Chunk(**c) for c in raw["chunks"])})


def _read_window(window: Window, fs: pafs.FileSystem, paths: list[str]) -> pa.Table:
    """The window's rows: its chunks' rows in chunk order, then permuted (Window.permutation)."""
    groups: dict[tuple[int, int], pa.Table] = {}
    parts = []
    for chunk in window.chunks:
        key = (chunk.file, chunk.row_group)
        if key not in groups:
            with fs.open_input_file(paths[chunk.file]) as f:
                groups[key] = pq.ParquetFile(f).read_row_group(chunk.row_group, columns=["image", "label"])
        parts.append(groups[key].slice(chunk.start, chunk.num_rows))
    return pa.concat_tables(parts).take(pa.array(window.permutation()))


def segments(windows: Sequence[Window], row_bytes: int,
             segment_bytes: float = SEGMENT_BYTES) -> list[list[Window]]:
    """Consecutive groups of windows of at most `segment_bytes` of rows read (one window at least)."""
    out: list[list[Window]] = []
    size = 0.0
    for window in windows:
        bytes_read = window.rows_read * row_bytes
        if not out or size + bytes_read > segment_bytes:
            out.append([])
            size = 0.0
        out[-1].append(window)
        size += bytes_read
    return out


def rebatch(blocks: Iterable[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive batches of `batch_size` rows from a stream of column blocks (the last batch may be
    shorter); only a batch that spans two blocks is copied."""
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0
    for block in blocks:
        start, rows = 0, len(next(iter(block.values())))
        if pending:  # complete the batch begun in earlier blocks
            take = min(batch_size - pending_rows, rows)
            pending.append({k: v[:take] for k, v in block.items()})
            pending_rows, start = pending_rows + take, take
            if pending_rows < batch_size:
                continue
            yield {k: np.concatenate([p[k] for p in pending]) for k in block}
            pending, pending_rows = [], 0
        while rows - start >= batch_size:
            yield {k: v[start : start + batch_size] for k, v in block.items()}
            start += batch_size
        if start < rows:
            pending, pending_rows = [{k: v[start:] for k, v in block.items()}], rows - start
    if pending:
        yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}


def _chain_started_ahead(iterables: Iterator[Iterable[T]]) -> Iterator[T]:
    """The items of each iterable in turn. While one is consumed, the first item of the next is
    fetched in a background thread, so that the next segment's start-up (scheduling its read tasks,
    reading its first window) overlaps with the consumption of the current one."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="next-segment")
    started: list[Iterator[T]] = []
    try:
        ahead: tuple[Iterator[T], Future] | None = None
        for iterable in iterables:
            upcoming = iter(iterable)
            started.append(upcoming)
            upcoming_first = pool.submit(next, upcoming, _END)
            if ahead is not None:
                yield from _drain(*ahead)
            ahead = (upcoming, upcoming_first)
        if ahead is not None:
            yield from _drain(*ahead)
    finally:
        pool.shutdown(wait=True)  # no generator may be running when it is closed
        for iterator in started:  # stops executions that a consumer leaving early left running
            close = getattr(iterator, "close", None)
            if close is not None:
                close()


_END = object()


def _drain(iterator: Iterator[T], first: Future) -> Iterator[T]:
    item = first.result()
    if item is _END:
        return
    yield item
    yield from iterator


def stream_batches(uri: str, split: str, windows: Sequence[Window], manifest: DatasetManifest, *,
                   batch_size: int, device: torch.device | str = "cpu",
                   segment_bytes: float = SEGMENT_BYTES) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches of `batch_size` rows of `windows` (the last may be shorter), decoded to
    (images float32 (B, C, H, W) in [-1, 1], labels int64 (B,)) on `device`."""
    row_bytes = math.prod(manifest.image_shape) + ROW_OVERHEAD_BYTES
    executions = (window_dataset(uri, split, segment).iter_batches(batch_size=None, batch_format="numpy")
                  for segment in segments(windows, row_bytes, segment_bytes))
    for batch in rebatch(_chain_started_ahead(executions), batch_size):
        images, labels = decode_batch(batch, manifest)
        yield images.to(device), labels.to(device)
