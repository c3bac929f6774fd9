"""Training as a Ray Job on a cluster: `train_as_ray_job` submits it, `python -m flows.train_job`
is what the job runs.

    driver (the Prefect worker, the CLI)             the job's driver, on the cluster
    train_as_ray_job(config, dashboard_url)   ->     python -m flows.train_job '<TrainConfig JSON>'
      logs the job's lines as they arrive      <-      trains in-process (flows.train), connected
      reads the result line at the end         <-      to the cluster; prints one result line

The config travels as JSON in the entrypoint (validated by TrainConfig on arrival, never pickled);
the project's code as the job's `py_modules` (diffusion_core, flows, serving: the submitter's
version, not the image's); MLflow's tracking URI in its `env_vars`. All of these are shown by the
dashboard, so a URI with credentials is refused before submission: the job takes credentials from
the cluster's environment (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, AWS_* from the
Secrets of the Ray pods, or the environment of `ray start`).

Why the result comes back as the job's last log line (`RESULT_MARKER` + JSON: checkpoint URI, MLflow
run id, run name, final metrics): the job's log is the one output of a job that the dashboard
serves to any client that can submit, wherever that client runs; the job's driver runs on a
cluster node whose disk the submitter may not see, and Ray Jobs have no other result channel.
The checkpoint itself is already in the run's `storage_path`, which on a multi-node cluster is
shared storage (S3, NFS) that the pipeline's later stages read.

The submission id is the Ray Train run name (the pipeline derives it from the training key, the
CLI from --run-name): a retried or rerun flow, or the same command again, re-attaches to the job
that trains that run instead of starting a second driver of it (`ray_jobs.submit_or_attach`); the
Prefect flow run that submitted it is in the job's metadata and the MLflow run's tags.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from dataclasses import asdict

from pydantic import TypeAdapter, ValidationError

import diffusion_core
import flows
import serving
from diffusion_core.adapters.ray_jobs import JobRequest, RayJobError, project_runtime_env, run_job
from diffusion_core.adapters.ray_train import TrainResult
from diffusion_core.errors import ConfigError
from diffusion_core.redact import has_credentials
from diffusion_core.training import TrainConfig

logger = logging.getLogger(__name__)

RESULT_MARKER = "diffusion-pipeline-train-result: "
ENTRYPOINT_MODULE = "flows.train_job"
PROJECT_PACKAGES = (diffusion_core, flows, serving)
# TrainConfig fields that hold paths or URIs, which the dashboard would show with any credentials.
URI_FIELDS = ("dataset", "storage_path", "tracking_uri", "artifact_location", "warm_start")
# Non-secret settings of this environment that the job needs to reach the same stores.
FORWARDED_ENV = ("MLFLOW_S3_ENDPOINT_URL",)
_RESULT = TypeAdapter(TrainResult)


# --- the submitting side -----------------------------------------------------------------------


def train_as_ray_job(config: TrainConfig, dashboard_url: str,
                     tags: dict[str, str] | None = None) -> TrainResult:
    """Train `config` (its `run_name` set) as a Ray Job on the cluster whose dashboard is at
    `dashboard_url`; logs the job's lines as they arrive; see the module docstring."""
    request = training_job_request(config, tags or {})
    finished = run_job(dashboard_url, request, _log_job_line)
    return read_result(finished.logs, finished.submission_id)


def training_job_request(config: TrainConfig, tags: dict[str, str],
                         environ: dict[str, str] | None = None) -> JobRequest:
    """The job that trains `config`: entrypoint, runtime_env and metadata (module docstring).
    ConfigError when a path or URI of the config carries credentials."""
    import os

    if config.run_name is None:
        raise ConfigError("run_name: a Ray job needs the run's name (it is the job's submission id)")
    for name in URI_FIELDS:
        value = getattr(config, name)
        if value and has_credentials(value):
            raise ConfigError(f"{name}: a URI with credentials cannot go to a Ray job (the Ray dashboard "
                              "shows its configuration); accepted: the URI without them",
                              hint="give the cluster the credentials through its environment "
                              "(MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD, AWS_*)")
    environ = os.environ if environ is None else environ
    job_config = config.model_copy(update={"ray_address": None})  # the job's RAY_ADDRESS: its cluster
    env_vars = {name: environ[name] for name in FORWARDED_ENV if environ.get(name)}
    env_vars["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"  # terminal bars; a job's log is a file
    if config.tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = config.tracking_uri
    entrypoint = shlex.join(["python", "-m", ENTRYPOINT_MODULE, job_config.model_dump_json(),
                             json.dumps(tags, sort_keys=True)])
    return JobRequest(submission_id=config.run_name, entrypoint=entrypoint,
                      runtime_env=project_runtime_env(list(PROJECT_PACKAGES), env_vars),
                      metadata={"diffusion_pipeline.run_name": config.run_name, **tags})


def read_result(logs: str, submission_id: str) -> TrainResult:
    """The TrainResult from the last result line of the job's log."""
    # Output of Ray's workers shares the log and may leave a line unfinished before the result.
    lines = [line.partition(RESULT_MARKER)[2] for line in logs.splitlines() if RESULT_MARKER in line]
    if not lines:
        raise RayJobError(f"Ray job {submission_id} succeeded but its log holds no training result line")
    try:
        return _RESULT.validate_json(lines[-1])
    except ValidationError as err:
        raise RayJobError(f"Ray job {submission_id}: its training result line is malformed "
                          f"({err.error_count()} errors)") from None


def _log_job_line(submission_id: str, line: str) -> None:
    if line.strip() and RESULT_MARKER not in line:
        logger.info("[%s] %s", submission_id, line)


# --- the job's side ----------------------------------------------------------------------------


def result_line(result: TrainResult) -> str:
    return RESULT_MARKER + json.dumps(asdict(result), sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.train_job CONFIG_JSON [TAGS_JSON]`: train in this process's Ray (the
    cluster the job runs on) and print the result line."""
    from flows.cli.console import Verbosity, configure_console, quiet_ray_logs

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        sys.stderr.write("usage: python -m flows.train_job CONFIG_JSON [TAGS_JSON]\n")
        return 2
    # The job's log shows what a terminal shows by default: the project's lines (estimate, progress
    # with ETA) and warnings; Ray workers' output stays in it too (errors of a worker show there).
    configure_console(Verbosity.DEFAULT)  # before Prefect is imported (flows.train)
    quiet_ray_logs(Verbosity.DEFAULT)
    from flows.train_local import train_in_process
    try:
        config = TrainConfig.model_validate_json(args[0])
        tags = TypeAdapter(dict[str, str]).validate_json(args[1] if len(args) == 2 else "{}")
    except ValidationError as err:
        sys.stderr.write(f"flows.train_job: invalid arguments ({err.error_count()} errors)\n")
        return 2
    result = train_in_process(config, tags)
    sys.stdout.write("\n" + result_line(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
