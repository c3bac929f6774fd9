"""Does a model copy its training images? Nearest-neighbour distances, against held-out images.

A model that reproduces its training set scores well on every distribution distance (its samples
*are* data), so the copying question is asked separately, in the way of Meehan, Chaudhuri &
Dasgupta (2020), "A Non-Parametric Test to Detect Data-Copying in Generative Models": compare how
close generated images come to the training split with how close fresh images from the same
distribution (the held-out validation split) come to it.

    d(x)        = min_j || x - t_j ||_2 / sqrt(D)     (t_j: training images, D = C*H*W pixels)
    ratio       = median_i d(g_i) / median_k d(v_k)   (g: generated, v: held-out)
    copy_share  = mean_i [ d(g_i) <= q_0.1 ],         q_0.1 = 10th percentile of d(v_k)

For a model that generalises (its samples as far from the training images as new data would be),
ratio ~ 1 and copy_share ~ 0.10, since 10% of held-out images lie below their own 10th percentile;
a model returning training images gives d = 0 for its copies: ratio -> 0, copy_share -> share copied.

The distance is taken in pixel space ([0, 1] values): a copy is a copy of pixels, and pixels do not
depend on the evaluation's feature network, which may be untrained, or blind to what it was
trained to ignore (the classifier's features are invariant to brightness and position, so two
different images can share features). Carlini et al. (2023), "Extracting Training Data from
Diffusion Models", likewise define memorisation by pixel-space l2 distance. It catches literal
and near-literal copies, not copies shifted or recoloured. Dividing by sqrt(D) makes d a
root-mean-square pixel difference, readable at any image size; ratio and share do not depend on it.

Distances are computed in blocks of at most `max_block` query x reference pairs (bounded memory,
whatever the split sizes), in float64 (exact copies give d = 0, not rounding noise).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

HELDOUT_QUANTILE = 0.1
DEFAULT_MAX_BLOCK = 1 << 22  # query x reference pairs per distance block: 32 MiB of float64


class Memorisation(BaseModel):
    """The copying figures of one set of generated images (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    copy_share: float         # share of generated images closer to a training image than q_0.1
    nn_distance_ratio: float  # median generated / median held-out nearest-training distance


def nearest_distances(queries: Tensor, reference: Tensor, max_block: int = DEFAULT_MAX_BLOCK) -> Tensor:
    """(N,) float64 RMS pixel distance from each of `queries` (N, ...) to its nearest row of
    `reference` (M, ...) (same trailing shape), computed block by block:

        ||q - r||^2 = ||q||^2 + ||r||^2 - 2 q.r
    """
    if len(reference) == 0 or queries.shape[1:] != reference.shape[1:]:
        raise ValueError("reference: needs >= 1 image of the queries' shape")
    q = queries.reshape(len(queries), -1).to(torch.float64)
    r = reference.reshape(len(reference), -1).to(torch.float64)
    r_sq = r.pow(2).sum(dim=1)
    ref_rows = max(1, min(len(r), max_block))
    query_rows = max(1, max_block // ref_rows)
    best = []
    for q_block in q.split(query_rows):
        q_sq = q_block.pow(2).sum(dim=1, keepdim=True)
        nearest = torch.full((len(q_block),), math.inf, dtype=torch.float64)
        for start in range(0, len(r), ref_rows):
            block = r[start:start + ref_rows]
            squared = q_sq + r_sq[start:start + ref_rows] - 2 * q_block @ block.T
            nearest = torch.minimum(nearest, squared.min(dim=1).values)
        best.append(nearest)
    return (torch.cat(best).clamp_min(0) / q.shape[1]).sqrt()


def memorisation(generated_distances: Tensor, heldout_distances: Tensor) -> Memorisation:
    """Copy share and median ratio from nearest-training distances of generated (N,) and held-out
    (M,) images (both from `nearest_distances` against the same training split)."""
    if len(generated_distances) == 0 or len(heldout_distances) == 0:
        raise ValueError("distances: needs >= 1 generated and >= 1 held-out image")
    heldout = heldout_distances.to(torch.float64)
    threshold = torch.quantile(heldout, HELDOUT_QUANTILE)
    generated = generated_distances.to(torch.float64)
    share = float((generated <= threshold).to(torch.float64).mean())
    heldout_median = float(heldout.median())
    # A held-out median of 0 (most held-out images duplicated in the training split) gives no scale.
    ratio = float(generated.median()) / heldout_median if heldout_median > 0 else math.nan
    return Memorisation(copy_share=share, nn_distance_ratio=ratio)
