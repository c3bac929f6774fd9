"""Moving the champion: the gate's decision applied to the registry, forced promotion, rollback.

Aliases (stages are deprecated in MLflow):

- `champion`: the version that serving loads (`models:/<name>@champion`).
- `previous_champion`: the champion before the current one. Every promoted version also carries a
  `previous_champion` tag, so `rollback` can walk back through the whole chain.

A champion change is several registry writes (two aliases, version tags, the model's
`champion_history` tag) and MLflow has no transaction across them. So the change is first written
as one registered-model tag (`promotion.pending`, a JSON record of every write), then applied,
then the tag is deleted. Every write is idempotent: a process that dies half-way leaves the tag
behind, and the next registry operation on the model (registration, promotion, rollback), under
the registry lock, applies the whole record again before doing anything else
(`repair_pending_promotion`).

Every decision is also recorded on the version (`gate.*`, `rollback.*` tags, and the second half
of its description, description.py) and in the version's MLflow run (tags and `gate_*` metrics);
those records are written after the change is complete and are not part of the repair.

The gate compares a candidate only with a champion of the same data spec (lineage.py): a champion
of other data is neither re-evaluated (its feature network, image shape and labels would not fit)
nor compared, and the decision says so.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.adapters.mlflow_registry.config import (
    CHAMPION,
    COPY_SHARE_TAG,
    DEFAULT_LOCK_TIMEOUT_S,
    EVAL_KEY_TAG,
    FD_TAG,
    FEATURE_ACCURACY_TAG,
    FEATURE_CHANCE_TAG,
    FEATURE_KIND_TAG,
    FEATURE_P_VALUE_TAG,
    HISTORY_TAG,
    PENDING_TAG,
    PRECISION_TAG,
    PREVIOUS_CHAMPION,
    RECALL_TAG,
    RegistryConfig,
)
from diffusion_core.adapters.mlflow_registry.description import describe_version, gate_outcome
from diffusion_core.adapters.mlflow_registry.errors import RegistryError
from diffusion_core.adapters.mlflow_registry.gate import (
    CandidateScores,
    GatePolicy,
    decide,
    parse_score,
    valid_fd,
)
from diffusion_core.adapters.mlflow_registry.lineage import spec_differences, version_data_spec
from diffusion_core.adapters.mlflow_registry.lock import registry_lock
from diffusion_core.adapters.mlflow_registry.versions import ModelVersionInfo, version_by_alias, version_info
from diffusion_core.adapters.mlflow_store import client_for, with_retries

logger = logging.getLogger(__name__)

GATE_ATTEMPTS = 3  # the champion may change this often while the gate measures it
HISTORY_LENGTH = 40


class PromotionDecision(BaseModel):
    """What the gate (or a forced promotion, or a rollback) did, and the numbers it used."""

    model_config = ConfigDict(frozen=True)

    name: str
    action: str                       # "promoted" | "rejected" | "forced" | "rolled_back" | "unchanged"
    champion_version: str | None      # champion after the decision
    previous_champion_version: str | None
    candidate_version: str
    candidate_fd: float | None = None
    champion_fd: float | None = None
    reason: str

    @property
    def promoted(self) -> bool:
        return self.action in ("promoted", "forced")


class ChampionChange(BaseModel):
    """Every registry write of one champion change: what `promotion.pending` records."""

    champion: str
    previous: str | None
    version_tags: dict[str, dict[str, str]] = Field(default_factory=dict)  # version -> tags
    event: str                        # the champion_history entry, e.g. "promoted:3"
    at: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))


# ---------------------------------------------------------------------------- champion changes


def change_champion(client: MlflowClient, name: str, change: ChampionChange) -> None:
    """Record `change`, apply it, clear the record (call under the registry lock)."""
    with_retries(lambda: client.set_registered_model_tag(name, PENDING_TAG, change.model_dump_json()),
                 "record pending promotion")
    _apply(client, name, change)
    with_retries(lambda: client.delete_registered_model_tag(name, PENDING_TAG), "clear pending promotion")


def repair_pending_promotion(client: MlflowClient, name: str) -> bool:
    """Finish a champion change that a dead process left half-done (call under the registry lock).
    True when there was one."""
    try:
        tags = client.get_registered_model(name).tags or {}
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    if PENDING_TAG not in tags:
        return False
    change = ChampionChange.model_validate_json(tags[PENDING_TAG])
    logger.warning("model %s: finishing a champion change that was interrupted (%s)", name, change.event)
    _apply(client, name, change)
    with_retries(lambda: client.delete_registered_model_tag(name, PENDING_TAG), "clear pending promotion")
    return True


def _apply(client: MlflowClient, name: str, change: ChampionChange) -> None:
    """The writes of `change`; each one can be repeated without harm."""
    with_retries(lambda: client.set_registered_model_alias(name, CHAMPION, change.champion), "alias")
    if change.previous is None:
        _delete_alias(client, name, PREVIOUS_CHAMPION)
    else:
        with_retries(lambda: client.set_registered_model_alias(name, PREVIOUS_CHAMPION, change.previous),
                     "alias")
    for version, tags in change.version_tags.items():
        _set_version_tags(client, name, version, tags)
    _append_history(client, name, {"event": change.event, "at": change.at})


def _delete_alias(client: MlflowClient, name: str, alias: str) -> None:
    try:
        client.delete_registered_model_alias(name, alias)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise


def _set_version_tags(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        with_retries(lambda k=key, v=value: client.set_model_version_tag(name, version, k, v), "tag")


def _append_history(client: MlflowClient, name: str, entry: dict[str, str]) -> None:
    history = json.loads((client.get_registered_model(name).tags or {}).get(HISTORY_TAG, "[]"))
    if history and history[-1] == entry:  # a repair repeating the last write
        return
    history = [*history, entry][-HISTORY_LENGTH:]
    with_retries(lambda: client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history)), "history")


# ------------------------------------------------------------------------------------ the gate


def promote_if_better(
    name: str,
    version: str,
    *,
    policy: GatePolicy | None = None,
    candidate_fd: float | None = None,
    eval_key: str | None = None,
    reevaluate_champion: Callable[[str], float] | None = None,
    force: bool = False,
    tracking_uri: str | None = None,
    lock_dir: Path | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> PromotionDecision:
    """Make `version` the champion if the gate (`gate.decide`) says so under `policy` (default:
    RegistryConfig's), or unconditionally with `force`.

    candidate_fd / eval_key default to the version's `eval_fd` / `eval_key` tags; precision and
    recall come from its tags. A champion whose data spec differs from the candidate's is not
    measured: the candidate is rejected as not comparable. Otherwise the champion's FD is its
    recorded tag when that is a valid number under the same eval key (same dataset, feature network
    and eval settings), else `reevaluate_champion(model_uri) -> fd` is called (RegistryError if not
    given). The champion is measured without the registry lock held; under the lock it is re-read,
    and if another process changed it meanwhile the new champion is measured and the gate retried.
    """
    client = client_for(tracking_uri)
    policy = policy or RegistryConfig().gate_policy()
    candidate = version_info(client.get_model_version(name, str(version)))
    scores = _recorded_scores(candidate.tags, candidate_fd)
    eval_key = eval_key or candidate.tags.get(EVAL_KEY_TAG)
    measured: dict[str, _ChampionMeasure] = {}  # champion version -> its measure
    champion = version_by_alias(client, name, CHAMPION)
    for _ in range(GATE_ATTEMPTS):
        if champion is not None and not force and champion.version not in (candidate.version, *measured):
            measured[champion.version] = _measure_champion(client, champion, candidate, eval_key,
                                                           reevaluate_champion)
        with registry_lock(client.tracking_uri, lock_dir, lock_timeout_s):
            repair_pending_promotion(client, name)
            current = version_by_alias(client, name, CHAMPION)
            if _version_of(current) == _version_of(champion):
                decision = _decide(client, candidate, current, scores,
                                   measured.get(_version_of(current) or ""), policy, force)
                break
        logger.info("gate: champion of %s changed from %s to %s while it was measured; measuring again",
                    name, _version_of(champion), _version_of(current))
        champion = current
    else:
        raise RegistryError(f"gate: the champion of {name!r} changed {GATE_ATTEMPTS} times while version "
                            f"{candidate.version} was being gated; nothing was promoted",
                            hint="other promotions are running against this model; retry when they finish")
    logger.info("gate %s version %s: %s (%s)", name, version, decision.action, decision.reason)
    return decision


def _recorded_scores(tags: dict[str, str], fd: float | None) -> CandidateScores:
    """The candidate's evaluation from its version tags (`fd` overrides the recorded eval_fd)."""
    return CandidateScores(
        fd=fd if fd is not None else parse_score(tags.get(FD_TAG)),
        precision=parse_score(tags.get(PRECISION_TAG)), recall=parse_score(tags.get(RECALL_TAG)),
        copy_share=parse_score(tags.get(COPY_SHARE_TAG)), feature_kind=tags.get(FEATURE_KIND_TAG),
        feature_accuracy=parse_score(tags.get(FEATURE_ACCURACY_TAG)),
        feature_chance=parse_score(tags.get(FEATURE_CHANCE_TAG)),
        feature_p_value=parse_score(tags.get(FEATURE_P_VALUE_TAG)))


def promote(name: str, version: str, *, force: bool = False, policy: GatePolicy | None = None,
            tracking_uri: str | None = None, lock_dir: Path | None = None,
            lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> PromotionDecision:
    """Promote with the recorded numbers (no re-evaluation), or unconditionally with `force`."""
    return promote_if_better(name, version, policy=policy, force=force, tracking_uri=tracking_uri,
                             lock_dir=lock_dir, lock_timeout_s=lock_timeout_s)


@dataclass(frozen=True)
class _ChampionMeasure:
    """The champion as the gate sees it: its FD and where that came from ("recorded",
    "re-evaluated"), or the data-spec fields that make it incomparable (then no FD)."""

    fd: float | None
    source: str
    spec_differences: tuple[str, ...] = ()


def _measure_champion(client: MlflowClient, champion: ModelVersionInfo, candidate: ModelVersionInfo,
                      eval_key: str | None, reevaluate: Callable[[str], float] | None) -> _ChampionMeasure:
    differences = spec_differences(version_data_spec(client, candidate), version_data_spec(client, champion))
    if differences:
        logger.info("gate: champion version %s has another data spec (%s): not measured, not compared",
                    champion.version, ", ".join(differences))
        return _ChampionMeasure(None, "", tuple(differences))
    return _ChampionMeasure(*_champion_fd(champion, eval_key, reevaluate))


def _champion_fd(
    mv: ModelVersionInfo, eval_key: str | None, reevaluate: Callable[[str], float] | None
) -> tuple[float, str]:
    """The champion's FD under the candidate's eval settings: the recorded number when its eval key
    matches and it is a valid FD, else a fresh evaluation (reevaluate(model_uri) -> fd)."""
    recorded = parse_score(mv.tags.get(FD_TAG))
    if (recorded is not None and valid_fd(recorded) and eval_key is not None
            and mv.tags.get(EVAL_KEY_TAG) == eval_key):
        return recorded, "recorded"
    if reevaluate is None:
        raise RegistryError(
            f"gate: champion version {mv.version} has no valid FD recorded under the candidate's eval_key; "
            "its FD is not comparable",
            hint="re-evaluate the champion on the same data (pass a dataset to promote) or use --force")
    logger.info("gate: re-evaluating champion version %s with the candidate's settings", mv.version)
    return float(reevaluate(f"models:/{mv.name}/{mv.version}")), "re-evaluated"


def _version_of(mv: ModelVersionInfo | None) -> str | None:
    return None if mv is None else mv.version


def _decide(client: MlflowClient, candidate: ModelVersionInfo, champion: ModelVersionInfo | None,
            scores: CandidateScores, champion_measure: _ChampionMeasure | None, policy: GatePolicy,
            force: bool) -> PromotionDecision:
    """Apply the gate (call under the registry lock): move the aliases and record the decision."""
    if champion is not None and champion.version == candidate.version:
        return PromotionDecision(name=candidate.name, action="unchanged", champion_version=champion.version,
                                 previous_champion_version=champion.tags.get(PREVIOUS_CHAMPION),
                                 candidate_version=candidate.version, candidate_fd=scores.fd,
                                 reason="already champion")
    measure = champion_measure or _ChampionMeasure(None, "")
    champion_fd, source = measure.fd, measure.source
    verdict = decide(scores, champion_fd, policy, force, measure.spec_differences)
    previous = _version_of(champion)
    decision = PromotionDecision(
        name=candidate.name, action=verdict.action,
        champion_version=previous if verdict.action == "rejected" else candidate.version,
        previous_champion_version=previous, candidate_version=candidate.version,
        candidate_fd=scores.fd, champion_fd=champion_fd,
        reason=f"{verdict.reason} (champion fd {source})" if source else verdict.reason)
    tags = _decision_tags(decision, policy)
    if decision.promoted:
        if previous is not None:
            tags[PREVIOUS_CHAMPION] = previous
        change_champion(client, candidate.name, ChampionChange(
            champion=candidate.version, previous=previous, version_tags={candidate.version: tags},
            event=f"{decision.action}:{candidate.version}"))
    else:
        _set_version_tags(client, candidate.name, candidate.version, tags)
    _record_in_run(client, candidate.run_id, decision, tags)
    describe_version(client, candidate.name, candidate.version, candidate.tags, gate_outcome(decision))
    return decision


def _decision_tags(decision: PromotionDecision, policy: GatePolicy) -> dict[str, str]:
    tags = {"gate.decision": decision.action, "gate.reason": decision.reason,
            "gate.margin": repr(policy.margin),
            "gate.champion_version": decision.previous_champion_version or "none",
            "gate.decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    numbers = {"gate.candidate_fd": decision.candidate_fd, "gate.champion_fd": decision.champion_fd}
    tags.update({k: repr(v) for k, v in numbers.items() if v is not None})
    return tags


def _record_in_run(client: MlflowClient, run_id: str | None, decision: PromotionDecision,
                   tags: dict[str, str]) -> None:
    if not run_id:
        return
    for key, value in tags.items():
        if key.startswith("gate."):
            client.set_tag(run_id, key, value)
    numbers = {"gate_candidate_fd": decision.candidate_fd, "gate_champion_fd": decision.champion_fd,
               "gate_promoted": float(decision.promoted)}
    for key, value in numbers.items():
        if value is not None:
            client.log_metric(run_id, key, value)


# ------------------------------------------------------------------------------------ rollback


def rollback(name: str, tracking_uri: str | None = None, lock_dir: Path | None = None,
             lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> PromotionDecision:
    """Move `champion` back to the version it replaced (the current champion's `previous_champion`
    tag); repeated rollbacks walk further back along the chain."""
    client = client_for(tracking_uri)
    with registry_lock(client.tracking_uri, lock_dir, lock_timeout_s):
        repair_pending_promotion(client, name)
        current = version_by_alias(client, name, CHAMPION)
        if current is None:
            raise RegistryError(f"rollback: model {name!r} has no champion")
        previous = current.tags.get(PREVIOUS_CHAMPION)
        if previous is None:
            raise RegistryError(f"rollback: champion version {current.version} of {name!r} has no previous "
                                "champion to roll back to")
        restored = version_info(client.get_model_version(name, previous))
        before_previous = restored.tags.get(PREVIOUS_CHAMPION)
        change_champion(client, name, ChampionChange(
            champion=previous, previous=before_previous,
            version_tags={current.version: {"rollback.replaced_by": previous},
                          previous: {"rollback.restored_from": current.version}},
            event=f"rolled_back:{previous}"))
        describe_version(client, name, current.version, current.tags,
                         f"rolled back: v{previous} is champion again")
        describe_version(client, name, previous, restored.tags,
                         f"champion again by rollback from v{current.version}")
    logger.info("rolled back %s: champion %s -> %s", name, current.version, previous)
    return PromotionDecision(name=name, action="rolled_back", champion_version=previous,
                             previous_champion_version=before_previous, candidate_version=current.version,
                             reason=f"rollback from version {current.version}")
