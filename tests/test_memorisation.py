"""The memorisation check: nearest-training distances against brute force, and the statistics on
constructed cases whose answer is known (copies, fresh draws, a known share of copies)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.metrics_memorisation import HELDOUT_QUANTILE, memorisation, nearest_distances


def _gaussian_images(n: int, seed: int) -> torch.Tensor:
    """n images (1, 4, 4) from one fixed distribution (independent N(0.5, 0.2^2) pixels)."""
    return 0.5 + 0.2 * torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("max_block", [1, 7, 1 << 22])
def test_nearest_distances_match_brute_force_in_any_block_size(max_block: int) -> None:
    queries, reference = _gaussian_images(23, 0), _gaussian_images(41, 1)
    brute = torch.cdist(queries.flatten(1).double(), reference.flatten(1).double()).min(dim=1).values
    got = nearest_distances(queries, reference, max_block=max_block)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, brute / math.sqrt(16), rtol=1e-9, atol=1e-12)  # RMS over 16 pixels


def test_an_exact_copy_is_at_distance_zero_and_a_constant_offset_at_its_size() -> None:
    reference = _gaussian_images(50, 2)
    assert torch.equal(nearest_distances(reference[:5], reference), torch.zeros(5, dtype=torch.float64))
    far = torch.full((1, 1, 4, 4), 100.0)  # every reference pixel is below 1.6: nearest is ~99.5 away
    assert 98 < float(nearest_distances(far, reference)) < 100


def test_copies_give_share_one_and_ratio_zero() -> None:
    train, heldout = _gaussian_images(400, 3), _gaussian_images(300, 4)
    result = memorisation(nearest_distances(train[:200], train), nearest_distances(heldout, train))
    assert result.copy_share == 1.0 and result.nn_distance_ratio == 0.0


def test_fresh_draws_from_the_data_distribution_give_the_heldout_rate_and_ratio_one() -> None:
    """Generated and held-out images exchangeable: P[d_gen <= q_0.1(d_held)] = 0.1 up to sampling
    noise (binomial sd sqrt(0.09 / 2000) = 0.007, plus the quantile's own from 2000 held-out)."""
    train, heldout, fresh = _gaussian_images(2000, 5), _gaussian_images(2000, 6), _gaussian_images(2000, 7)
    result = memorisation(nearest_distances(fresh, train), nearest_distances(heldout, train))
    assert result.copy_share == pytest.approx(HELDOUT_QUANTILE, abs=0.03)
    assert result.nn_distance_ratio == pytest.approx(1.0, abs=0.05)


def test_a_known_share_of_copies_adds_to_the_heldout_rate() -> None:
    """30% copies + 70% fresh: share = 0.3 + 0.7 * 0.1 = 0.37 in expectation."""
    train, heldout, fresh = _gaussian_images(2000, 8), _gaussian_images(2000, 9), _gaussian_images(1400, 10)
    generated = torch.cat([train[:600], fresh])
    result = memorisation(nearest_distances(generated, train), nearest_distances(heldout, train))
    assert result.copy_share == pytest.approx(0.37, abs=0.03)


def test_memorisation_needs_both_sets() -> None:
    with pytest.raises(ValueError, match="distances"):
        memorisation(torch.zeros(0), torch.ones(3))
    with pytest.raises(ValueError, match="reference"):
        nearest_distances(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 3, 3))
