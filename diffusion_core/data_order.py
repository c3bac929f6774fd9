"""The order in which a training worker reads its rows: a pure function of the seed, the worker's
rank, the number of workers and the position in the run (no Ray, no I/O).

The training split is cut into chunks (row ranges of the Parquet row groups, at most `chunk_rows`
rows). Pass p over the data draws one permutation of all chunks, seeded by (seed, p, DATA_ORDER),
and deals it round robin: worker k gets chunks k, k + W, k + 2W, ... of it, so in every pass the
workers read disjoint chunks that together cover the split once. Each worker cuts its chunks, in
that order, into windows of at most `window_rows` rows (one chunk at least); a window's rows are
read together and permuted by a generator seeded by (seed, k, p, window, WINDOW_ORDER). A worker's
stream is its windows, pass after pass; its batches are consecutive slices of the stream.

This is the classic shard-shuffle plus shuffle-buffer scheme of streaming loaders (chunks shuffled
globally, rows shuffled within a bounded window), made deterministic: row r of worker k's stream is
a function of (seed, k, W, r) alone. A run stopped after `step` steps resumes at stream row
step * batch_size, dropping the first rows of the window it stopped in, and then reads exactly the
rows an uninterrupted run would have read, for any number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffusion_core.errors import ConfigError
from diffusion_core.seeds import Stream, derived_seed

# A worker should see several chunks per pass even when the split is small, so that passes differ.
CHUNKS_PER_WORKER = 8
# Stored bytes of a row beside its image (label, Arrow offsets), for sizing windows in bytes.
ROW_OVERHEAD_BYTES = 16


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of row group `row_group` of shard file `file` (its index in the manifest's
    list); `first_row` is the index of its first row in the whole split (files in manifest order)."""

    file: int
    row_group: int
    start: int
    stop: int
    first_row: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Window:
    """Rows of `chunks` read together, permuted by `seed`; the first `skip` permuted rows are dropped
    (a run resuming inside this window has trained on them)."""

    pass_index: int
    index: int
    chunks: tuple[Chunk, ...]
    seed: int
    skip: int = 0

    @property
    def num_rows(self) -> int:
        return self.rows_read - self.skip

    @property
    def rows_read(self) -> int:
        """Rows read to produce this window (its chunks), including the skipped ones."""
        return sum(c.num_rows for c in self.chunks)

    def permutation(self) -> np.ndarray:
        """Positions, in the concatenation of the chunks' rows, of the rows this window yields."""
        return np.random.default_rng(self.seed).permutation(self.rows_read)[self.skip:]

    def row_indices(self) -> np.ndarray:
        """The split-wide indices of the rows this window yields, in order."""
        rows = np.concatenate([np.arange(c.first_row, c.first_row + c.num_rows) for c in self.chunks])
        return rows[self.permutation()]


def chunk_split(row_groups: Sequence[Sequence[int]], max_rows: int) -> list[Chunk]:
    """Chunks of at most `max_rows` rows covering every row group; row_groups[f][g] is the number of
    rows of row group g of file f."""
    if max_rows < 1:
        raise ConfigError("chunk rows: must be >= 1")
    chunks: list[Chunk] = []
    first = 0
    for f, groups in enumerate(row_groups):
        for g, rows in enumerate(groups):
            for start in range(0, rows, max_rows):
                stop = min(rows, start + max_rows)
                chunks.append(Chunk(f, g, start, stop, first + start))
            first += rows
    return chunks


def chunk_rows_for(total_rows: int, world: int, window_rows: int, row_group_rows: int) -> int:
    """Rows per chunk: a whole row group unless that is more than a window, or leaves a worker fewer
    than CHUNKS_PER_WORKER chunks per pass (small splits)."""
    return max(1, min(row_group_rows, window_rows, math.ceil(total_rows / (CHUNKS_PER_WORKER * world))))


def window_rows_for(row_bytes: int, window_bytes: float, batch_size: int) -> int:
    """Rows in a shuffle window of `window_bytes` (at least one batch)."""
    return max(batch_size, int(window_bytes // max(1, row_bytes)))


def _pass_windows(chunks: Sequence[Chunk], seed: int, pass_index: int, rank: int, world: int,
                  window_rows: int) -> list[Window]:
    gen = np.random.default_rng(derived_seed(seed, pass_index, Stream.DATA_ORDER))
    mine = [chunks[i] for i in gen.permutation(len(chunks))[rank::world]]
    if not mine:
        raise ConfigError(
            f"num_workers: the training split has {len(chunks)} chunks, fewer than the {world} workers",
        )
    windows: list[list[Chunk]] = [[]]
    rows = 0
    for chunk in mine:
        if windows[-1] and rows + chunk.num_rows > window_rows:
            windows.append([])
            rows = 0
        windows[-1].append(chunk)
        rows += chunk.num_rows
    return [Window(pass_index, i, tuple(group), derived_seed(seed, rank, pass_index, i, Stream.WINDOW_ORDER))
            for i, group in enumerate(windows)]


def worker_windows(chunks: Sequence[Chunk], *, seed: int, rank: int, world: int, window_rows: int,
                   start_row: int, num_rows: int) -> list[Window]:
    """The windows that yield rows [start_row, start_row + num_rows) of worker `rank`'s stream (the
    first one with `skip` set when start_row falls inside it; the last one may run past the end)."""
    if not chunks:
        raise ConfigError("dataset: the training split has no rows")
    out: list[Window] = []
    offset, end, pass_index = 0, start_row + num_rows, 0
    while offset < end:
        for window in _pass_windows(chunks, seed, pass_index, rank, world, window_rows):
            if offset + window.num_rows > start_row:
                skip = max(0, start_row - offset)
                out.append(Window(window.pass_index, window.index, window.chunks, window.seed, skip))
            offset += window.num_rows
            if offset >= end:
                break
        pass_index += 1
    return out


def stream_row_indices(windows: Sequence[Window]) -> np.ndarray:
    """Split-wide row indices of a stream of windows, in order (for reading a small split in memory)."""
    if not windows:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([w.row_indices() for w in windows])
