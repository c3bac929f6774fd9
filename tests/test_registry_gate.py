"""The promotion gate as a pure function: scores and policy in, verdict out (no MLflow); data-spec keys."""

from __future__ import annotations

import math

import pytest

from diffusion_core.adapters.mlflow_registry import GatePolicy, RegistryConfig, RegistryError
from diffusion_core.adapters.mlflow_registry.gate import CandidateScores, decide, parse_score
from diffusion_core.adapters.mlflow_registry.lineage import (
    UNREADABLE,
    DataSpecKey,
    spec_differences,
    suggest_model_name,
)

POLICY = GatePolicy(margin=0.02, min_precision=0.5, min_recall=0.5)
# With the rules on recorded copying and on the feature network (RegistryConfig's defaults).
FULL = GatePolicy(margin=0.02, min_precision=0.5, min_recall=0.5, max_copy_share=0.3,
                  max_feature_p_value=0.01)


def good(fd: float) -> CandidateScores:
    return CandidateScores(fd=fd, precision=0.9, recall=0.9)


def evaluated(**changes: object) -> CandidateScores:
    """A candidate that passes every rule of FULL, with `changes`."""
    scores = {"fd": 10.0, "precision": 0.9, "recall": 0.9, "copy_share": 0.1,
              "feature_kind": "trained_classifier", "feature_accuracy": 0.97, "feature_chance": 0.11,
              "feature_p_value": 1e-30, **changes}
    return CandidateScores(**scores)


def test_the_candidate_must_beat_the_champion_by_the_relative_margin() -> None:
    assert decide(good(98.0), 100.0, POLICY).action == "promoted"  # 98 <= 100 * 0.98
    assert decide(good(98.01), 100.0, POLICY).action == "rejected"
    wide = GatePolicy(margin=0.6, min_precision=0, min_recall=0)
    assert decide(good(50.0), 100.0, wide).action == "rejected"


def test_a_first_version_is_promoted_only_above_the_floor() -> None:
    assert decide(good(400.0), None, POLICY).reason == "no champion yet"
    low = CandidateScores(fd=1.0, precision=0.14, recall=0.27)  # an untrained model's numbers
    verdict = decide(low, None, POLICY)
    assert verdict.action == "rejected" and "min_precision" in verdict.reason
    assert decide(CandidateScores(fd=1.0, precision=0.9, recall=0.3), None, POLICY).action == "rejected"
    capped = GatePolicy(margin=0.02, min_precision=0, min_recall=0, max_fd=50.0)
    assert decide(CandidateScores(fd=60.0), None, capped).action == "rejected"
    assert decide(CandidateScores(fd=40.0), None, capped).action == "promoted"


@pytest.mark.parametrize("fd", [math.nan, math.inf, -math.inf, -1.0])
def test_invalid_candidate_fd_is_rejected_whatever_the_champion(fd: float) -> None:
    for champion in (None, 10.0, math.nan, math.inf):
        verdict = decide(good(fd), champion, POLICY)
        assert verdict.action == "rejected" and "eval_fd" in verdict.reason


@pytest.mark.parametrize("share", [math.nan, -0.1, 1.5])
def test_invalid_precision_or_recall_is_rejected(share: float) -> None:
    assert decide(CandidateScores(fd=1.0, precision=share, recall=0.9), None, POLICY).action == "rejected"
    assert decide(CandidateScores(fd=1.0, precision=0.9, recall=share), None, POLICY).action == "rejected"


@pytest.mark.parametrize("champion", [math.nan, math.inf, -3.0])
def test_an_invalid_champion_fd_sets_no_bar(champion: float) -> None:
    verdict = decide(good(1e6), champion, POLICY)
    assert verdict.action == "promoted" and "sets no bar" in verdict.reason


def test_missing_scores_are_an_error_not_a_verdict() -> None:
    with pytest.raises(RegistryError, match="no eval_fd"):
        decide(CandidateScores(fd=None, precision=0.9, recall=0.9), None, POLICY)
    with pytest.raises(RegistryError, match="no eval_precision, eval_recall"):
        decide(CandidateScores(fd=1.0), 2.0, POLICY)
    no_floor = GatePolicy(margin=0.02, min_precision=0, min_recall=0)
    assert decide(CandidateScores(fd=1.0), 2.0, no_floor).action == "promoted"


def test_force_skips_every_check() -> None:
    assert decide(CandidateScores(fd=None), 1.0, POLICY, force=True).action == "forced"
    assert decide(good(1.0), None, POLICY, force=True, data_spec_differences=["channels"]).action == "forced"


def test_a_champion_of_another_data_spec_is_never_compared() -> None:
    # Far better scores do not help: the numbers measure different kinds of data.
    verdict = decide(good(0.001), None, POLICY, data_spec_differences=["image_size", "channels"])
    assert verdict.action == "rejected"
    assert verdict.reason.startswith("not comparable with the champion: the data spec differs in "
                                     "image_size, channels")


