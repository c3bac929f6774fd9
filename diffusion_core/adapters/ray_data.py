"""Ray Data reader of a prepared dataset, and the batch decoder the training loop calls.

    ds = read_split(uri, "train")                    # ray.data.Dataset of image/label/key rows
    for batch in shard.iter_batches(batch_size=64, batch_format="numpy"):
        images, labels = decode_batch(batch, manifest)   # (B, C, H, W) float32 in [-1, 1], (B,) int64

Only the shard files the manifest lists are read, so a directory that is not a complete prepared
dataset (no manifest) is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.data
import torch

from diffusion_core.data.manifest import DatasetManifest, read_manifest_from, resolve_uri, shard_uris
from diffusion_core.data.readers import decode_images


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
