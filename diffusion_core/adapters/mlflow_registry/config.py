"""Settings, names and error of the registry (config section `registry`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.adapters.mlflow_registry.gate import GatePolicy

CANDIDATE, CHAMPION, PREVIOUS_CHAMPION = "candidate", "champion", "previous_champion"
FD_TAG = "eval_fd"                # the number the gate compares (lower is better)
PRECISION_TAG = "eval_precision"  # the quality floor's numbers
RECALL_TAG = "eval_recall"
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
                          min_recall=self.min_recall, max_fd=self.max_fd)
