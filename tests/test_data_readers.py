"""Both readers give back exactly the stored pixels (as x = v / 127.5 - 1) and labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.manifest import read_manifest
from diffusion_core.data.prepare import prepare
from diffusion_core.data.readers import PreparedImageDataset, iter_split_batches, load_split, read_examples

N, SIZE = 60, 6


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, size=(N, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, size=N)
    np.savez(tmp_path / "src.npz", images=images, labels=labels)
    out = str(tmp_path / "ds")
    prepare(PrepareConfig(source=str(tmp_path / "src.npz"), output=out, size=SIZE, channels=3,
                          val_fraction=0.3, rows_per_row_group=8, rows_per_shard=16))
    return out, images, labels


def expected_model_space(images: np.ndarray) -> np.ndarray:
    """Independent statement of the contract: CHW float32, 0 -> -1, 255 -> +1, linear between."""
    return (images.astype(np.float64) * (2.0 / 255.0) - 1.0).transpose(0, 3, 1, 2)


def match(got_x: np.ndarray, got_labels: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
    expected = {img.tobytes(): (x, int(lab)) for img, x, lab in
                zip(images, expected_model_space(images), labels, strict=True)}
    assert got_x.dtype == np.float32 and got_x.shape[1:] == (3, SIZE, SIZE)
    as_uint8 = np.rint((got_x.astype(np.float64) + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    for x, u8, label in zip(got_x, as_uint8, got_labels, strict=True):
        want_x, want_label = expected[u8.tobytes()]
        np.testing.assert_allclose(x, want_x, atol=1e-6)
        assert label == want_label


def test_torch_dataset_round_trip(dataset: tuple[str, np.ndarray, np.ndarray]) -> None:
    out, images, labels = dataset
    items = [item for split in ("train", "val") for item in PreparedImageDataset(out, split)]
    assert len(items) == N
    x = torch.stack([item[0] for item in items]).numpy()
    y = torch.stack([item[1] for item in items]).numpy()
    assert y.dtype == np.int64
    match(x, y, images, labels)
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_load_split_and_batches_agree(dataset: tuple[str, np.ndarray, np.ndarray]) -> None:
    out = dataset[0]
    whole_x, whole_y = load_split(out, "train")
    batches = list(iter_split_batches(out, "train", batch_size=5))
    assert torch.equal(torch.cat([b[0] for b in batches]), whole_x)
    assert torch.equal(torch.cat([b[1] for b in batches]), whole_y)
    assert len(whole_y) == read_manifest(out).counts["train"]
    assert read_examples(out, 4).shape == (4, SIZE, SIZE, 3)


@pytest.mark.slow
def test_ray_data_round_trip(ray_local, dataset: tuple[str, np.ndarray, np.ndarray]) -> None:
    from diffusion_core.adapters.ray_data import decode_batch, read_split

    out, images, labels = dataset
    manifest = read_manifest(out)
    xs, ys = [], []
    for split in ("train", "val"):
        for batch in read_split(out, split).iter_batches(batch_size=7, batch_format="numpy"):
            x, y = decode_batch(batch, manifest)
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            xs.append(x.numpy())
            ys.append(y.numpy())
    got_x = np.concatenate(xs)
    assert len(got_x) == N
    match(got_x, np.concatenate(ys), images, labels)
