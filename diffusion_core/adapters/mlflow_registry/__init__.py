"""MLflow Model Registry for diffusion checkpoints: register, gate, promote, roll back.

Lifecycle of a registered model's versions, expressed with aliases:

- `candidate`: the most recently registered version (`log_and_register`).
- `champion`: the version that serving loads (`models:/<name>@champion`). A version becomes
  champion through the promotion gate (`promote_if_better`) or `--force` (`promote`).
- `previous_champion`: the champion before the current one; `rollback` walks back the chain.

One module per concern:

    config.py      RegistryConfig (section `registry`), alias and tag names
    errors.py      RegistryError
    gate.py        the gate as a pure function of scores and policy (no MLflow)
    lock.py        the registry lock: per-user host lock, Prefect global concurrency across hosts
    versions.py    reading versions (by number, by alias, all)
    lineage.py     a model's kind of data (DataSpecKey): registrations and the gate stay within it
    description.py the one-line description of each version: what it is, how it was gated
    evaluation_record.py  the evaluation split as a run input, scores as metrics of the logged model on it
    packaging.py   a checkpoint as a pyfunc model with its code, signature and requirements
    pyfunc_model.py  the pyfunc itself (executed by MLflow, never imported)
    register.py    log + register + `candidate` alias
    download.py    a version's checkpoint directory, every registry path kept inside its folder
    promotion.py   champion changes (recoverable), the gate applied, rollback

Concurrency. Registry writes are retried on transient errors (`mlflow_store.with_retries`). The
store assigns version numbers in a transaction, so concurrent registrations never share a
version. Every read-modify-write (new version + alias, promotion, rollback) runs under
`registry_lock` (see lock.py for what it coordinates: this host always, other hosts through a
shared Prefect server). The gate measures the champion (possibly minutes of sampling) before
taking the lock, then re-reads the champion under it and measures again if it changed.
"""

from __future__ import annotations

from diffusion_core.adapters.mlflow_registry.config import (
    CANDIDATE,
    CHAMPION,
    DATA_SPEC_TAG,
    DEFAULT_LOCK_TIMEOUT_S,
    EVAL_KEY_TAG,
    FD_TAG,
    GUIDED_SCALE_TAG,
    PREVIOUS_CHAMPION,
    RegistryConfig,
)
from diffusion_core.adapters.mlflow_registry.download import download_checkpoint
from diffusion_core.adapters.mlflow_registry.errors import RegistryError
from diffusion_core.adapters.mlflow_registry.evaluation_record import EvaluationDataset
from diffusion_core.adapters.mlflow_registry.gate import GatePolicy
from diffusion_core.adapters.mlflow_registry.lineage import (
    DataSpecKey,
    champion_data_spec,
    require_same_lineage,
    suggest_model_name,
)
from diffusion_core.adapters.mlflow_registry.lock import registry_lock
from diffusion_core.adapters.mlflow_registry.packaging import generation_frame
from diffusion_core.adapters.mlflow_registry.promotion import (
    PromotionDecision,
    promote,
    promote_if_better,
    rollback,
)
from diffusion_core.adapters.mlflow_registry.register import log_and_register, log_directory
from diffusion_core.adapters.mlflow_registry.versions import (
    ModelVersionInfo,
    get_version,
    list_versions,
    numeric_tags,
    resolve_version,
)

__all__ = [
    "CANDIDATE", "CHAMPION", "DATA_SPEC_TAG", "DEFAULT_LOCK_TIMEOUT_S", "EVAL_KEY_TAG", "FD_TAG",
    "GUIDED_SCALE_TAG", "PREVIOUS_CHAMPION", "DataSpecKey", "EvaluationDataset", "GatePolicy",
    "ModelVersionInfo",
    "PromotionDecision", "RegistryConfig", "RegistryError", "champion_data_spec", "download_checkpoint",
    "generation_frame", "get_version", "list_versions", "log_and_register", "log_directory", "numeric_tags",
    "promote", "promote_if_better", "registry_lock", "require_same_lineage", "resolve_version", "rollback",
    "suggest_model_name",
]
