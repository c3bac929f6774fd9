"""Downloading a registered version's checkpoint directory.

Everything read from the registry is untrusted: the version's files and its `MLmodel` can be
written by anyone who can register a version. Every path taken from them is resolved (symlinks
included) and must stay inside the folder it belongs to, so a crafted model cannot make the
download move or delete anything outside its own staging folder.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import mlflow
from mlflow import MlflowClient

from diffusion_core.adapters.mlflow_registry.packaging import ARTIFACT_NAME
from diffusion_core.adapters.mlflow_store import client_for
from diffusion_core.checkpoint import SPEC_FILE, ModelSpec, read_spec
from diffusion_core.errors import CheckpointError, ConfigError

_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))")


def download_checkpoint(model_uri: str, dst: Path | None = None, tracking_uri: str | None = None) -> Path:
    """Download the checkpoint directory of `models:/<name>@<alias>` or `models:/<name>/<version>`.

    Returns `dst` (created; it must not exist yet) or a new temp directory. The result loads with
    `checkpoint.load_checkpoint`.
    """
    if dst is not None and Path(dst).exists():
        raise ConfigError("dst: already exists; choose a new path")
    client = client_for(tracking_uri)
    source = client.get_model_version_download_uri(*_name_and_version(client, model_uri))
    staging = Path(tempfile.mkdtemp(prefix="diffusion-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging),
                                                         tracking_uri=client.tracking_uri))
        model_dir = inside(staging, local, "model_uri: the downloaded model")
        checkpoint = inside(model_dir, model_dir / _checkpoint_artifact_path(model_dir),
                            f"MLmodel: artifact {ARTIFACT_NAME!r}")
        read_spec(checkpoint)  # fail here, not at load time, if it is not a checkpoint
        target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="diffusion-checkpoint-"))
        if dst is None:
            target.rmdir()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(checkpoint), str(target))
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_spec(client: MlflowClient, name: str, version: str) -> ModelSpec:
    """The spec.json of a registered version's checkpoint, without its weights: two small files
    (the model's MLmodel, which says where the checkpoint artifact is, and the spec itself)."""
    source = client.get_model_version_download_uri(name, str(version)).rstrip("/")
    staging = Path(tempfile.mkdtemp(prefix="diffusion-spec-"))
    try:
        mlmodel = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source}/MLmodel", dst_path=str(staging / "model"),
            tracking_uri=client.tracking_uri))
        model_dir = inside(staging, mlmodel, "model_uri: the downloaded MLmodel").parent
        artifact = _relative_artifact_path(_checkpoint_artifact_path(model_dir))
        spec = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source}/{artifact}/{SPEC_FILE}", dst_path=str(staging / "spec"),
            tracking_uri=client.tracking_uri))
        return read_spec(inside(staging, spec, f"MLmodel: artifact {ARTIFACT_NAME!r}").parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _relative_artifact_path(path: str) -> str:
    """An artifact path from an MLmodel as a relative POSIX path that stays below the model's root."""
    parts = PurePosixPath(path).parts
    if not parts or PurePosixPath(path).is_absolute() or ".." in parts:
        raise CheckpointError(f"MLmodel: artifact {ARTIFACT_NAME!r} must be a relative path inside the model")
    return str(PurePosixPath(*parts))


def inside(root: Path, path: Path, what: str) -> Path:
    """`path` resolved; CheckpointError unless it lies strictly inside `root` (resolved)."""
    base, resolved = root.resolve(), path.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise CheckpointError(f"{what}: its path must stay inside the folder the model was downloaded to")
    return resolved


def _name_and_version(client: MlflowClient, model_uri: str) -> tuple[str, str]:
    match = _MODEL_URI.fullmatch(model_uri)
    if match is None:
        raise ConfigError("model_uri: not a registry URI; accepted: models:/<name>@<alias> or "
                          "models:/<name>/<version>")
    if match["version"] is not None:
        return match["name"], match["version"]
    return match["name"], str(client.get_model_version_by_alias(match["name"], match["alias"]).version)


def _checkpoint_artifact_path(model_dir: Path) -> str:
    """Where MLflow put the `checkpoint` artifact inside a downloaded pyfunc model (artifacts/<dir name>)."""
    flavor = mlflow.models.Model.load(str(model_dir / "MLmodel")).flavors.get("python_function", {})
    artifact = flavor.get("artifacts", {}).get(ARTIFACT_NAME)
    if not isinstance(artifact, dict) or not isinstance(artifact.get("path"), str):
        raise CheckpointError(f"model_uri: the model has no {ARTIFACT_NAME!r} artifact; "
                              "it was not logged by log_and_register")
    return artifact["path"]
