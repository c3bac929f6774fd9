"""The Ray Data pipeline of a training worker (ray_data.stream_batches) on a real local Ray: it
yields exactly the rows that data_order assigns, decoded, in order, across segments (one Ray Data
execution each), also when started inside a window (a resumed run)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.adapters.ray_data import decode_batch, row_group_rows, stream_batches
from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.prepare import prepare
from diffusion_core.data.readers import read_split_table
from diffusion_core.data_order import stream_row_indices
from diffusion_core.training import TrainConfig, training_windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("digits") / "prepared")
    # Small row groups, so that windows span several chunks of several row groups.
    prepare(PrepareConfig(source="digits", output=out, rows_per_row_group=256, rows_per_shard=1024))
    return out


@pytest.mark.parametrize(("rank", "world", "start_step"), [(0, 1, 0), (1, 2, 37)])
def test_stream_yields_the_planned_rows_in_order(ray_local, digits: str, rank: int, world: int,
                                                  start_step: int) -> None:
    config = TrainConfig(dataset=digits, steps=60, warmup_steps=5, batch_size=64, num_workers=world,
                         shuffle_window_mib=0.02)  # 20 KiB: windows of about 250 rows of 64 bytes
    table, manifest = read_split_table(digits, "train")
    images, labels = decode_batch({c: table.column(c).to_numpy(zero_copy_only=False)
                                   for c in ("image", "label")}, manifest)
    row_groups = row_group_rows(digits, "train")
    assert len(row_groups) == 2 and len(row_groups[0]) == 4  # 1,600 rows in 2 files of 256-row groups
    windows = training_windows(config, math.prod(manifest.image_shape), row_groups, rank, world, start_step)
    assert len(windows) > 3 and any(len(w.chunks) > 1 for w in windows)
    expected = stream_row_indices(windows)
    b = config.per_worker_batch_size
    count = 0
    # Segments of about 3 windows: several Ray Data executions, batches spanning them.
    stream = stream_batches(digits, "train", windows, manifest, batch_size=b, segment_bytes=60_000)
    for i, (x, y) in enumerate(stream):
        rows = torch.from_numpy(expected[i * b : (i + 1) * b])
        assert torch.equal(x, images[rows]) and torch.equal(y, labels[rows]), f"batch {i}"
        count += 1
    assert count == math.ceil(len(expected) / b) and count >= config.steps - start_step
