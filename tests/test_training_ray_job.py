"""Training submitted as a Ray Job when the Ray address is a cluster's dashboard URL.

Real components: a Ray cluster started with `ray start` and token authentication, its dashboard
on a free loopback port (the Jobs API a Prefect worker reaches on a cluster; this process has no
Ray connection to it), Prefect's real engine, a real MLflow SQLite store, the
built-in digits. A digits run of a few steps as a job costs about a minute here (the job's driver
imports torch and MLflow, then Ray Train starts its worker), so one run checks submission, log
streaming, the result read back and re-attachment, and one run is cancelled.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_models import TINY_UNET

from diffusion_core.adapters.ray_cluster import job_submission_url
from diffusion_core.adapters.ray_jobs import JobRequest, RayJobError, job_client, run_job, submit_or_attach
from diffusion_core.errors import ConfigError
from diffusion_core.training import TrainConfig
from flows.train_job import RESULT_MARKER, read_result, result_line, training_job_request
from infra.local_cluster import LocalRayCluster, free_port


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    """A one-node cluster started with `ray start`, token authentication on, its dashboard (the
    Jobs API) on a free loopback port: what a Prefect worker submits to, without a Ray connection.
    Three CPUs: the job's training worker, Ray Data's reads, and room for a second job's driver."""
    with LocalRayCluster(num_nodes=1, cpus_per_node=3, dashboard_port=free_port()) as started:
        yield started


