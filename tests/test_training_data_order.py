"""The order in which training workers read rows (data_order): coverage, disjointness, bounded
windows, and the property that makes resuming exact: the stream from any row on is the tail of the
whole stream. Pure functions, no Ray (the Ray Data pipeline that reads these windows is tested in
test_training_stream.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusion_core.data_order import (
    CHUNKS_PER_WORKER,
    Window,
    chunk_rows_for,
    chunk_split,
    stream_row_indices,
    worker_windows,
)
from diffusion_core.errors import ConfigError
from diffusion_core.training import TrainConfig, training_windows

# Two shard files of 3 and 1 row groups: 1,000 + 1,000 + 700 + 300 = 3,000 rows.
ROW_GROUPS = [[1000, 1000, 700], [300]]
TOTAL = 3000


def windows(rank: int = 0, world: int = 1, start_row: int = 0, num_rows: int = 3 * TOTAL,
            chunk_rows: int = 250, window_rows: int = 600, seed: int = 7) -> list[Window]:
    chunks = chunk_split(ROW_GROUPS, chunk_rows)
    return worker_windows(chunks, seed=seed, rank=rank, world=world, window_rows=window_rows,
                          start_row=start_row, num_rows=num_rows)


def test_chunks_cover_every_row_once_within_row_groups() -> None:
    chunks = chunk_split(ROW_GROUPS, 400)
    rows = np.concatenate([np.arange(c.first_row, c.first_row + c.num_rows) for c in chunks])
    assert np.array_equal(np.sort(rows), np.arange(TOTAL)) and len(rows) == TOTAL
    assert all(0 < c.num_rows <= 400 and c.stop <= ROW_GROUPS[c.file][c.row_group] for c in chunks)
    assert [(c.file, c.row_group, c.start, c.stop) for c in chunks[:4]] == [
        (0, 0, 0, 400), (0, 0, 400, 800), (0, 0, 800, 1000), (0, 1, 0, 400)]
    assert chunks[-1].first_row == 2700  # file 1 starts after file 0's 2,700 rows


@pytest.mark.parametrize("world", [1, 3])
def test_each_pass_deals_every_row_to_exactly_one_worker(world: int) -> None:
    for pass_index in (0, 1):
        seen = [np.concatenate([w.row_indices() for w in windows(rank=k, world=world)
                                if w.pass_index == pass_index]) for k in range(world)]
        everything = np.concatenate(seen)
        assert len(everything) == TOTAL and np.array_equal(np.sort(everything), np.arange(TOTAL))
        sizes = [len(s) for s in seen]
        assert max(sizes) - min(sizes) <= 2 * 250  # chunks are dealt round robin


def test_passes_and_workers_read_in_different_seeded_orders() -> None:
    stream = stream_row_indices(windows())
    first, second = stream[:TOTAL], stream[TOTAL : 2 * TOTAL]
    assert not np.array_equal(first, second)
    assert np.array_equal(stream, stream_row_indices(windows()))  # a function of the seed
    assert not np.array_equal(stream, stream_row_indices(windows(seed=8)))
    # Rows are mixed within windows and chunks are permuted: no pass is close to the stored order.
    assert abs(np.corrcoef(first, np.arange(TOTAL))[0, 1]) < 0.9
    assert np.mean(np.abs(np.diff(first)) == 1) < 0.05


def test_windows_are_bounded_and_hold_whole_chunks() -> None:
    for w in windows():
        sizes = [c.num_rows for c in w.chunks]
        assert sum(sizes) <= 600 or len(sizes) == 1
    assert sorted(windows()[0].row_indices()) == sorted(
        np.concatenate([np.arange(c.first_row, c.first_row + c.num_rows) for c in windows()[0].chunks]))


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
@pytest.mark.parametrize("start_row", [0, 1, 599, 1234, 2 * TOTAL + 17])
def test_a_stream_started_at_any_row_is_the_tail_of_the_whole_stream(rank: int, world: int,
                                                                      start_row: int) -> None:
    whole = stream_row_indices(windows(rank, world, num_rows=4 * TOTAL))
    resumed = windows(rank, world, start_row=start_row, num_rows=4 * TOTAL - start_row)
    tail = stream_row_indices(resumed)
    assert len(tail) >= 4 * TOTAL - start_row
    assert np.array_equal(tail[: 4 * TOTAL - start_row], whole[start_row : 4 * TOTAL])
    assert resumed[0].skip < sum(c.num_rows for c in resumed[0].chunks)


def test_small_splits_are_cut_finer_so_every_worker_gets_chunks() -> None:
    assert chunk_rows_for(total_rows=1600, world=2, window_rows=10**6, row_group_rows=1024) == math.ceil(
        1600 / (CHUNKS_PER_WORKER * 2))
    assert chunk_rows_for(total_rows=10**6, world=2, window_rows=10**6, row_group_rows=1024) == 1024
    assert chunk_rows_for(total_rows=10**6, world=2, window_rows=300, row_group_rows=1024) == 300
    with pytest.raises(ConfigError, match="num_workers"):
        worker_windows(chunk_split([[2]], 1), seed=0, rank=2, world=3, window_rows=8, start_row=0, num_rows=8)


def test_training_windows_size_windows_by_bytes_and_cover_the_run() -> None:
    config = TrainConfig(dataset="d", steps=100, warmup_steps=10, batch_size=64, num_workers=2,
                         shuffle_window_mib=1.0)
    image_bytes = 32 * 32 * 3  # a window of 1 MiB holds about 340 such rows
    found = training_windows(config, image_bytes, [[1024] * 10], rank=1, world=2, start_step=40)
    assert all(sum(c.num_rows for c in w.chunks) <= 2**20 // image_bytes for w in found)
    assert sum(w.num_rows for w in found) >= (100 - 40) * 32
    whole = stream_row_indices(training_windows(config, image_bytes, [[1024] * 10], rank=1, world=2,
                                                start_step=0))
    assert np.array_equal(stream_row_indices(found)[: 60 * 32], whole[40 * 32 : 100 * 32])


def test_rebatch_cuts_consecutive_batches_across_blocks() -> None:
    from diffusion_core.adapters.ray_data import rebatch

    sizes = [5, 1, 7, 3, 0, 9]
    rows = np.arange(sum(sizes))
    blocks, start = [], 0
    for n in sizes:
        blocks.append({"a": rows[start : start + n], "b": -rows[start : start + n]})
        start += n
    batches = list(rebatch(iter(blocks), 4))
    assert [len(b["a"]) for b in batches] == [4] * 6 + [1]
    assert np.array_equal(np.concatenate([b["a"] for b in batches]), rows)
    assert all(np.array_equal(b["b"], -b["a"]) for b in batches)


def test_segments_bound_the_bytes_of_one_execution() -> None:
    from diffusion_core.adapters.ray_data import segments

    found = windows(window_rows=600)
    groups = segments(found, row_bytes=10, segment_bytes=2000)  # about 200 rows per segment
    assert [w for g in groups for w in g] == found
    assert all(sum(w.rows_read for w in g) * 10 <= 2000 or len(g) == 1 for g in groups)
    assert len(segments(found, row_bytes=10, segment_bytes=1e12)) == 1


def test_the_next_iterable_is_started_while_the_current_one_is_consumed() -> None:
    import threading

    from diffusion_core.adapters.ray_data import _chain_started_ahead

    started = [threading.Event() for _ in range(4)]

    def segment(k: int, n: int):
        started[k].set()
        yield from range(10 * k, 10 * k + n)

    chained = _chain_started_ahead(segment(k, n) for k, n in enumerate([3, 0, 2, 1]))
    assert next(chained) == 0
    assert started[1].wait(timeout=30)  # begun in the background, the consumer still in segment 0
    assert not started[2].is_set()  # one segment ahead, no more
    assert list(chained) == [1, 2, 20, 21, 30]
