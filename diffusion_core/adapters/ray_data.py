"""Ray Data readers of a prepared dataset: whole splits, and the training workers' window streams.

    ds = read_split(uri, "train")                    # ray.data.Dataset of image/label/key rows
    for batch in shard.iter_batches(batch_size=64, batch_format="numpy"):
        images, labels = decode_batch(batch, manifest)   # (B, C, H, W) float32 in [-1, 1], (B,) int64

    windows = data_order.worker_windows(split_chunks(...), ...)
    for images, labels in stream_batches(uri, "train", windows, manifest, batch_size=64):
        ...                                          # the rows of the windows, in order

`stream_batches` is a Ray Data pipeline: one read task per window (the window's chunks, read from
their Parquet row groups and permuted), in window order (preserve_order), consumed by
`iter_torch_batches` with a bounded prefetch and decoded on the consumer's side. Stored uint8 bytes
travel through the object store, a quarter of the decoded float size; Ray Data's budget for this
pipeline is a few windows, so memory does not grow with the dataset.

Only the shard files the manifest lists are read, so a directory that is not a complete prepared
dataset (no manifest) is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from diffusion_core.data.manifest import DatasetManifest, read_manifest_from, resolve_uri, shard_uris
from diffusion_core.data.readers import decode_images
from diffusion_core.data_order import ROW_OVERHEAD_BYTES, Chunk, Window

# Windows that the pipeline may hold at once: being read, queued, and being consumed.
_WINDOWS_IN_FLIGHT = 4
_READ_CONCURRENCY = 2


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
    """A Ray Dataset whose rows (image, label) are those of `windows`, in order. Ray Data may hold
    _WINDOWS_IN_FLIGHT of the largest window in its object store budget."""
    fs, root = resolve_uri(uri)
    manifest = read_manifest_from(fs, root, uri)
    paths = shard_uris(fs, root, manifest, split)
    row_bytes = math.prod(manifest.image_shape) + ROW_OVERHEAD_BYTES
    window_bytes = max(w.rows_read for w in windows) * row_bytes
    items = [{"window": json.dumps(dataclasses.asdict(w))} for w in windows]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_windows, batch_size=1, batch_format="numpy", fn_kwargs={"fs": fs, "paths": paths},
        compute=ray.data.TaskPoolStrategy(size=_READ_CONCURRENCY),
    )
    options = ds.context.execution_options
    options.preserve_order = True
    options.resource_limits = options.resource_limits.copy(
        object_store_memory=_WINDOWS_IN_FLIGHT * window_bytes)
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


class _DecodeBatch(NumpyBatchCollateFn):
    """Stored bytes -> {"image": float32 (B, C, H, W) in [-1, 1], "label": int64 (B,)}."""

    def __init__(self, manifest: DatasetManifest) -> None:
        self.manifest = manifest

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        images, labels = decode_batch(batch, self.manifest)
        return {"image": images, "label": labels}


def stream_batches(uri: str, split: str, windows: Sequence[Window], manifest: DatasetManifest, *,
                   batch_size: int, prefetch_batches: int = 2,
                   device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches of `batch_size` rows of `windows` (the last may be shorter), decoded to
    (images float32 (B, C, H, W) in [-1, 1], labels int64 (B,)) on `device`."""
    if not windows:
        return
    ds = window_dataset(uri, split, windows)
    for batch in ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=prefetch_batches,
                                       collate_fn=_DecodeBatch(manifest), device=device):
        yield batch["image"], batch["label"]
