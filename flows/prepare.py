"""Prefect flow `prepare_dataset`: source -> versioned Parquet dataset, with caching and artifacts.

    fingerprint the source (cheap)  ->  write the dataset (cached on source fingerprint + config)
    ->  publish a summary table and a grid of examples as artifacts  ->  return uri + manifest

The cache only skips work whose output is still there: a cache hit whose dataset has since been
removed or replaced is recomputed.
"""

from __future__ import annotations

import base64

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.manifest import read_manifest
from diffusion_core.data.prepare import PrepareResult, prepare, summary_rows
from diffusion_core.data.readers import read_examples
from diffusion_core.data.sources import open_source
from diffusion_core.errors import DiffusionPipelineError
from diffusion_core.images import encode_png, make_grid

EXAMPLE_COUNT = 64


def _retry_unless_user_error(task: object, task_run: TaskRun, state: State) -> bool:
    """Retry transient failures (I/O, network); a bad source or parameter fails at once."""
    try:
        state.result()
    except DiffusionPipelineError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_unless_user_error)
def fingerprint_source(config: PrepareConfig) -> str:
    """Cheap identity of the source: content hash (digits, NumPy, Parquet) or file list + sizes + mtimes."""
    return open_source(config.source, config.parameters()).fingerprint()


@task(
    cache_policy=INPUTS,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_unless_user_error,
)
def write_dataset(config: PrepareConfig, source_fingerprint: str) -> PrepareResult:
    """Prepare the dataset; cached on (config, source fingerprint)."""
    return prepare(config)


@task
def publish_artifacts(result: PrepareResult, cache_hit: bool) -> None:
    rows = summary_rows(result)
    rows.insert(0, {"item": "prefect cache", "value": "hit" if cache_hit else "miss"})
    create_table_artifact(rows, key="dataset-summary", description="Prepared dataset summary")
    grid = make_grid(read_examples(result.uri, EXAMPLE_COUNT), nrow=8)
    png = base64.b64encode(encode_png(grid)).decode()
    create_markdown_artifact(
        f"### Dataset `{result.manifest.fingerprint[:12]}`: first {EXAMPLE_COUNT} training images\n\n"
        f"![examples](data:image/png;base64,{png})\n",
        key="dataset-examples",
        description="Example images of the prepared dataset",
    )


def _still_published(result: PrepareResult) -> bool:
    try:
        return read_manifest(result.uri).fingerprint == result.manifest.fingerprint
    except DiffusionPipelineError:
        return False


@flow(name="prepare-dataset")
def prepare_dataset(config: PrepareConfig) -> PrepareResult:
    """Prepare `config.source` into `config.output`; returns the dataset URI and manifest."""
    source_fingerprint = fingerprint_source(config)
    state = write_dataset(config, source_fingerprint, return_state=True)
    result = state.result()
    cache_hit = state.name == "Cached"
    if cache_hit and not _still_published(result):
        get_run_logger().info("cached dataset at %s is gone or replaced; preparing it again", result.uri)
        result = write_dataset.with_options(refresh_cache=True)(config, source_fingerprint)
        cache_hit = False
    publish_artifacts(result, cache_hit)
    # A cache hit means the identical dataset is already published: report it as reused.
    return result.model_copy(update={"reused": True}) if cache_hit else result
