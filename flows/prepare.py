"""Prefect flow `prepare_dataset`: source -> versioned Parquet dataset, with retries and artifacts.

    prepare (skipped when the published manifest already has this source's fingerprint and these
    parameters, unless forced)  ->  summary table and a grid of examples as artifacts
    ->  return uri + manifest

Whether the dataset is up to date is decided in one place, `diffusion_core.data.prepare.prepare`,
which reads the published manifest: a dataset that was removed or replaced is rebuilt, and no
Prefect cache can return a result whose files are gone.
"""

from __future__ import annotations

import base64

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.prepare import PrepareResult, prepare, summary_rows
from diffusion_core.data.readers import read_examples
from diffusion_core.errors import DiffusionPipelineError
from diffusion_core.images import encode_png, make_grid
from diffusion_core.redact import redact_uri
from flows.prefect_logs import project_logs_to_prefect
from flows.progress import RateLog

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


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_unless_user_error)
def write_dataset(config: PrepareConfig, force: bool) -> PrepareResult:
    """Prepare the dataset unless its manifest says it is up to date (or `force`), logging progress."""
    from diffusion_core.data.sources import open_source

    total = open_source(config.source, config.parameters()).count_hint()
    return prepare(config, force=force, progress=RateLog("prepare: read", total).update)


@task
def publish_artifacts(result: PrepareResult) -> None:
    rows = [{**row, "value": redact_uri(row["value"])} for row in summary_rows(result)]
    create_table_artifact(rows, key="dataset-summary", description="Prepared dataset summary")
    grid = make_grid(read_examples(result.uri, EXAMPLE_COUNT), nrow=8)
    png = base64.b64encode(encode_png(grid)).decode()
    create_markdown_artifact(
        f"### Dataset `{result.manifest.fingerprint[:12]}`: first {EXAMPLE_COUNT} training images\n\n"
        f"![examples](data:image/png;base64,{png})\n",
        key="dataset-examples",
        description="Example images of the prepared dataset",
    )


@flow(name="prepare-dataset")
def prepare_dataset(config: PrepareConfig, force: bool = False) -> PrepareResult:
    """Prepare `config.source` into `config.output` (rebuilt even when up to date with `force`);
    returns the dataset URI and manifest, `reused` when the published dataset was kept."""
    with project_logs_to_prefect():
        result = write_dataset(config, force)
        publish_artifacts(result)
        return result
