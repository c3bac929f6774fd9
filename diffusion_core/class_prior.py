"""Labels for sampling requests that give none: draws from the training data's class distribution.

A class-conditional model learns p(x | y) for every class y, and, through the labels dropped to
NULL_LABEL during training (classifier-free guidance, Ho & Salimans 2022), an estimate of the
marginal p(x) from a fraction (`label_dropout`) of the training signal. A request without labels
asks for the marginal. Drawing y ~ p(y) from the training split's class frequencies and then
x ~ p(x | y) samples it exactly, since

    p(x) = sum_y p(y) p(x | y),

and uses the conditional model, which every training example taught; the null label stays
available for whoever asks for it explicitly (and for the unconditional half of guidance).

Each image's label is drawn from a generator seeded by that image's seed alone (plus a stream tag,
so the draw never coincides with the noise the sampler takes from the same seed), so an image is
the same whether it is sampled alone or inside a merged batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from diffusion_core.errors import ConfigError

# Stream tag of the label draw: numpy's SeedSequence([seed, LABEL_STREAM]) is independent of the
# torch generator seeded with `seed` that draws the image's noise.
LABEL_STREAM = 0x4C41_424C  # "LABL"
PRIOR_TOLERANCE = 1e-6


def class_prior(counts: Sequence[int]) -> list[float]:
    """Class frequencies from per-class counts (the training split's): p_y = n_y / sum n."""
    total = sum(counts)
    if not counts or total <= 0 or any(c < 0 for c in counts):
        raise ConfigError("class_counts: accepted: non-negative counts with a positive total")
    return [c / total for c in counts]


def check_class_prior(prior: Sequence[float], num_classes: int) -> None:
    """A probability vector over the model's classes; ConfigError naming the rule otherwise."""
    if len(prior) != num_classes:
        raise ConfigError("class_prior: one probability per class; accepted: num_classes entries")
    if not all(math.isfinite(p) and p >= 0 for p in prior) or abs(sum(prior) - 1.0) > PRIOR_TOLERANCE:
        raise ConfigError("class_prior: accepted: finite non-negative probabilities that sum to 1")


def uniform_prior(num_classes: int) -> list[float]:
    return [1.0 / num_classes] * num_classes


def marginal_labels(seeds: Sequence[int], prior: Sequence[float]) -> list[int]:
    """Label i ~ Categorical(prior), drawn from a generator seeded by (seeds[i], LABEL_STREAM)."""
    p = np.asarray(prior, dtype=np.float64)
    p = p / p.sum()  # exact normalisation for numpy's check; the prior is validated on load
    return [int(np.random.default_rng([int(seed), LABEL_STREAM]).choice(len(p), p=p)) for seed in seeds]
