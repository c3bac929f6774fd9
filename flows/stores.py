"""Finding the registered model a command needs, and saying where it is when it is not where asked.

Commands look in one MLflow store (the pipeline's, `PipelineConfig.resolved_tracking_uri`). When
the model is not there, the error names that store and, if a local store nearby holds the model
(an `mlflow.db` in the working directory or up to two folders below it, such as
`./diffusion-pipeline-work/mlflow.db` or another run's `--work-dir`), the flag that points at it.
A SQLite store that does not exist is reported as such and never created by looking.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from diffusion_core.adapters.mlflow_registry import ModelVersionInfo, RegistryError
from diffusion_core.errors import ConfigError
from diffusion_core.redact import redact_uri

logger = logging.getLogger(__name__)

STORE_FILE = "mlflow.db"
SEARCH_DEPTH = 2
_SKIPPED_DIRS = frozenset({".git", ".venv", "venv", "node_modules", "__pycache__", "mlartifacts",
                           "ray_results", "datasets"})


def registered_version(model_name: str, tracking_uri: str, alias: str | None = None,
                       version: str | None = None) -> ModelVersionInfo:
    """The version `version` of `model_name` (else the one `alias` points to) in `tracking_uri`;
    ConfigError naming the store, and a nearby store that holds the model, when there is none."""
    from mlflow.exceptions import MlflowException

    from diffusion_core.adapters.mlflow_registry import get_version, resolve_version

    wanted = f"{model_name} version {version}" if version else f"{model_name}@{alias}"
    missing_file = _missing_sqlite_file(tracking_uri)
    if missing_file is None:
        try:
            return get_version(model_name, version, tracking_uri) if version else \
                resolve_version(model_name, alias or "champion", tracking_uri)
        except (RegistryError, MlflowException):
            pass
    where = (f"no MLflow store at {missing_file} (the file does not exist)" if missing_file
             else f"not in the MLflow store {redact_uri(tracking_uri)}")
    raise ConfigError(f"model: {wanted} is {where}", hint=_nearby_hint(model_name, alias, tracking_uri))


def _missing_sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI when it does not exist (opening it would create an
    empty store), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
    return None if path.is_file() else path


def _nearby_hint(model_name: str, alias: str | None, tracking_uri: str) -> str:
    here = Path.cwd()
    holders = [(db, names) for db, names in _nearby_models(here, tracking_uri) if names]
    for db, names in holders:
        if model_name in names:
            return (f"the store {db} holds {model_name}: pass --work-dir {_relative(db.parent, here)} "
                    f"(or --tracking-uri sqlite:///{db})")
    if holders:
        db, names = holders[0]
        return (f"the store {db} holds {', '.join(sorted(names))}: pass --model-name and "
                f"--work-dir {_relative(db.parent, here)}")
    return ("no MLflow store in this folder holds a model: train and register one with "
            "`diffusion-pipeline run` (or point --work-dir / --tracking-uri at the store that has it)")


def _nearby_models(root: Path, exclude_uri: str) -> Iterator[tuple[Path, set[str]]]:
    """(store file, registered model names) of the SQLite stores under `root`."""
    from mlflow import MlflowClient

    excluded = exclude_uri.removeprefix("sqlite:///").split("?")[0]
    for db in _store_files(root, SEARCH_DEPTH):
        if str(db) == str(Path(excluded).resolve()) or db.stat().st_size == 0:
            continue
        try:
            names = {m.name for m in MlflowClient(f"sqlite:///{db}").search_registered_models()}
        except Exception as err:  # noqa: BLE001 - a file of that name that is not a usable store
            logger.debug("%s is not a readable MLflow store: %s", db, type(err).__name__)
            continue
        yield db, names


def _store_files(folder: Path, depth: int) -> Iterator[Path]:
    candidate = folder / STORE_FILE
    if candidate.is_file():
        yield candidate.resolve()
    if depth == 0:
        return
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in _SKIPPED_DIRS
                          and not p.name.startswith("."))
    except OSError:
        return
    for child in children:
        yield from _store_files(child, depth - 1)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base)) or "."
    except ValueError:
        return str(path)
