"""Reading a prepared dataset back: decoding to float32 (N, C, H, W) in [-1, 1], and a torch Dataset.

Decoding maps the stored uint8 value v to x = v / 127.5 - 1, so 0 -> -1 and 255 -> 1 exactly and
v = round((x + 1) * 127.5) recovers the stored pixels. The same `decode_images` serves the torch
Dataset here and the Ray Data batches (diffusion_core.adapters.ray_data).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from diffusion_core.data.manifest import DatasetManifest, read_manifest_from, resolve_uri, shard_uris
from diffusion_core.errors import DatasetError


def decode_images(images: Sequence[bytes] | np.ndarray, manifest: DatasetManifest) -> np.ndarray:
    """Raw uint8 HWC byte strings (B,) -> float32 (B, C, H, W) in [-1, 1]."""
    h, w, c = manifest.image_shape
    raw = np.frombuffer(b"".join(images), dtype=np.uint8) if len(images) else np.zeros(0, np.uint8)
    if raw.size != len(images) * h * w * c:
        raise DatasetError(f"image bytes do not match the manifest's shape (H, W, C) = {(h, w, c)}")
    hwc = raw.reshape(len(images), h, w, c)
    return hwc.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def read_split_table(uri: str, split: str) -> tuple[pa.Table, DatasetManifest]:
    """The whole split as one Arrow table (image, label, key) and the manifest; for small splits."""
    fs, root = resolve_uri(uri)
    manifest = read_manifest_from(fs, root, uri)
    tables = [pq.read_table(path, filesystem=fs) for path in shard_uris(fs, root, manifest, split)]
    table = pa.concat_tables(tables)
    if table.num_rows != manifest.counts[split]:
        raise DatasetError(f"{uri!r}: split {split!r} has {table.num_rows} rows but the manifest "
                           f"says {manifest.counts[split]}")
    return table, manifest


def iter_split_batches(uri: str, split: str = "val", batch_size: int = 256,
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream a split as (images float32 (B, C, H, W) in [-1, 1], labels int64 (B,)) batches."""
    fs, root = resolve_uri(uri)
    manifest = read_manifest_from(fs, root, uri)
    for path in shard_uris(fs, root, manifest, split):
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["image", "label"]):
                yield _decode_columns(batch.column(0), batch.column(1), manifest)


def read_examples(uri: str, count: int = 64, split: str = "train") -> np.ndarray:
    """The first `count` stored images of a split as uint8 (N, H, W, C), for previews."""
    fs, root = resolve_uri(uri)
    manifest = read_manifest_from(fs, root, uri)
    found: list[bytes] = []
    for path in shard_uris(fs, root, manifest, split):
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=count, columns=["image"]):
                found.extend(batch.column(0).to_pylist()[: count - len(found)])
                if len(found) == count:
                    break
        if len(found) == count:
            break
    h, w, c = manifest.image_shape
    return np.frombuffer(b"".join(found), dtype=np.uint8).reshape(len(found), h, w, c)


def load_split(uri: str, split: str = "val", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole (small) split in memory: images float32 (N, C, H, W) in [-1, 1], labels int64 (N,).

    `limit` keeps the first rows only (in stored order).
    """
    table, manifest = read_split_table(uri, split)
    if limit is not None:
        table = table.slice(0, limit)
    return _decode_columns(table.column("image"), table.column("label"), manifest)


def _decode_columns(images: pa.Array | pa.ChunkedArray, labels: pa.Array | pa.ChunkedArray,
                    manifest: DatasetManifest) -> tuple[torch.Tensor, torch.Tensor]:
    decoded = decode_images(images.to_pylist(), manifest)
    return torch.from_numpy(decoded), torch.from_numpy(labels.to_numpy().astype(np.int64))


class PreparedImageDataset(Dataset):
    """Map-style torch Dataset over one split, for single-process use.

    Holds the split's stored uint8 bytes in memory (a quarter of the float size) and decodes one item
    per access: item i -> (image float32 (C, H, W) in [-1, 1], label int64 scalar; -1 = no label).
    Large splits are better streamed through Ray Data (diffusion_core.adapters.ray_data).
    """

    def __init__(self, uri: str, split: str = "train") -> None:
        table, self.manifest = read_split_table(uri, split)
        self.uri, self.split = uri, split
        self._images = table.column("image")
        self._labels = table.column("label").to_numpy().astype(np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        image = decode_images([self._images[index].as_py()], self.manifest)[0]
        return torch.from_numpy(image), torch.tensor(self._labels[index], dtype=torch.int64)
