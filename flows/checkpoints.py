"""Checkpoints as local directories, wherever they are stored: loading, evaluation and registration
read local files.

- `registry_checkpoint`: a registered version, in a temporary directory deleted afterwards.
- `champion_copy`: a registered version kept under the work dir (the workers of a warm start read it).
- `training_checkpoint_copy`: a Ray Train checkpoint, copied from remote storage when Ray Train wrote
  it there (s3://, gs://, ...).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from diffusion_core.checkpoint import SPEC_FILE


@contextmanager
def registry_checkpoint(model_uri: str, tracking_uri: str | None) -> Iterator[Path]:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` downloaded to a temporary directory,
    which is deleted on exit."""
    from diffusion_core.adapters.mlflow_registry import download_checkpoint

    directory = download_checkpoint(model_uri, tracking_uri=tracking_uri)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def champion_copy(model_uri: str, tracking_uri: str | None, dst: Path) -> Path:
    """The registered checkpoint `model_uri` at `dst`, downloaded the first time only."""
    from diffusion_core.adapters.mlflow_registry import download_checkpoint

    return _fetched_once(dst, lambda tmp: download_checkpoint(model_uri, tmp, tracking_uri))


def training_checkpoint_copy(checkpoint: str, work_dir: Path) -> Path:
    """A local directory holding the Ray Train checkpoint `checkpoint`: the path itself when it is
    local, else a copy under `work_dir/checkpoints` made the first time."""
    if "://" not in checkpoint or checkpoint.startswith("file://"):
        return Path(checkpoint.removeprefix("file://"))
    from pyarrow import fs

    def copy(tmp: Path) -> None:
        source, path = fs.FileSystem.from_uri(checkpoint)
        fs.copy_files(path, str(tmp), source_filesystem=source, destination_filesystem=fs.LocalFileSystem())

    return _fetched_once(work_dir / "checkpoints" / Path(checkpoint.rstrip("/")).name, copy)


def _fetched_once(dst: Path, fetch: Callable[[Path], object]) -> Path:
    """`dst`, filled by `fetch(path)` unless it already holds a checkpoint. `fetch` writes into a
    temporary sibling that is renamed into place, so an interrupted fetch never counts as done."""
    if not (dst / SPEC_FILE).is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".download-") as tmp:
            fetch(Path(tmp) / "checkpoint")
            os.replace(Path(tmp) / "checkpoint", dst)
    return dst
