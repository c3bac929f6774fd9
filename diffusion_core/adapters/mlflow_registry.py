"""MLflow Model Registry for diffusion checkpoints: register, gate, promote, roll back.

Lifecycle of a registered model's versions, expressed with aliases (stages are deprecated):

- `candidate`: the most recently registered version (`log_and_register`).
- `champion`: the version that serving loads (`models:/<name>@champion`). A version becomes
  champion through the promotion gate (`promote_if_better`) or `--force` (`promote`).
- `previous_champion`: the champion before the current one; every promoted version also carries
  a `previous_champion` tag, so `rollback` can walk back through the whole chain.

Every decision is recorded as tags on the version (`gate.*`, `rollback.*`) and as metrics/tags in
the version's MLflow run, and appended to the registered model's `champion_history` tag.

Concurrency. Registry writes are retried with exponential backoff on transient errors ("database
is locked", a lost version-number race, a 5xx from a server). On top of that:

- Across machines, what keeps concurrent registrations apart is MLflow itself: the store assigns
  version numbers in a transaction, so two registrations never share a version (a lost race is
  retried). Nothing else is coordinated across machines: an alias update is a check-then-set
  (read the champion, decide, move the alias), and two hosts gating at the same moment can both
  decide against the same champion, the last writer winning.
- On one machine, every read-modify-write of the registry (new version + `candidate` alias,
  promotion, rollback) runs under an exclusive file lock (`registry_lock`, fcntl.flock) keyed by
  the tracking URI. The lock is host-local (a `lock_dir` on a filesystem shared by all hosts
  that honours flock extends it), is only held for a few quick registry calls, and is taken with
  a deadline: a holder that never lets go gives a RegistryError naming the lock file, not a
  hang. The gate measures the champion (possibly minutes of sampling) *before* taking the lock,
  then re-reads the champion under the lock and measures again if it changed meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.adapters.mlflow_tracking import default_artifact_location
from diffusion_core.checkpoint import ModelSpec, read_spec
from diffusion_core.errors import CheckpointError, ConfigError, DiffusionPipelineError
from diffusion_core.sampling_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS

logger = logging.getLogger(__name__)

CANDIDATE, CHAMPION, PREVIOUS_CHAMPION = "candidate", "champion", "previous_champion"
FD_TAG = "eval_fd"          # the number the gate compares (lower is better)
EVAL_KEY_TAG = "eval_key"   # metrics.eval_settings_key: FDs are comparable only when keys are equal
HISTORY_TAG = "champion_history"
PYFUNC_CODE = Path(__file__).with_name("mlflow_registry_pyfunc.py")
ARTIFACT_NAME = "checkpoint"
DEFAULT_LOCK_TIMEOUT_S = 300.0  # the lock guards a few registry calls: minutes of waiting means trouble
LOCK_POLL_S = 0.1
GATE_ATTEMPTS = 3  # the champion may change this often while the gate measures it
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "safetensors", "pydantic", "diffusion-pipeline")


class RegistryError(DiffusionPipelineError):
    """The registry is not in a state that allows the requested operation."""


class RegistryConfig(BaseModel):
    """Config section `registry`. MLFLOW_TRACKING_URI fills `tracking_uri`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tracking_uri: str | None = Field(None, description="None -> MLflow's default resolution")
    model_name: str = Field("diffusion-digits", min_length=1)
    experiment_name: str = Field("diffusion-registry", min_length=1)
    gate_margin: float = Field(
        0.02, ge=0.0, lt=1.0,
        description="relative: the candidate must reach fd <= champion_fd * (1 - gate_margin)")
    lock_dir: Path | None = Field(None, description="where registry lock files live; None -> system temp")
    lock_timeout_s: float = Field(DEFAULT_LOCK_TIMEOUT_S, gt=0,
                                  description="how long to wait for another process's registry lock")
    device: str = Field("cpu", description="device the logged pyfunc samples on by default")