def test_data_spec_keys_name_the_fields_that_differ() -> None:
    digits = DataSpecKey(image_size=8, channels=1, label_names=[str(i) for i in range(10)])
    renamed = digits.model_copy(update={"label_names": [f"d{i}" for i in range(10)]})
    shapes = DataSpecKey(image_size=16, channels=3, label_names=["circle", "square"])
    assert digits.differences(digits) == [] and spec_differences(digits, digits) == []
    assert digits.differences(renamed) == ["label_names"]  # same count, other names: other classes
    assert digits.differences(shapes) == ["image_size", "channels", "label_names"]
    assert spec_differences(digits, None) == [UNREADABLE]  # an unreadable spec is never comparable
    assert DataSpecKey.from_tag(shapes.to_tag()) == shapes and DataSpecKey.from_tag("{broken") is None
    assert (digits.describe(), shapes.describe()) == ("8x8 grey, 10 labels", "16x16 RGB, 2 labels")
    assert suggest_model_name("diffusion-digits", shapes, "shapes") == "diffusion-shapes"
    assert suggest_model_name("diffusion-shapes", shapes, "shapes") == "diffusion-shapes-16x16-rgb"


def test_recorded_scores_parse_to_none_number_or_nan() -> None:
    assert parse_score(None) is None and parse_score("2.5") == 2.5
    assert math.isnan(parse_score("not a number")) and parse_score("inf") == math.inf


def test_the_config_builds_the_policy_with_the_documented_defaults() -> None:
    assert RegistryConfig().gate_policy() == FULL
    with pytest.raises(ValueError, match="min_precision"):
        RegistryConfig(min_precision=1.5)
    off = RegistryConfig(max_copy_share=None, max_feature_p_value=None,
                         untrained_features="refuse").gate_policy()
    assert (off.max_copy_share, off.max_feature_p_value, off.untrained_features) == (None, None, "refuse")


def test_a_candidate_that_copies_its_training_set_is_rejected_whatever_its_fd() -> None:
    assert decide(evaluated(copy_share=0.3), None, FULL).action == "promoted"  # the bound is inclusive
    verdict = decide(evaluated(fd=0.1, copy_share=0.95), 10.0, FULL)  # far better FD than the champion
    assert verdict.action == "rejected"
    assert "memorisation" in verdict.reason and "max_copy_share" in verdict.reason


def test_the_gate_does_not_decide_on_a_feature_classifier_at_chance() -> None:
    """The squares-and-circles case: held-out accuracy 11/19 against a majority share of 11/19."""
    at_chance = evaluated(feature_accuracy=0.579, feature_chance=0.579, feature_p_value=0.6)
    verdict = decide(at_chance, None, FULL)
    assert verdict.action == "rejected" and "learned nothing" in verdict.reason
    assert "0.579" in verdict.reason and "max_feature_p_value" in verdict.reason
    assert decide(evaluated(feature_p_value=0.009), None, FULL).action == "promoted"
    no_check = GatePolicy(margin=0.02, min_precision=0.5, min_recall=0.5)
    assert decide(at_chance, None, no_check).action == "promoted"


def test_random_features_are_decided_on_and_said_so_or_refused() -> None:
    random = evaluated(feature_kind="random_features", feature_accuracy=None, feature_chance=None,
                       feature_p_value=None)  # untrained: there is no accuracy to check
    verdict = decide(random, None, FULL)
    assert verdict.action == "promoted" and "untrained random-feature space" in verdict.reason
    assert decide(random, 5.0, FULL).action == "rejected"  # still compared with the champion
    refuse = GatePolicy(margin=0.02, min_precision=0.5, min_recall=0.5, untrained_features="refuse")
    verdict = decide(random, None, refuse)
    assert verdict.action == "rejected" and "untrained" in verdict.reason and "--force" in verdict.reason
    assert decide(evaluated(), None, refuse).action == "promoted"


def test_the_new_rules_need_their_recorded_scores_and_valid_values() -> None:
    with pytest.raises(RegistryError, match="no eval_copy_share"):
        decide(evaluated(copy_share=None), None, FULL)
    with pytest.raises(RegistryError, match="no eval_feature_kind"):
        decide(evaluated(feature_kind=None), None, FULL)
    with pytest.raises(RegistryError, match="no eval_feature_p_value"):
        decide(evaluated(feature_p_value=None), None, FULL)
    for bad in ({"copy_share": math.nan}, {"copy_share": 1.5}, {"feature_p_value": -0.1}):
        verdict = decide(evaluated(**bad), None, FULL)
        assert verdict.action == "rejected" and "is not a number in [0, 1]" in verdict.reason, bad
    verdict = decide(evaluated(feature_kind="made-up"), None, FULL)
    assert verdict.action == "rejected" and "made-up" not in verdict.reason  # never echoed back
