"""Settings, names and error of the registry (config section `registry`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.adapters.mlflow_registry.gate import GatePolicy

CANDIDATE, CHAMPION, PREVIOUS_CHAMPION = "candidate", "champion", "previous_champion"
FD_TAG = "eval_fd"                # the number the gate compares (lower is better)
PRECISION_TAG = "eval_precision"  # the quality floor's numbers
RECALL_TAG = "eval_recall"
COPY_SHARE_TAG = "eval_copy_share"  # memorisation (metrics_memorisation)
GUIDED_SCALE_TAG = "eval_guided_scale"  # the guidance scale of the eval_guided_* numbers
# The evaluation's feature network and its held-out check (metrics.feature_check)
FEATURE_KIND_TAG, FEATURE_P_VALUE_TAG = "eval_feature_kind", "eval_feature_p_value"
FEATURE_ACCURACY_TAG, FEATURE_CHANCE_TAG = "eval_feature_accuracy", "eval_feature_chance"
EVAL_KEY_TAG = "eval_key"         # metrics.eval_settings_key: FDs are comparable only when keys are equal
HISTORY_TAG = "champion_history"
DATA_SPEC_TAG = "data_spec"       # lineage.DataSpecKey as JSON: the data a version generates
SUMMARY_TAG = "model_summary"     # what the model is, in words: the first half of its description
PENDING_TAG = "promotion.pending"  # a champion change that was started and not yet finished
DEFAULT_LOCK_TIMEOUT_S = 300.0     # the lock guards a few registry calls: minutes of waiting means trouble


class RegistryConfig(BaseModel):
    """Config section `registry`. MLFLOW_TRACKING_URI fills `tracking_uri`.

    The quality floor (`min_precision`, `min_recall`, `max_fd`) applies to every promotion by the
    gate, the first one too. Its defaults are on precision and recall (Kynkaenniemi et al. 2019,
    k-NN manifolds in the evaluation's feature space) because those are shares in [0, 1] whatever
    the dataset and feature network, while an FD's scale depends on both. 0.5 means: at least half
    of the samples look like data, and at least half of the data is covered by samples. Measured on
    digits: an untrained model scores precision 0.14 / recall 0.27, the default `run` model about
    0.91 / 0.92.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tracking_uri: str | None = Field(None, description="None -> MLflow's default resolution")
    model_name: str = Field("diffusion-digits", min_length=1)
    experiment_name: str = Field("diffusion-registry", min_length=1)
    gate_margin: float = Field(
        0.02, ge=0.0, lt=1.0,
        description="relative: the candidate must reach fd <= champion_fd * (1 - gate_margin)")
    min_precision: float = Field(0.5, ge=0.0, le=1.0, description="quality floor: eval_precision >= this")
    min_recall: float = Field(0.5, ge=0.0, le=1.0, description="quality floor: eval_recall >= this")
    max_fd: float | None = Field(None, gt=0.0, description="quality floor: eval_fd <= this (None: no bound)")
    max_copy_share: float | None = Field(
        0.3, gt=0.0, le=1.0, description="memorisation: reject when eval_copy_share (share of samples "
        "closer to a training image than 90% of held-out images; fresh data 0.10) is above this; "
        "None: no check")
    max_feature_p_value: float | None = Field(
        0.01, gt=0.0, lt=1.0, description="reject when the feature classifier's held-out accuracy is not "
        "clearly above chance: its one-sided binomial p-value is above this; None: no check")
    untrained_features: Literal["decide", "refuse"] = Field(
        "decide", description="unlabelled data (random, untrained features): decide on them, saying so "
        "in the reason, or refuse (reject unless --force)")
    lock_dir: Path | None = Field(
        None, description="where registry lock files live; None -> a private per-user folder")
    lock_timeout_s: float = Field(DEFAULT_LOCK_TIMEOUT_S, gt=0,
                                  description="how long to wait for another process's registry lock")
    device: str = Field("cpu", description="device the logged pyfunc samples on by default")
    allow_new_data_spec: bool = Field(
        False, description="register a version whose data spec (image size, channels, labels) differs "
        "from the champion's under this model name; for a model the user named explicitly")

    def gate_policy(self) -> GatePolicy:
        return GatePolicy(margin=self.gate_margin, min_precision=self.min_precision,
                          min_recall=self.min_recall, max_fd=self.max_fd, max_copy_share=self.max_copy_share,
                          max_feature_p_value=self.max_feature_p_value,
                          untrained_features=self.untrained_features)