class ModelVersionInfo(BaseModel):
    """A registered model version as the rest of the project sees it."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    run_id: str | None

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


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


# ------------------------------------------------------------------------------- locking and retries


def lock_path(tracking_uri: str, lock_dir: Path | None = None) -> Path:
    """The lock file shared by every process on this machine using `tracking_uri`."""
    directory = lock_dir or Path(tempfile.gettempdir()) / "diffusion-pipeline-locks"
    return directory / f"mlflow-registry-{hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def registry_lock(tracking_uri: str, lock_dir: Path | None = None,
                  timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive lock (fcntl.flock) on `lock_path(tracking_uri, lock_dir)`, waited for at most
    `timeout_s` (RegistryError naming the file and its holder's pid after that). The kernel drops
    the lock when its holder exits, so a leftover file never blocks anyone."""
    path = lock_path(tracking_uri, lock_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        _acquire(handle, path, timeout_s)
        try:
            handle.truncate(0)  # the holder's pid, for the timeout message of whoever waits
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _acquire(handle: Any, path: Path, timeout_s: float) -> None:
    """Poll a non-blocking flock until `timeout_s` passes (a blocking flock has no deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise _lock_timeout(path, timeout_s) from None
            time.sleep(LOCK_POLL_S)


def _lock_timeout(path: Path, timeout_s: float) -> RegistryError:
    try:
        holder = f"pid {int(path.read_text().strip())}"
    except (OSError, ValueError):
        holder = "unknown process"
    return RegistryError(
        f"lock: registry lock file {path} still held by {holder} after {timeout_s:g}s",
        hint="another registration, promotion or rollback against this MLflow store is running on this "
             "machine; wait for it, stop it, or raise registry.lock_timeout_s")


T = TypeVar("T")
_TRANSIENT_MARKERS = ("database is locked", "unique constraint", "integrityerror", "temporarily_unavailable",
                      "503", "502", "504", "connection")


def _is_transient(err: MlflowException) -> bool:
    text = f"{err.error_code} {err}".lower()
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def with_retries(call: Callable[[], T], what: str, attempts: int = 6, base_delay_s: float = 0.2) -> T:
    """Run `call`, retrying transient MLflow errors with exponential backoff (0.2 s, 0.4 s, ...)."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except MlflowException as err:
            if attempt == attempts or not _is_transient(err):
                raise
            delay = base_delay_s * 2 ** (attempt - 1)
            logger.warning("%s: transient MLflow error (%s); retry %d/%d in %.1fs", what, err, attempt,
                           attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------- small helpers


def _resolved_uri(tracking_uri: str | None) -> str:
    """`tracking_uri`, or MLflow's own resolution (set_tracking_uri, MLFLOW_TRACKING_URI, default)."""
    return tracking_uri or mlflow.get_tracking_uri()


def _client(tracking_uri: str | None) -> MlflowClient:
    uri = _resolved_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def preserved_mlflow_uris() -> Iterator[None]:
    """On exit, put back MLflow's process-wide tracking and registry URIs exactly as they were: both
    module-level values and the MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI environment variables that
    MLflow's setters also write. A registry URI left behind silently sends a later
    `MlflowClient(tracking_uri=...)` without a registry_uri to that other store."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    saved_env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])  # None unsets the env var; it is put back below
        registry_utils._registry_uri = saved[1]
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _fluent_uri(tracking_uri: str | None) -> Iterator[None]:
    """Point MLflow's fluent API (needed by log_model) and its registry at `tracking_uri` for the
    duration, then put back what was there (`preserved_mlflow_uris`)."""
    if tracking_uri is None:
        yield
        return
    from mlflow.tracking._model_registry import utils as registry_utils

    with preserved_mlflow_uris():
        mlflow.set_tracking_uri(tracking_uri)
        registry_utils._registry_uri = tracking_uri
        yield


def numeric_tags(tags: Mapping[str, str]) -> dict[str, float]:
    """The tags whose values are finite numbers (log_and_register stores evaluation metrics as tags)."""
    metrics = {}
    for key, value in tags.items():
        try:
            number = float(value)
        except ValueError:
            continue
        if math.isfinite(number):
            metrics[key] = number
    return metrics


def _info(mv: ModelVersion) -> ModelVersionInfo:
    return ModelVersionInfo(name=mv.name, version=str(mv.version), aliases=list(mv.aliases or []),
                            tags=dict(mv.tags or {}), run_id=mv.run_id)


def _version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersionInfo | None:
    try:
        return _info(client.get_model_version_by_alias(name, alias))
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def current_git_commit() -> str:
    """HEAD of the git checkout this code runs from, or "unknown" (an installed wheel). Not the
    working directory's: a CLI started elsewhere must still record the code's commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             check=True, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pip_requirements() -> list[str]:
    """Pinned requirements of the logged model, from the installed versions (nothing calls pip)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


# ------------------------------------------------------------------------------------- the pyfunc


def generation_frame(num_images: int, seed: int = 0, labels: list[int] | None = None) -> pd.DataFrame:
    """The pyfunc's predict() input: image i uses seed + i and labels[i] (-1 = unconditional)."""
    if num_images < 1:
        raise ConfigError(f"num_images: must be >= 1, got {num_images}")
    if labels is not None and len(labels) != num_images:
        raise ConfigError(f"labels: expected {num_images} labels (one per image), got {len(labels)}")
    values = [-1] * num_images if labels is None else list(labels)
    return pd.DataFrame({"seed": np.arange(seed, seed + num_images, dtype=np.int64),
                         "label": np.asarray(values, dtype=np.int64)})


def model_signature(spec: ModelSpec) -> ModelSignature:
    """Rows (seed, optional label) in, (N, C, H, W) float32 images in [0, 1] out; sampler settings
    as params (their defaults here are the model's defaults)."""
    inputs = Schema([ColSpec("long", "seed"), ColSpec("long", "label", required=False)])
    shape = (-1, spec.data.channels, spec.data.image_size, spec.data.image_size)
    params = ParamSchema([ParamSpec("steps", "long", DEFAULT_STEPS),
                          ParamSpec("sampler", "string", DEFAULT_SAMPLER),
                          ParamSpec("guidance_scale", "double", 1.0)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype("float32"), shape)]),
                          params=params)


