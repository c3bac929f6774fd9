"""Distribution distances between two sets of feature vectors, and the binomial tail of an accuracy.

Everything here works on features, never on images: `real` and `fake` are (N, D) float tensors
produced by the same feature network (see `metrics_features`). All statistics are computed in
float64 because covariance square roots lose precision quickly in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mean_and_covariance(features: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {tuple(features.shape)}")
    x = features.to(torch.float64)
    mu = x.mean(dim=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix through its eigendecomposition."""
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return eigvecs @ torch.diag(eigvals.clamp_min(0).sqrt()) @ eigvecs.T


def frechet_distance_from_stats(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet (2-Wasserstein) distance between the Gaussians N(mu1, S1) and N(mu2, S2).

        d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

    (Dowson & Landau 1982; used as FID by Heusel et al. 2017). The cross term is computed from the
    symmetric matrix S1^1/2 S2 S1^1/2, whose eigenvalues are those of S1 S2, so only symmetric
    eigendecompositions are needed (no complex `sqrtm`).
    """
    root1 = _psd_sqrt(sigma1)
    cross = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp_min(0).sqrt().sum()
    mean_term = (mu1 - mu2).pow(2).sum()
    value = mean_term + torch.trace(sigma1) + torch.trace(sigma2) - 2 * cross
    return max(float(value), 0.0)  # rounding can leave -1e-12 for identical sets


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to (N, D) `real` and (M, D) `fake` features."""
    return frechet_distance_from_stats(*mean_and_covariance(real), *mean_and_covariance(fake))


def _kth_neighbour_radii(features: Tensor, k: int) -> Tensor:
    """(N,) distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    distances = torch.cdist(features, features)
    # Index 0 of the sorted row is the point itself (distance 0), so the k-th neighbour is index k.
    return distances.kthvalue(k + 1, dim=1).values


def _fraction_inside_manifold(points: Tensor, centres: Tensor, radii: Tensor) -> float:
    """Fraction of `points` within radius[j] of at least one centre j."""
    inside = (torch.cdist(points, centres) <= radii.unsqueeze(0)).any(dim=1)
    return float(inside.to(torch.float64).mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of Kynkäänniemi et al. (2019), "Improved Precision and Recall
    Metric for Assessing Generative Models".

    The manifold of a set is the union of balls around each of its points with radius equal to the
    distance to that point's k-th nearest neighbour. precision = fraction of fake features inside the
    real manifold (are samples realistic?); recall = fraction of real features inside the fake
    manifold (is the data's variety covered?). k = 3 is the paper's choice.
    """
    if k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(f"precision_recall: k must be in [1, {min(len(real), len(fake)) - 1}], got {k}")
    real64, fake64 = real.to(torch.float64), fake.to(torch.float64)
    precision = _fraction_inside_manifold(fake64, real64, _kth_neighbour_radii(real64, k))
    recall = _fraction_inside_manifold(real64, fake64, _kth_neighbour_radii(fake64, k))
    return precision, recall


def class_histogram(predicted: Tensor, num_classes: int) -> list[float]:
    """Fraction of samples predicted as each class, a list of length `num_classes` summing to 1."""
    counts = torch.bincount(predicted.to(torch.int64), minlength=num_classes).to(torch.float64)
    return (counts / counts.sum()).tolist()


def normalised_entropy(histogram: list[float]) -> float:
    """Shannon entropy of a class histogram divided by log K: 1 when all K classes are equally
    frequent, 0 when every sample falls in one class (mode collapse). Needs K >= 2 classes (with
    one class there is no diversity to measure, and log 1 = 0)."""
    if len(histogram) < 2:
        raise ValueError(f"histogram: normalised entropy needs >= 2 classes, got {len(histogram)}")
    entropy = -sum(p * math.log(p) for p in histogram if p > 0)
    return max(0.0, entropy / math.log(len(histogram)))  # no -0.0 for a single class


def binomial_upper_tail(successes: int, trials: int, p: float) -> float:
    """P[X >= successes] for X ~ Binomial(trials, p): the one-sided p-value of `successes` correct
    answers out of `trials` when each is right with probability p by chance,

        sum_{i=k}^{n} C(n, i) p^i (1 - p)^(n - i),

    summed in log space (lgamma), exact up to float rounding for any n."""
    if not 0 <= successes <= trials or not 0.0 <= p <= 1.0:
        raise ValueError("binomial_upper_tail: needs 0 <= successes <= trials and 0 <= p <= 1")
    if successes == 0 or p == 1.0:
        return 1.0
    if p == 0.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_terms = [math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1)
                 + i * log_p + (trials - i) * log_q for i in range(successes, trials + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))
