"""The promotion gate: a pure function of scores and policy (no MLflow, no I/O).

A candidate becomes champion when

0. it is comparable with the champion: both generate the same kind of data (lineage.py: image
   size, channels, labels). Scores are never compared across data specs, and a candidate that
   differs is not promoted, whatever its scores;
1. its scores are valid: fd (a Frechet distance, a squared distance) finite and >= 0, precision
   and recall (Kynkaenniemi et al. 2019) shares in [0, 1];
2. it passes the absolute quality floor, whether or not there is a champion:
   precision >= min_precision, recall >= min_recall, fd <= max_fd (when set);
3. it beats the champion by the relative margin (lower FD is better):
   fd_candidate <= fd_champion * (1 - margin).
   A champion whose FD is not a valid number (NaN, infinite, negative) sets no bar: a candidate
   that passes 1 and 2 replaces it.

`force` skips all four.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from diffusion_core.adapters.mlflow_registry.errors import RegistryError


@dataclass(frozen=True)
class GatePolicy:
    """margin: relative improvement over the champion; the rest: the absolute quality floor."""

    margin: float
    min_precision: float
    min_recall: float
    max_fd: float | None = None


@dataclass(frozen=True)
class CandidateScores:
    """The candidate's evaluation; None where it was not recorded."""

    fd: float | None
    precision: float | None = None
    recall: float | None = None


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
    problem = _invalid_scores(candidate, policy) or _below_floor(candidate, policy)
    if problem:
        return Verdict("rejected", problem)
    if champion_fd is None:
        return Verdict("promoted", "no champion yet")
    if not valid_fd(champion_fd):
        return Verdict("promoted", "the champion's fd is not a finite number >= 0: it sets no bar")
    threshold = champion_fd * (1 - policy.margin)
    comparison = f"champion {champion_fd:.4g} * (1 - {policy.margin})"
    if candidate.fd <= threshold:
        return Verdict("promoted", f"fd {candidate.fd:.4g} <= {comparison}")
    return Verdict("rejected", f"fd {candidate.fd:.4g} > {comparison}")


def _required(candidate: CandidateScores, policy: GatePolicy) -> dict[str, float | None]:
    needed = {"eval_fd": candidate.fd}
    if policy.min_precision > 0:
        needed["eval_precision"] = candidate.precision
    if policy.min_recall > 0:
        needed["eval_recall"] = candidate.recall
    return needed


def _invalid_scores(candidate: CandidateScores, policy: GatePolicy) -> str | None:
    needed = _required(candidate, policy)
    missing = [name for name, value in needed.items() if value is None]
    if missing:
        raise RegistryError(f"gate: the candidate has no {', '.join(missing)}",
                            hint="evaluate it first (register --dataset) or use --force")
    if not valid_fd(candidate.fd):
        return "candidate eval_fd is not a finite number >= 0"
    for name, value in (("eval_precision", candidate.precision), ("eval_recall", candidate.recall)):
        if value is not None and not valid_share(value):
            return f"candidate {name} is not a number in [0, 1]"
    return None


def _below_floor(candidate: CandidateScores, policy: GatePolicy) -> str | None:
    if policy.max_fd is not None and candidate.fd > policy.max_fd:
        return f"quality floor: fd {candidate.fd:.4g} > max_fd {policy.max_fd:g}"
    if policy.min_precision > 0 and candidate.precision < policy.min_precision:
        return f"quality floor: precision {candidate.precision:.3f} < min_precision {policy.min_precision:g}"
    if policy.min_recall > 0 and candidate.recall < policy.min_recall:
        return f"quality floor: recall {candidate.recall:.3f} < min_recall {policy.min_recall:g}"
    return None
