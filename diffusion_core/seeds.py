"""Seeds of the training run's random streams: one per (purpose, position), from sha256.

Every random draw of training comes from a generator seeded by `derived_seed(seed, ..., stream)`:
the stream tag keeps unrelated draws apart (without it, step n and pass n would share a seed, and
the dropout masks would replay the noise generator's stream), and the position (rank, step, pass,
window) makes a resumed run draw exactly what an uninterrupted one would, with no generator state
saved.
"""

from __future__ import annotations

import enum
import hashlib


class Stream(enum.IntEnum):
    """Domain tags of derived_seed: each random stream gets its own seed."""

    DATA_ORDER = 1  # the permutation of the chunks of a pass over the data
    NOISE = 2  # timesteps, noise and label dropout of a step
    DROPOUT = 3  # the global generator the dropout layers draw from
    WINDOW_ORDER = 4  # the permutation of the rows of one shuffle window


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (sha256, not hash()).
    Pass a Stream tag as the last part so that unrelated streams never share a seed."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
