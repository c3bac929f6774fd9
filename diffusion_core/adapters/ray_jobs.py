"""Ray Jobs: long work submitted to a cluster through its dashboard (`JobSubmissionClient`), the way
Ray recommends running work such as Ray Train on a cluster. The submitting process needs no Ray
connection, only HTTP to the dashboard; the job's driver runs on the cluster and survives the
submitter.

    submit_or_attach   a job per `submission_id`: a job of that id that is running or succeeded
                       is attached to, not submitted again; after a failed or stopped one the next
                       attempt is `<id>-2`, `<id>-3`, ...
    follow_job         the job's log lines, as they arrive, to a logger; waits for the end
    run_job            both, stopping the job when the wait is cancelled

Why attach instead of submit: a Prefect retry of a crashed worker, or a rerun of the same command,
must not start a second driver of the same work while the first still runs (two Ray Train drivers
of one run would write the same checkpoints). Ray refuses a second job with the same submission id,
so the id is the lock.

Cancellation: an interruption of the wait (KeyboardInterrupt, asyncio.CancelledError, Prefect's
TerminationSignal when a flow run is cancelled: every BaseException that is not an Exception)
stops the job. An ordinary error while waiting (the dashboard unreachable for a while) leaves the
job running, so that a retry re-attaches to it.

Authentication: requests carry the Ray token (`ray_dashboard.dashboard_headers`: RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) when there is one.

Everything in a job's runtime_env and entrypoint is shown by the dashboard and `ray job list` to
whoever can read them: no credentials there. The job reads them from the cluster's own environment
(Kubernetes Secrets on the Ray pods, the environment of `ray start`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from diffusion_core.adapters.ray_dashboard import dashboard_headers
from diffusion_core.errors import DiffusionPipelineError
from diffusion_core.redact import redact_uri

logger = logging.getLogger(__name__)

# Uploaded with the project's packages: caches and compiled files are rebuilt on the cluster.
RUNTIME_ENV_EXCLUDES = ("__pycache__", "*.pyc", "*.egg-info")
LAST_LINES = 40  # log lines quoted in the error of a failed job
POLL_S = 1.0
STOP_WAIT_S = 60.0
SUBMIT_RETRY_S = 120.0  # how long a cluster that answers 5xx to a submission is given to get ready
SUBMIT_RETRY_PAUSE_S = 2.0
SERVER_ERROR = "status code 5"


class RayJobError(DiffusionPipelineError):
    """A Ray job failed or was stopped; the message quotes its last log lines."""


@dataclass(frozen=True)
class FinishedJob:
    """A job that succeeded: its submission id (the attempt that ran) and its whole log."""

    submission_id: str
    logs: str


@dataclass(frozen=True)
class JobRequest:
    """One job: the shell command its driver runs, where its code comes from, what the dashboard
    shows beside it (`metadata`), and the resources its driver reserves (None: Ray's default,
    no CPU reserved, as a driver that waits on Ray Train workers needs none)."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None


def project_runtime_env(packages: list[ModuleType], env_vars: dict[str, str]) -> dict[str, Any]:
    """A runtime_env that ships `packages` (this process's copies, whether a source checkout or
    installed) as `py_modules`, so that the job's driver and its Ray workers import the code that
    submitted it, not whatever version the cluster's image holds; third-party libraries come from
    the image. `env_vars` must hold no secrets (the dashboard shows them)."""
    # Paths, not module objects: the Jobs SDK uploads local directories (a module object is only
    # accepted by ray.init's runtime_env).
    paths = [str(Path(package.__file__).parent) for package in packages]
    return {"py_modules": paths, "excludes": list(RUNTIME_ENV_EXCLUDES),
            "env_vars": dict(env_vars)}


def job_client(dashboard_url: str):
    """A JobSubmissionClient for `dashboard_url` that authenticates with the Ray token if any."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_url, headers=dashboard_headers())


def dashboard_job_link(dashboard_url: str, submission_id: str) -> str:
    """The job's page in the Ray dashboard (credentials in the URL redacted)."""
    return f"{redact_uri(dashboard_url.rstrip('/'))}/#/jobs/{submission_id}"


def run_job(dashboard_url: str, request: JobRequest, emit: Callable[[str, str], None]) -> FinishedJob:
    """Submit `request` (or attach to its running or finished job), hand each log line to
    `emit(submission_id, line)` as it arrives and wait for the job to end. RayJobError (with the
    last lines) when it failed or was stopped by someone else; see the module docstring for
    cancellation."""
    client = job_client(dashboard_url)
    submission_id = submit_or_attach(client, request)
    logger.info("Ray job %s: %s", submission_id, dashboard_job_link(dashboard_url, submission_id))
    try:
        status = follow_job(client, submission_id, lambda line: emit(submission_id, line))
    except BaseException as err:
        if not isinstance(err, Exception):  # cancelled; after an error the job goes on (re-attach)
            stop_job(client, submission_id)
        raise
    logs = client.get_job_logs(submission_id)
    if status != "SUCCEEDED":
        info = client.get_job_info(submission_id)
        last = "\n".join(logs.splitlines()[-LAST_LINES:])
        raise RayJobError(f"Ray job {submission_id} {status.lower()}: {info.message}\n"
                          f"last log lines:\n{last}",
                          hint=f"the whole log: {dashboard_job_link(dashboard_url, submission_id)}")
    return FinishedJob(submission_id, logs)