def _log_pyfunc(checkpoint_dir: Path, spec: ModelSpec, device: str) -> tuple[str, str]:
    """Log the checkpoint as a pyfunc in the active run; returns the logged model's URI and id."""
    example = (generation_frame(2, seed=0), {"steps": 2})  # also validated by MLflow: keep it cheap
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(PYFUNC_CODE), artifacts={ARTIFACT_NAME: str(checkpoint_dir)},
        signature=model_signature(spec), input_example=example, pip_requirements=pip_requirements(),
        model_config={"device": device},
    )
    return info.model_uri, info.model_id


def _experiment_id(client: MlflowClient, name: str) -> str:
    """Experiment `name`, created if needed with its artifacts beside a SQLite database
    (mlflow_tracking.default_artifact_location), never in ./mlruns of the working directory."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = default_artifact_location(client.tracking_uri)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # another process created it first
        if experiment is None:
            raise
        return experiment.experiment_id


@contextlib.contextmanager
def _run(client: MlflowClient, run_id: str | None, experiment_name: str) -> Iterator[str]:
    """Activate `run_id` (or a new run in `experiment_name`) in this thread; yields its id."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield run_id
        return
    if run_id is None:
        experiment_id = with_retries(lambda: _experiment_id(client, experiment_name), "experiment")
        run_id = client.create_run(experiment_id, run_name="register").info.run_id
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield run_id


# ------------------------------------------------------------------------------------ registration


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="Denoising diffusion models (diffusion_core)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _version_tags(spec: ModelSpec, run_id: str, tags: Mapping[str, str] | None,
                  metrics: Mapping[str, float] | None) -> dict[str, str]:
    base = {"dataset_fingerprint": spec.data.dataset_fingerprint or "unknown", "training_run_id": run_id,
            "git_commit": current_git_commit()}
    base.update({k: repr(float(v)) for k, v in (metrics or {}).items()})
    base.update({k: str(v) for k, v in (tags or {}).items()})
    return base