@pytest.fixture()
def dashboard(cluster: LocalRayCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """The cluster's dashboard URL; this process holds the cluster's token only as the file that
    RAY_AUTH_TOKEN_PATH names (as a Prefect worker's Secret mount would)."""
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    return cluster.dashboard_url


def job_config(dataset: str, tmp_path: Path, tracking_uri: str, ray_address: str | None,
               **overrides: object) -> TrainConfig:
    base = dict(dataset=dataset, storage_path=str(tmp_path / "ray"), tracking_uri=tracking_uri,
                experiment_name="test-job", unet=TINY_UNET, num_workers=1, cpus_per_worker=1,
                batch_size=16, warmup_steps=1, steps=6, checkpoint_every=3, log_every=2,
                sample_every=None, seed=0, ray_address=ray_address)
    return TrainConfig(**{**base, **overrides})


# --- the rule and the request, without a cluster -----------------------------------------------


@pytest.mark.parametrize(("address", "expected"), [
    ("http://head:8265", "http://head:8265"), ("https://ray.example.org/", "https://ray.example.org"),
    (None, None), ("auto", None), ("10.0.0.5:6379", None), ("ray://head:10001", None),
])
def test_only_a_dashboard_url_submits_jobs(address, expected, monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert job_submission_url(address) == expected


def test_a_dashboard_url_in_ray_address_is_no_driver_connection(monkeypatch) -> None:
    """RAY_ADDRESS follows the same rule; connecting a driver to a dashboard URL is refused with the
    field named, before Ray is started (in a fresh process: this one may be connected already)."""
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert job_submission_url(None) == "http://head:8265"
    code = ("import ray; from diffusion_core.adapters.ray_cluster import connect_ray\n"
            "try:\n    connect_ray()\nexcept Exception as err:\n"
            "    print(type(err).__name__, err, ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert out.startswith("ConfigError ray_address: a dashboard URL") and out.strip().endswith("False")


def test_the_job_request_carries_the_config_as_json_and_no_credentials(tmp_path) -> None:
    config = job_config("/data/digits", tmp_path, "http://mlflow.internal:5000", "http://head:8265",
                        run_name="retrain-abc")
    environ = {"MLFLOW_S3_ENDPOINT_URL": "http://s3:9000", "AWS_SECRET_ACCESS_KEY": "x"}
    request = training_job_request(config, {"prefect.flow_run_id": "f-1"}, environ=environ)
    assert request.submission_id == "retrain-abc"
    words = shlex.split(request.entrypoint)
    assert words[:3] == ["python", "-m", "flows.train_job"]
    sent = TrainConfig.model_validate_json(words[3])
    assert sent == config.model_copy(update={"ray_address": None})  # the job trains on its own cluster
    assert json.loads(words[4]) == {"prefect.flow_run_id": "f-1"}
    assert request.runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
                                               "MLFLOW_S3_ENDPOINT_URL": "http://s3:9000",
                                               "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    repo = Path(__file__).resolve().parent.parent  # this checkout's packages travel with the job
    packages = ("diffusion_core", "flows", "serving")
    assert request.runtime_env["py_modules"] == [str(repo / name) for name in packages]
    assert "__pycache__" in request.runtime_env["excludes"]


@pytest.mark.parametrize("field", ["tracking_uri", "storage_path", "dataset"])
def test_a_uri_with_credentials_is_refused_before_submission(field, tmp_path) -> None:
    uri = "s3://bucket/x?X-Amz-Signature=abc" if field != "tracking_uri" else "http://user:pw@mlflow:5000"
    config = job_config("/data/digits", tmp_path, "http://mlflow:5000", "http://head:8265", run_name="r")
    config = config.model_copy(update={field: uri})
    with pytest.raises(ConfigError, match=rf"^{field}: a URI with credentials") as err:
        training_job_request(config, {}, environ={})
    assert "pw" not in str(err.value) and "abc" not in str(err.value)


def test_the_result_line_round_trips_and_a_missing_one_is_an_error() -> None:
    from diffusion_core.adapters.ray_train import TrainResult

    result = TrainResult(checkpoint_path="s3://b/run/checkpoint_0000006", run_id="abc", run_name="r",
                         metrics={"step": 6, "loss": 0.5})
    unfinished = "(pid=1) Running Dataset: 0 row/s"  # a worker's line left open before the result
    logs = f"INFO flows.train: train: ...\n{unfinished}{result_line(result)}\nINFO ray: end\n"
    assert read_result(logs, "r") == result
    with pytest.raises(RayJobError, match="no training result line"):
        read_result("INFO only logs\n", "r")
    with pytest.raises(RayJobError, match="malformed"):
        read_result(RESULT_MARKER + '{"run_id": 3}\n', "r")


# --- real jobs ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_failed_job_raises_with_its_last_lines_and_a_retry_takes_the_next_attempt(dashboard) -> None:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(AuthenticationError):  # the cluster checks tokens: ours (from the file) passed
        JobSubmissionClient(dashboard)

    base = f"failing-{time.monotonic_ns()}"
    failing = JobRequest(submission_id=base, runtime_env={},
                         entrypoint="python -c \"print('the cause of it'); raise SystemExit(3)\"")
    lines: list[tuple[str, str]] = []
    with pytest.raises(RayJobError, match=r"(?s)failed.*the cause of it"):
        run_job(dashboard, failing, lambda sid, line: lines.append((sid, line)))
    assert (base, "the cause of it") in lines  # streamed as it came
    retry = JobRequest(submission_id=base, runtime_env={}, entrypoint="echo second attempt")
    finished = run_job(dashboard, retry, lambda sid, line: None)
    assert finished.submission_id == f"{base}-2" and "second attempt" in finished.logs
    client = job_client(dashboard)
    assert client.get_job_status(base).value == "FAILED"
    assert submit_or_attach(client, retry) == f"{base}-2"  # succeeded: attached, not resubmitted


@pytest.mark.slow
def test_the_train_flow_runs_a_ray_job_streams_its_logs_and_reattaches(
        dashboard, prefect_harness, mlflow_store, prepared_digits, tmp_path) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from diffusion_core.training import read_training_step
    from flows.train import train

    run_name = f"job-{time.monotonic_ns()}"
    config = job_config(prepared_digits, tmp_path, mlflow_store.tracking_uri, dashboard, run_name=run_name)
    state = train(config, return_state=True)
    result = state.result()
    flow_run_id = state.state_details.flow_run_id

    client = job_client(dashboard)
    ours = [job for job in client.list_jobs() if (job.submission_id or "").startswith(run_name)]
    assert [(job.submission_id, job.status.value) for job in ours] == [(run_name, "SUCCEEDED")]
    assert ours[0].metadata["prefect.flow_run_id"] == str(flow_run_id)

    # The result read back is what the job wrote: its result line, the checkpoint, the MLflow run.
    logs = client.get_job_logs(run_name)
    written = json.loads(next(line for line in logs.splitlines()
                              if line.startswith(RESULT_MARKER)).removeprefix(RESULT_MARKER))  # own line
    assert (result.checkpoint_path, result.run_id, result.run_name) == \
        (written["checkpoint_path"], written["run_id"], run_name)
    assert result.metrics == written["metrics"] and result.metrics["step"] == 6
    assert read_training_step(result.checkpoint_path) == 6
    run = MlflowClient(mlflow_store.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint_path"] == result.checkpoint_path
    assert run.data.tags["prefect.flow_run_id"] == str(flow_run_id)

    # The job's lines reached the flow run's logs in Prefect, with the job id and the dashboard link.
    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as prefect:
        messages = [log.message for log in
                    prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
    assert f"Ray job {run_name}: {dashboard}/#/jobs/{run_name}" in messages
    assert any(m.startswith(f"[{run_name}] ") and "train: 6 steps of 16 images" in m for m in messages)
    assert not any(RESULT_MARKER in m for m in messages)

    # The same run again re-attaches to the finished job: no second job, the same result.
    assert train(config) == result
    assert [job.submission_id for job in client.list_jobs()
            if (job.submission_id or "").startswith(run_name)] == [run_name]


TRAIN_FLOW = """
import sys
from diffusion_core.training import TrainConfig
from flows.train import train
train(TrainConfig.model_validate_json(sys.argv[1]))
"""


@pytest.mark.slow
def test_cancelling_the_flow_run_stops_the_job(dashboard, prefect_harness, mlflow_store, prepared_digits,
                                               tmp_path) -> None:
    """A Prefect worker cancels a flow run by sending its process SIGTERM, which Prefect's engine
    raises as TerminationSignal in the flow's thread: the `train` flow runs in a process of its own
    here, reporting to the test's Prefect server, and gets SIGTERM while its job trains."""
    from prefect.settings import PREFECT_API_URL

    run_name = f"cancelled-{time.monotonic_ns()}"
    config = job_config(prepared_digits, tmp_path, mlflow_store.tracking_uri, dashboard, run_name=run_name,
                        steps=5000, checkpoint_every=5000)
    client = job_client(dashboard)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    flow_process = subprocess.Popen([sys.executable, "-c", TRAIN_FLOW, config.model_dump_json()], env=env)
    try:
        deadline = time.monotonic() + 240
        while _status(client, run_name) != "RUNNING":
            assert flow_process.poll() is None and time.monotonic() < deadline, "the job never ran"
            time.sleep(0.5)
        time.sleep(3)  # the flow is following the job's log now
        flow_process.send_signal(signal.SIGTERM)
        assert flow_process.wait(timeout=120) != 0
        assert _status(client, run_name) == "STOPPED"
    finally:
        if flow_process.poll() is None:
            flow_process.kill()
        if _status(client, run_name) in ("PENDING", "RUNNING"):
            client.stop_job(run_name)


def _status(client, submission_id: str) -> str | None:
    try:
        return client.get_job_status(submission_id).value
    except RuntimeError:
        return None