def submit_or_attach(client, request: JobRequest) -> str:
    """The id of the job that does `request`: an existing job of its id (or of a later attempt) that
    is running or succeeded, else a new job under the first free attempt id."""
    deadline = time.monotonic() + SUBMIT_RETRY_S
    attempt = 1
    while True:
        submission_id = request.submission_id if attempt == 1 else f"{request.submission_id}-{attempt}"
        status = _status_or_none(client, submission_id)
        if status in ("FAILED", "STOPPED"):
            attempt += 1
            continue
        if status is not None:
            logger.info("attached to Ray job %s (%s)", submission_id, status)
            return submission_id
        try:
            client.submit_job(entrypoint=request.entrypoint, runtime_env=request.runtime_env,
                              submission_id=submission_id, metadata=request.metadata,
                              entrypoint_num_cpus=request.entrypoint_num_cpus)
        except RuntimeError as err:
            # The SDK reports every refusal as RuntimeError("Request failed with status code N: ...").
            # 5xx: the cluster is not ready yet (its job agent starts after the dashboard), or a
            # concurrent submitter took the id (then the next round attaches to its job).
            if SERVER_ERROR not in str(err) or time.monotonic() > deadline:
                raise
            logger.warning("Ray job %s: the cluster refused the submission for now; retrying", submission_id)
            time.sleep(SUBMIT_RETRY_PAUSE_S)
            continue
        logger.info("submitted Ray job %s", submission_id)
        return submission_id


def _status_or_none(client, submission_id: str) -> str | None:
    """The job's status, or None when the cluster knows no job of that id. The SDK raises the same
    RuntimeError for a missing job as for a refused request; a refused request then fails again,
    with its own message, at submission."""
    try:
        return str(client.get_job_status(submission_id).value)
    except RuntimeError:
        return None


def follow_job(client, submission_id: str, emit: Callable[[str], None]) -> str:
    """Emit the job's log lines as they arrive and return its final status (SUCCEEDED, FAILED,
    STOPPED). The lines are read on a helper thread (the SDK streams them over a websocket with
    asyncio); this thread only waits, so that KeyboardInterrupt and Prefect's cancellation signal
    reach it. If the stream breaks before the job ends, the status is polled instead and the lines
    not yet emitted are read from the whole log at the end."""
    tail = _LogTail(client, submission_id, emit)
    reader = threading.Thread(target=contextvars.copy_context().run, args=(tail.run,),
                              name=f"ray-job-logs-{submission_id}", daemon=True)
    reader.start()
    while reader.is_alive():
        reader.join(timeout=0.5)
    status = _wait_terminal(client, submission_id)
    if tail.broken:
        tail.emit_unseen(client.get_job_logs(submission_id))
    return status


def stop_job(client, submission_id: str, wait_s: float = STOP_WAIT_S) -> None:
    """Ask Ray to stop the job (SIGTERM to its driver, then SIGKILL) and wait until it has."""
    logger.warning("stopping Ray job %s", submission_id)
    client.stop_job(submission_id)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if client.get_job_status(submission_id).is_terminal():
            logger.warning("Ray job %s stopped", submission_id)
            return
        time.sleep(POLL_S)
    logger.error("Ray job %s still runs %.0f s after it was asked to stop", submission_id, wait_s)


def _wait_terminal(client, submission_id: str) -> str:
    while True:
        status = client.get_job_status(submission_id)
        if status.is_terminal():
            return str(status.value)
        time.sleep(POLL_S)


class _LogTail:
    """The job's log, line by line, from `tail_job_logs` (which sends the log from its start, then
    what follows, in chunks that need not end at a line break)."""

    def __init__(self, client, submission_id: str, emit: Callable[[str], None]) -> None:
        self.client, self.submission_id, self.emit = client, submission_id, emit
        self.emitted = 0
        self.broken = False
        self._partial = ""

    def run(self) -> None:
        try:
            asyncio.run(self._pump())
        except Exception as err:  # noqa: BLE001 - the waiting thread falls back to polling
            logger.warning("Ray job %s: log stream interrupted (%s); waiting for the job to end",
                           self.submission_id, type(err).__name__)
            self.broken = True

    async def _pump(self) -> None:
        async for chunk in self.client.tail_job_logs(self.submission_id):
            lines = (self._partial + chunk).split("\n")
            self._partial = lines.pop()
            for line in lines:
                self._emit(line)
        if self._partial:
            self._emit(self._partial)
            self._partial = ""

    def _emit(self, line: str) -> None:
        self.emitted += 1
        self.emit(line.rstrip("\r"))

    def emit_unseen(self, logs: str) -> None:
        for line in logs.splitlines()[self.emitted:]:
            self._emit(line)
