"""Datasets: sources, Parquet preparation with a manifest, and readers.

    from diffusion_core.data.prepare import prepare
    prepare(PrepareConfig(source="digits", output="data/digits"))       # -> PrepareResult
    manifest = read_manifest("data/digits")                               # DatasetManifest
    images, labels = load_split("data/digits", "val")                     # (N, C, H, W) in [-1, 1]
    PreparedImageDataset("data/digits", "train")                          # torch Dataset

(`prepare` is not re-exported here: the name would shadow the submodule diffusion_core.data.prepare.)
Ray Data readers live in diffusion_core.adapters.ray_data (read_split, decode_batch).
"""

from diffusion_core.data.config import PrepareConfig, PrepareParameters
from diffusion_core.data.manifest import DatasetManifest, read_manifest
from diffusion_core.data.prepare import PrepareResult
from diffusion_core.data.readers import (
    PreparedImageDataset,
    decode_images,
    iter_split_batches,
    load_split,
    read_examples,
)

__all__ = [
    "DatasetManifest",
    "PrepareConfig",
    "PrepareParameters",
    "PrepareResult",
    "PreparedImageDataset",
    "decode_images",
    "iter_split_batches",
    "load_split",
    "read_examples",
    "read_manifest",
]
