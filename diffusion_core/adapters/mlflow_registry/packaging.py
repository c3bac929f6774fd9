"""A checkpoint as an MLflow pyfunc model: signature, requirements, the code that runs it.

The model carries its own code: the `diffusion_core` package is copied into the model (MLflow
`code_paths`, put on sys.path by `mlflow.pyfunc.load_model`), so loading needs only the
third-party packages pinned in `pip_requirements`, never a `diffusion-pipeline` distribution
from a package index (a name this project does not own there).

Logging goes through an explicit `MlflowClient` (create the logged model, save it locally, upload
its files, mark it ready) rather than MLflow's fluent `log_model`, which works only on the
process-wide tracking URI and active run.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

import diffusion_core
from diffusion_core.checkpoint import ModelSpec
from diffusion_core.errors import ConfigError
from diffusion_core.sampling_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
ARTIFACT_NAME = "checkpoint"
LOGGED_MODEL_NAME = "model"
# What diffusion_core needs to load a checkpoint and sample; pinned to the versions installed here.
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "safetensors", "pydantic", "pillow")


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
    """Pinned third-party requirements of the logged model, from the installed versions (nothing
    calls pip)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def generation_frame(num_images: int, seed: int = 0, labels: list[int] | None = None) -> pd.DataFrame:
    """The pyfunc's predict() input: image i uses seed + i and labels[i] (-1 = the null label).
    Without labels the frame has no label column: the model draws each image's class from its class
    prior by seed, as a request without labels does over HTTP."""
    if num_images < 1:
        raise ConfigError("num_images: must be >= 1")
    if labels is not None and len(labels) != num_images:
        raise ConfigError(f"labels: expected {num_images} labels (one per image)")
    frame = pd.DataFrame({"seed": np.arange(seed, seed + num_images, dtype=np.int64)})
    if labels is not None:
        frame["label"] = np.asarray(labels, dtype=np.int64)
    return frame


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


def log_pyfunc(client: MlflowClient, experiment_id: str, run_id: str, checkpoint_dir: Path, spec: ModelSpec,
               device: str) -> str:
    """Log `checkpoint_dir` as a pyfunc logged model of run `run_id`; returns the model's id."""
    logged = client.create_logged_model(experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="diffusion-pyfunc-") as tmp:
            local = Path(tmp) / "model"
            save_pyfunc(local, checkpoint_dir, spec, device, code=_code_copy(Path(tmp) / "code"),
                        mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                                           run_id=run_id, model_id=logged.model_id))
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, models=[LoggedModelOutput(logged.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id


def save_pyfunc(path: Path, checkpoint_dir: Path, spec: ModelSpec, device: str, code: Path,
                mlflow_model: Model | None = None) -> None:
    """Write the pyfunc model directory: MLmodel, the checkpoint artifact, the code, requirements."""
    example = (generation_frame(2, seed=0), {"steps": 2})  # MLflow runs it once: keep it cheap
    mlflow.pyfunc.save_model(
        str(path), python_model=str(PYFUNC_CODE), artifacts={ARTIFACT_NAME: str(checkpoint_dir)},
        code_paths=[str(code)], signature=model_signature(spec), input_example=example,
        pip_requirements=pip_requirements(), model_config={"device": device}, mlflow_model=mlflow_model)


def _code_copy(destination: Path) -> Path:
    """A copy of the `diffusion_core` package without byte-code caches, for `code_paths`."""
    source = Path(diffusion_core.__file__).parent
    target = destination / "diffusion_core"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target
