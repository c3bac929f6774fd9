"""The promotion gate: a pure function of scores and policy (no MLflow, no I/O).

A candidate becomes champion when

0. it is comparable with the champion: both generate the same kind of data (lineage.py: image
   size, channels, labels). Scores are never compared across data specs, and a candidate that
   differs is not promoted, whatever its scores;
1. its scores are valid: fd (a Frechet distance, a squared distance) finite and >= 0, precision
   and recall (Kynkaenniemi et al. 2019), the copy share and the feature p-value in [0, 1];
2. the feature network it was measured with learned something (max_feature_p_value): a trained
   classifier's held-out accuracy is clearly above chance, i.e. the one-sided binomial p-value of
   that accuracy under chance is <= max_feature_p_value. FD, precision and recall in the space of a
   network that learned nothing say nothing, so no decision rests on them. Random (untrained)
   features, the unlabelled-data fallback, claim no learning: with untrained_features "decide"
   the gate decides and its reason says which space it used, with "refuse" it rejects;
3. it does not copy its training set: copy_share <= max_copy_share (metrics_memorisation; fresh
   data scores 0.10);
4. it passes the absolute quality floor, whether or not there is a champion:
   precision >= min_precision, recall >= min_recall, fd <= max_fd (when set);
5. it beats the champion by the relative margin (lower FD is better):
   fd_candidate <= fd_champion * (1 - margin).
   A champion whose FD is not a valid number (NaN, infinite, negative) sets no bar: a candidate
   that passes 1 to 4 replaces it.

`force` skips them all. A rule whose policy value is None is off, and needs no recorded score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from diffusion_core.adapters.mlflow_registry.errors import RegistryError

# The kinds of metrics_features.FeatureExtractor (named here so that the gate needs no torch).
TRAINED_FEATURES, RANDOM_FEATURES = "trained_classifier", "random_features"


@dataclass(frozen=True)
class GatePolicy:
    """margin: relative improvement over the champion; min_*/max_fd: the absolute quality floor;
    max_copy_share, max_feature_p_value, untrained_features: rules 2 and 3 (module docstring)."""

    margin: float
    min_precision: float
    min_recall: float
    max_fd: float | None = None
    max_copy_share: float | None = None
    max_feature_p_value: float | None = None
    untrained_features: Literal["decide", "refuse"] = "decide"


@dataclass(frozen=True)
class CandidateScores:
    """The candidate's evaluation; None where it was not recorded."""

    fd: float | None
    precision: float | None = None
    recall: float | None = None
    copy_share: float | None = None
    feature_kind: str | None = None
    feature_accuracy: float | None = None
    feature_chance: float | None = None
    feature_p_value: float | None = None


@dataclass(frozen=True)
class Verdict:
    action: Literal["promoted", "rejected", "forced"]
    reason: str