def log_and_register(
    checkpoint_dir: str | Path,
    *,
    model_name: str,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    experiment_name: str = "diffusion-registry",
    device: str = "cpu",
    lock_dir: Path | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> ModelVersionInfo:
    """Log `checkpoint_dir` as a pyfunc, register it as a new version of `model_name`, alias it
    `candidate`.

    run_id: the training run to log into (its id becomes the `training_run_id` tag); None creates
    a run in `experiment_name`. metrics (e.g. EvalResult.as_metrics()) are logged to the run and
    copied to version tags; tags (e.g. eval settings, `eval_key`) are added to the version
    (overriding the defaults: dataset_fingerprint from spec.json, training_run_id, git_commit).
    """
    checkpoint_dir = Path(checkpoint_dir)
    spec = read_spec(checkpoint_dir)
    client = _client(tracking_uri)
    with _fluent_uri(tracking_uri), _run(client, run_id, experiment_name) as active_run_id:
        model_uri, model_id = _log_pyfunc(checkpoint_dir, spec, device)
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    version_tags = _version_tags(spec, run_id or active_run_id, tags, metrics)
    # The registry store resolves the `models:/m-...` source through MLflow's *global* tracking
    # URI, so it must point at this store too, not only `client`.
    with registry_lock(_resolved_uri(tracking_uri), lock_dir, lock_timeout_s), _fluent_uri(tracking_uri):
        with_retries(lambda: _ensure_registered_model(client, model_name), "create_registered_model")
        mv = _info(with_retries(lambda: client.create_model_version(
            model_name, model_uri, run_id=active_run_id, tags=version_tags, model_id=model_id),
            "create_model_version"))
        with_retries(lambda: client.set_registered_model_alias(model_name, CANDIDATE, mv.version), "alias")
    logger.info("registered %s version %s (candidate) from %s", model_name, mv.version, checkpoint_dir)
    return _info(client.get_model_version(model_name, mv.version))


def resolve_version(name: str, alias: str, tracking_uri: str | None = None) -> ModelVersionInfo:
    """The version that `models:/<name>@<alias>` points to; RegistryError when there is none."""
    info = _version_by_alias(_client(tracking_uri), name, alias)
    if info is None:
        raise RegistryError(f"alias: model {name!r} has no version with alias {alias!r}",
                            hint=f"register a version (diffusion-pipeline register) or check the name; "
                                 f"aliases used here: {CANDIDATE}, {CHAMPION}, {PREVIOUS_CHAMPION}")
    return info


def get_version(name: str, version: str, tracking_uri: str | None = None) -> ModelVersionInfo:
    return _info(_client(tracking_uri).get_model_version(name, str(version)))


def _checkpoint_artifact_path(model_dir: Path) -> str:
    """Where MLflow put the `checkpoint` artifact inside a downloaded pyfunc model (artifacts/<dir name>)."""
    flavor = mlflow.models.Model.load(str(model_dir / "MLmodel")).flavors.get("python_function", {})
    artifact = flavor.get("artifacts", {}).get(ARTIFACT_NAME)
    if artifact is None:
        raise CheckpointError(f"model_uri: the model at {model_dir} has no {ARTIFACT_NAME!r} artifact; "
                              "it was not logged by log_and_register")
    return artifact["path"]


def download_checkpoint(model_uri: str, dst: Path | None = None, tracking_uri: str | None = None) -> Path:
    """Download the checkpoint directory of `models:/<name>@<alias>` or `models:/<name>/<version>`.

    Returns `dst` (created; it must not exist yet) or a new temp directory. The result loads with
    `checkpoint.load_checkpoint`.
    """
    if not model_uri.startswith("models:/"):
        raise ConfigError(f"model_uri: {model_uri!r} is not a registry URI; accepted: "
                          "models:/<name>@<alias> or models:/<name>/<version>")
    if dst is not None and Path(dst).exists():
        raise ConfigError(f"dst: {dst} already exists; choose a new path")
    staging = Path(tempfile.mkdtemp(prefix="diffusion-model-"))
    try:
        with _fluent_uri(tracking_uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(staging)))
        checkpoint = local / _checkpoint_artifact_path(local)
        read_spec(checkpoint)  # fail here, not at load time, if it is not a checkpoint
        target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="diffusion-checkpoint-"))
        if dst is None:
            target.rmdir()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(checkpoint), str(target))
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------- the gate


def _float_tag(mv: ModelVersionInfo, key: str) -> float | None:
    value = mv.tags.get(key)
    return None if value is None else float(value)


def _champion_fd(
    mv: ModelVersionInfo, eval_key: str | None, reevaluate: Callable[[str], float] | None
) -> tuple[float, str]:
    """The champion's FD under the candidate's eval settings: the recorded number when its eval key
    matches, else a fresh evaluation (reevaluate(model_uri) -> fd)."""
    recorded = _float_tag(mv, FD_TAG)
    if recorded is not None and eval_key is not None and mv.tags.get(EVAL_KEY_TAG) == eval_key:
        return recorded, "recorded"
    if reevaluate is None:
        raise RegistryError(
            f"gate: champion version {mv.version} has no FD recorded under eval_key {eval_key!r} "
            f"(it has {mv.tags.get(EVAL_KEY_TAG)!r}); its FD is not comparable",
            hint="re-evaluate the champion on the same data (pass a dataset to promote) or use --force")
    logger.info("gate: re-evaluating champion version %s with the candidate's settings", mv.version)
    return float(reevaluate(f"models:/{mv.name}/{mv.version}")), "re-evaluated"


