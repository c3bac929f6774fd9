"""A version's evaluation as MLflow records it: the evaluation split as an input of the run, and the
scores as metrics of the logged model on that dataset.

MLflow 3 ties a metric to a logged model (`model_id`) and to a dataset (`dataset_name`,
`dataset_digest`); the Models page then lists each version's scores per dataset, so versions
evaluated on the same split compare side by side. The dataset's digest is its fingerprint (as for
the training input, `mlflow_store.log_dataset`), so two splits of different data never share a
column even when their names agree.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from mlflow import MlflowClient
from mlflow.entities import Metric
from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.adapters.mlflow_store import MAX_DIGEST_CHARS, dataset_name, log_dataset, with_retries
from diffusion_core.redact import redact_uri

EVALUATION_CONTEXT = "evaluation"


class EvaluationDataset(BaseModel):
    """The split a version was evaluated on, as MLflow names it: `<dataset>-<split>`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = Field(min_length=1, description="the prepared dataset's name, e.g. digits")
    split: str = Field(min_length=1, description="the split evaluated on, e.g. val")
    source_uri: str = Field(description="where the dataset lives, credential-free")
    fingerprint: str = Field(min_length=1, description="the prepared dataset's fingerprint")

    @classmethod
    def split_of(cls, dataset_uri: str, fingerprint: str, split: str = "val") -> EvaluationDataset:
        return cls(dataset=dataset_name(dataset_uri), split=split, source_uri=redact_uri(dataset_uri),
                   fingerprint=fingerprint)

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.split}"

    @property
    def digest(self) -> str:
        return self.fingerprint[:MAX_DIGEST_CHARS]


def log_evaluation(client: MlflowClient, run_id: str, model_id: str, metrics: Mapping[str, float],
                   dataset: EvaluationDataset | None) -> None:
    """`metrics` (e.g. EvalResult.as_metrics()) into run `run_id` as metrics of logged model
    `model_id` on `dataset`, which becomes an input of the run (context "evaluation")."""
    if dataset is not None:
        log_dataset(client, run_id, name=dataset.name, source_uri=dataset.source_uri,
                    fingerprint=dataset.fingerprint, context=EVALUATION_CONTEXT)
    if not metrics:
        return
    now = int(time.time() * 1000)
    on = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if dataset is not None else {}
    records = [Metric(key, float(value), now, 0, model_id=model_id, **on) for key, value in metrics.items()]
    with_retries(lambda: client.log_batch(run_id, metrics=records), "log_batch")