def parse_score(text: str | None) -> float | None:
    """A recorded score (a tag's text): None when absent, NaN (invalid) when not a number."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return math.nan


def valid_fd(value: float) -> bool:
    return math.isfinite(value) and value >= 0.0


def valid_share(value: float) -> bool:
    return 0.0 <= value <= 1.0  # False for NaN


def decide(candidate: CandidateScores, champion_fd: float | None, policy: GatePolicy,
           force: bool = False, data_spec_differences: Sequence[str] = ()) -> Verdict:
    """The gate's verdict for `candidate` against the champion's FD (None: there is no champion, or
    it is not comparable). data_spec_differences: the fields in which the candidate's data spec
    differs from the champion's (lineage.spec_differences); any makes the two incomparable.

    RegistryError when a score the policy needs was never recorded (evaluate the candidate first).
    """
    if force:
        return Verdict("forced", "forced promotion (--force)")
    if data_spec_differences:
        return Verdict("rejected", f"not comparable with the champion: the data spec differs in "
                                   f"{', '.join(data_spec_differences)}, and scores are never compared "
                                   "across data specs (use --force to make it this model's champion)")
    problem = (_invalid_scores(candidate, policy) or _feature_network_problem(candidate, policy)
               or _copying(candidate, policy) or _below_floor(candidate, policy))
    if problem:
        return Verdict("rejected", problem)
    verdict = _against_champion(candidate.fd, champion_fd, policy)
    if candidate.feature_kind == RANDOM_FEATURES:
        return Verdict(verdict.action, f"{verdict.reason} (in untrained random-feature space: the FDs rank "
                                       "models, their values say little on their own)")
    return verdict


def _against_champion(fd: float, champion_fd: float | None, policy: GatePolicy) -> Verdict:
    if champion_fd is None:
        return Verdict("promoted", "no champion yet")
    if not valid_fd(champion_fd):
        return Verdict("promoted", "the champion's fd is not a finite number >= 0: it sets no bar")
    threshold = champion_fd * (1 - policy.margin)
    comparison = f"champion {champion_fd:.4g} * (1 - {policy.margin})"
    if fd <= threshold:
        return Verdict("promoted", f"fd {fd:.4g} <= {comparison}")
    return Verdict("rejected", f"fd {fd:.4g} > {comparison}")


def _required(candidate: CandidateScores, policy: GatePolicy) -> dict[str, float | str | None]:
    needed: dict[str, float | str | None] = {"eval_fd": candidate.fd}
    if policy.min_precision > 0:
        needed["eval_precision"] = candidate.precision
    if policy.min_recall > 0:
        needed["eval_recall"] = candidate.recall
    if policy.max_copy_share is not None:
        needed["eval_copy_share"] = candidate.copy_share
    if policy.max_feature_p_value is not None or policy.untrained_features == "refuse":
        needed["eval_feature_kind"] = candidate.feature_kind
    if policy.max_feature_p_value is not None and candidate.feature_kind == TRAINED_FEATURES:
        needed["eval_feature_p_value"] = candidate.feature_p_value
    return needed


def _invalid_scores(candidate: CandidateScores, policy: GatePolicy) -> str | None:
    needed = _required(candidate, policy)
    missing = [name for name, value in needed.items() if value is None]
    if missing:
        raise RegistryError(f"gate: the candidate has no {', '.join(missing)}",
                            hint="evaluate it first (register --dataset) or use --force")
    if not valid_fd(candidate.fd):
        return "candidate eval_fd is not a finite number >= 0"
    shares = (("eval_precision", candidate.precision), ("eval_recall", candidate.recall),
              ("eval_copy_share", candidate.copy_share), ("eval_feature_p_value", candidate.feature_p_value))
    for name, value in shares:
        if value is not None and not valid_share(value):
            return f"candidate {name} is not a number in [0, 1]"
    if candidate.feature_kind not in (None, TRAINED_FEATURES, RANDOM_FEATURES):
        return f"candidate eval_feature_kind is not one of {TRAINED_FEATURES}, {RANDOM_FEATURES}"
    return None


def _feature_network_problem(candidate: CandidateScores, policy: GatePolicy) -> str | None:
    if candidate.feature_kind == RANDOM_FEATURES and policy.untrained_features == "refuse":
        return ("the evaluation's feature network is untrained (random features: the dataset has no "
                "labels) and untrained_features is 'refuse'; promote explicitly (--force) to decide yourself")
    limit = policy.max_feature_p_value
    if candidate.feature_kind != TRAINED_FEATURES or limit is None or candidate.feature_p_value <= limit:
        return None
    accuracy = "" if candidate.feature_accuracy is None else f" {candidate.feature_accuracy:.3f}"
    chance = "" if candidate.feature_chance is None else f" {candidate.feature_chance:.3f}"
    return (f"the evaluation's feature classifier learned nothing: its held-out accuracy{accuracy} is not "
            f"clearly above chance{chance} (binomial p = {candidate.feature_p_value:.3g} > "
            f"max_feature_p_value {limit:g}); FD, precision and recall in its space say nothing about "
            "quality, so the gate does not decide (fix the feature classifier, give the dataset a larger "
            "validation split if it has only a few images, or --force)")


def _copying(candidate: CandidateScores, policy: GatePolicy) -> str | None:
    if policy.max_copy_share is None or candidate.copy_share <= policy.max_copy_share:
        return None
    return (f"memorisation: {candidate.copy_share:.3f} of the samples are closer to a training image than "
            f"90% of held-out images are (fresh data: 0.10), above max_copy_share {policy.max_copy_share:g}")


def _below_floor(candidate: CandidateScores, policy: GatePolicy) -> str | None:
    if policy.max_fd is not None and candidate.fd > policy.max_fd:
        return f"quality floor: fd {candidate.fd:.4g} > max_fd {policy.max_fd:g}"
    if policy.min_precision > 0 and candidate.precision < policy.min_precision:
        return f"quality floor: precision {candidate.precision:.3f} < min_precision {policy.min_precision:g}"
    if policy.min_recall > 0 and candidate.recall < policy.min_recall:
        return f"quality floor: recall {candidate.recall:.3f} < min_recall {policy.min_recall:g}"
    return None