def _record(client: MlflowClient, mv: ModelVersionInfo, decision: PromotionDecision, margin: float) -> None:
    """Decision and both numbers -> version tags, the version's run, the model's history tag."""
    tags = {"gate.decision": decision.action, "gate.reason": decision.reason, "gate.margin": repr(margin),
            "gate.champion_version": decision.previous_champion_version or "none",
            "gate.decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    numbers = {"gate.candidate_fd": decision.candidate_fd, "gate.champion_fd": decision.champion_fd}
    tags.update({k: repr(v) for k, v in numbers.items() if v is not None})
    for key, value in tags.items():
        with_retries(lambda k=key, v=value: client.set_model_version_tag(mv.name, mv.version, k, v), "tag")
    if mv.run_id:
        for key, value in tags.items():
            client.set_tag(mv.run_id, key, value)
        for key, value in numbers.items():
            if value is not None:
                client.log_metric(mv.run_id, key.replace(".", "_"), value)
        client.log_metric(mv.run_id, "gate_promoted", float(decision.promoted))
    if decision.action != "rejected":
        _append_history(client, mv.name, f"{decision.action}:{decision.champion_version}")


def _append_history(client: MlflowClient, name: str, entry: str) -> None:
    model = client.get_registered_model(name)
    history = json.loads((model.tags or {}).get(HISTORY_TAG, "[]"))
    history = ([*history, {"event": entry, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}])[-40:]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def _make_champion(client: MlflowClient, name: str, version: str, previous: str | None) -> None:
    client.set_registered_model_alias(name, CHAMPION, version)
    if previous is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, previous)
        client.set_model_version_tag(name, version, PREVIOUS_CHAMPION, previous)


def _gate_action(candidate_fd: float | None, champion_fd: float | None, margin: float,
                 force: bool) -> tuple[str, str]:
    if force:
        return "forced", "forced promotion (--force)"
    if champion_fd is None:
        return "promoted", "no champion yet"
    if candidate_fd is None:
        raise RegistryError(f"gate: the candidate has no {FD_TAG} tag; evaluate it first or use --force")
    threshold = champion_fd * (1 - margin)
    if candidate_fd <= threshold:
        return "promoted", f"fd {candidate_fd:.4g} <= champion {champion_fd:.4g} * (1 - {margin})"
    return "rejected", f"fd {candidate_fd:.4g} > champion {champion_fd:.4g} * (1 - {margin})"


def promote_if_better(
    name: str,
    version: str,
    *,
    margin: float = 0.02,
    candidate_fd: float | None = None,
    eval_key: str | None = None,
    reevaluate_champion: Callable[[str], float] | None = None,
    force: bool = False,
    tracking_uri: str | None = None,
    lock_dir: Path | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> PromotionDecision:
    """Make `version` the champion if its FD beats the champion's by the relative `margin`
    (fd_candidate <= fd_champion * (1 - margin)), or when there is no champion, or with `force`.

    candidate_fd / eval_key default to the version's `eval_fd` / `eval_key` tags. The champion's
    FD is its recorded tag when the eval keys match (same dataset fingerprint and eval settings);
    otherwise `reevaluate_champion(model_uri) -> fd` is called (RegistryError if not given).
    The champion is measured without the registry lock held; under the lock it is re-read, and
    if another process changed it meanwhile the new champion is measured and the gate retried.
    """
    client = _client(tracking_uri)
    candidate = _info(client.get_model_version(name, str(version)))
    candidate_fd = candidate_fd if candidate_fd is not None else _float_tag(candidate, FD_TAG)
    eval_key = eval_key or candidate.tags.get(EVAL_KEY_TAG)
    measured: dict[str, tuple[float, str]] = {}  # champion version -> (fd, source)
    champion = _version_by_alias(client, name, CHAMPION)
    for _ in range(GATE_ATTEMPTS):
        if champion is not None and not force and champion.version not in (candidate.version, *measured):
            measured[champion.version] = _champion_fd(champion, eval_key, reevaluate_champion)
        with registry_lock(_resolved_uri(tracking_uri), lock_dir, lock_timeout_s):
            current = _version_by_alias(client, name, CHAMPION)
            if _version_of(current) == _version_of(champion):
                decision = _decide(client, candidate, current, candidate_fd,
                                   measured.get(_version_of(current) or ""), margin, force)
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


def _version_of(mv: ModelVersionInfo | None) -> str | None:
    return None if mv is None else mv.version


def _decide(client: MlflowClient, candidate: ModelVersionInfo, champion: ModelVersionInfo | None,
            candidate_fd: float | None, champion_measure: tuple[float, str] | None, margin: float,
            force: bool) -> PromotionDecision:
    """Apply the gate (call under the registry lock): move the aliases and record the decision."""
    if champion is not None and champion.version == candidate.version:
        return PromotionDecision(name=candidate.name, action="unchanged", champion_version=champion.version,
                                 previous_champion_version=champion.tags.get(PREVIOUS_CHAMPION),
                                 candidate_version=candidate.version, candidate_fd=candidate_fd,
                                 reason="already champion")
    champion_fd, source = champion_measure if champion_measure is not None else (None, "")
    action, reason = _gate_action(candidate_fd, champion_fd, margin, force)
    previous = _version_of(champion)
    if action != "rejected":
        _make_champion(client, candidate.name, candidate.version, previous)
    decision = PromotionDecision(
        name=candidate.name, action=action,
        champion_version=previous if action == "rejected" else candidate.version,
        previous_champion_version=previous, candidate_version=candidate.version,
        candidate_fd=candidate_fd, champion_fd=champion_fd,
        reason=f"{reason} (champion fd {source})" if source else reason)
    _record(client, candidate, decision, margin)
    return decision


def promote(name: str, version: str, *, force: bool = False, margin: float = 0.02,
            tracking_uri: str | None = None, lock_dir: Path | None = None,
            lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> PromotionDecision:
    """Promote with the recorded FD numbers (no re-evaluation), or unconditionally with `force`."""
    return promote_if_better(name, version, margin=margin, force=force, tracking_uri=tracking_uri,
                             lock_dir=lock_dir, lock_timeout_s=lock_timeout_s)


def rollback(name: str, tracking_uri: str | None = None, lock_dir: Path | None = None,
             lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> PromotionDecision:
    """Move `champion` back to the version it replaced (the current champion's `previous_champion`
    tag); repeated rollbacks walk further back along the chain."""
    client = _client(tracking_uri)
    with registry_lock(_resolved_uri(tracking_uri), lock_dir, lock_timeout_s):
        current = _version_by_alias(client, name, CHAMPION)
        if current is None:
            raise RegistryError(f"rollback: model {name!r} has no champion")
        previous = current.tags.get(PREVIOUS_CHAMPION)
        if previous is None:
            raise RegistryError(f"rollback: champion version {current.version} of {name!r} has no previous "
                                "champion to roll back to")
        client.set_registered_model_alias(name, CHAMPION, previous)
        before_previous = client.get_model_version(name, previous).tags.get(PREVIOUS_CHAMPION)
        if before_previous is None:
            client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
        else:
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, before_previous)
        client.set_model_version_tag(name, current.version, "rollback.replaced_by", previous)
        client.set_model_version_tag(name, previous, "rollback.restored_from", current.version)
        _append_history(client, name, f"rolled_back:{previous}")
    logger.info("rolled back %s: champion %s -> %s", name, current.version, previous)
    return PromotionDecision(name=name, action="rolled_back", champion_version=previous,
                             previous_champion_version=before_previous, candidate_version=current.version,
                             reason=f"rollback from version {current.version}")


def log_directory(run_id: str, local_dir: Path, artifact_path: str, tracking_uri: str | None = None) -> None:
    """Upload `local_dir` as artifacts of `run_id` (e.g. the cached feature classifier)."""
    with_retries(lambda: _client(tracking_uri).log_artifacts(run_id, str(local_dir), artifact_path),
                 "log_artifacts")


def list_versions(name: str, tracking_uri: str | None = None) -> list[ModelVersionInfo]:
    """All versions of `name`, oldest first."""
    versions = _client(tracking_uri).search_model_versions(f"name = '{name}'")
    return sorted((_info(mv) for mv in versions), key=lambda v: int(v.version))


def describe(info: ModelVersionInfo) -> dict[str, Any]:
    """A JSON-friendly summary for CLIs and flow results."""
    return {**info.model_dump(), "model_uri": info.model_uri}


__all__ = [
    "CANDIDATE", "CHAMPION", "DEFAULT_LOCK_TIMEOUT_S", "PREVIOUS_CHAMPION", "ModelVersionInfo",
    "PromotionDecision", "RegistryConfig", "RegistryError", "download_checkpoint", "generation_frame",
    "get_version", "list_versions", "log_and_register", "log_directory", "promote", "promote_if_better",
    "registry_lock", "resolve_version", "rollback",
]
