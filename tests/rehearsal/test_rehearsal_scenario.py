"""The rehearsal (issue 11): what the promotion gate decides reaches live traffic on the production
shaped stack, every component real (tests/rehearsal/conftest.py, infra/rehearsal.py).

1. run 1: the `retrain-nightly` deployment of prefect.yaml, triggered through the Prefect API and
   executed by the stack's process worker, trains a tiny digits model on the Ray cluster, registers
   it in MLflow (PostgreSQL, artifacts in S3), the gate makes it champion, and the deploy stage
   starts the Serve app on the cluster: the endpoint answers.
2. run 2 (another seed and length) registers version 2; a strict promotion margin makes the gate
   reject it, so live traffic stays on version 1.
3. `diffusion-pipeline promote 2 --force`: the live endpoint serves version 2 (`/model`, and another
   image for the same request).
4. `diffusion-pipeline rollback` under a concurrent client: version 1 again, the same image as
   before, no failed request.
5. With the alias moved on behind the app's back, a second model replica is added under load
   through Serve's REST API: it loads the pinned version, and every response reports it.

Each step's time is logged, written as JSON under the test's tmp dir and shown in the terminal
summary (conftest.Timeline).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from local_services import free_port
from served_app import LoadClient

from flows.pipeline_config import PipelineConfig
from flows.schedule import RetrainSchedule, deployment_parameters
from serving.config import MODEL_DEPLOYMENT

# The stack's start-up counts against the timeout of the first test that uses it.
pytestmark = [pytest.mark.rehearsal, pytest.mark.slow, pytest.mark.timeout(1800)]
logger = logging.getLogger(__name__)

MODEL = "rehearsal-digits"
APP = "rehearsal"
FLOW = "retrain"  # flows/pipeline.py: @flow(name="retrain")
# A tiny UNet for a few steps: each run trains in seconds; the scenario is about what gets served.
TINY_TRAIN = {
    "steps": 30, "batch_size": 32, "lr": 2e-3, "warmup_steps": 5, "checkpoint_every": 30,
    "log_every": 10, "num_workers": 1, "cpus_per_worker": 1, "num_sample_images": 8,
    "sample_steps": 5, "unet": {"base_channels": 16, "num_res_blocks": 1},
}
# The same request before and after each switch: a version's image for it is reproducible.
PROBE = {"num_images": 2, "labels": [3, 7], "steps": 5, "seed": 1234, "format": "array"}
FLOW_RUN_TIMEOUT_S = 900  # a bound for a stuck run; a flow run takes a minute or two on a quiet machine


@pytest.fixture(scope="module")
def pipeline_ray_address(rehearsal_ray) -> str:
    """The Ray address every pipeline run of the scenario gets (PipelineConfig.ray_address): the
    dashboard URL, so training is submitted as a Ray Job and the deploy stage starts and switches
    the app through Serve's REST API there, as on a production cluster."""
    return rehearsal_ray.dashboard_url


def pipeline_config(work_dir: Path, ray_address: str, serve_port: int, **changes: Any) -> PipelineConfig:
    train = {**TINY_TRAIN, **changes.pop("train", {})}
    return PipelineConfig.model_validate({
        "source": "digits", "work_dir": str(work_dir), "model_name": MODEL, "ray_address": ray_address,
        "serve": True, "train": train,
        # a model of 30 steps is far below the default quality floor; the gate's margin decides
        "registry": {"min_precision": 0.0, "min_recall": 0.0},
        "evaluate": {"num_samples": 40, "steps": 5, "batch_size": 40, "cache_dir": str(work_dir / "fcache"),
                     "feature_net": {"steps": 50}},
        "serving": {"app_name": APP, "route_prefix": "/", "port": serve_port, "max_images_per_batch": 8,
                    "default_steps": 5},
        **changes,
    })


def trigger_retrain(api_url: str, config: PipelineConfig) -> Any:
    """A run of the prefect.yaml deployment with `config` as its parameters, through the Prefect API;
    waits until it is final -> the flow run. Its parameters never carry credentials
    (deployment_parameters refuses them): the worker's environment holds them."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = f"{FLOW}/{RetrainSchedule().deployment_name}"
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        flow_run = run_deployment(name, parameters=deployment_parameters(config), timeout=FLOW_RUN_TIMEOUT_S,
                                  poll_interval=2)
        if not flow_run.state.is_completed():
            pytest.fail(f"flow run {flow_run.name} ended {flow_run.state.type.value}: "
                        f"{flow_run.state.message}\n{flow_run_logs(flow_run.id)}")
    return flow_run


def flow_run_logs(flow_run_id: Any, last: int = 60) -> str:
    """The run's last log lines, as the Prefect UI shows them."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs[-last:])


def cli(env: dict[str, str], *args: str) -> str:
    """`diffusion-pipeline ARGS` in a subprocess with the stack's client environment -> stdout."""
    script = Path(sys.executable).parent / "diffusion-pipeline"
    started = time.monotonic()
    out = subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    logger.info("diffusion-pipeline %s: rc %d in %.1f s\n%s\n%s", args[0], out.returncode,
                time.monotonic() - started, out.stdout[-3000:], out.stderr[-6000:])
    assert out.returncode == 0, f"{args}: rc={out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def model_info(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/model", timeout=60)
    assert response.status_code == 200, response.text[:500]
    return response.json()


def probe_image(url: str) -> tuple[str, np.ndarray]:
    """The served version and its images for PROBE."""
    response = httpx.post(f"{url}/generate", json=PROBE, timeout=120)
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    return body["model"]["version"], np.asarray(body["images"], dtype=np.float32)


def labelled_two_step_image(k: int) -> dict:
    return {"num_images": 1, "labels": [k % 10], "steps": 2, "seed": k}


def wait_for_version(url: str, version: str, timeout_s: float = 60) -> float:
    """Seconds until /model reports `version`."""
    started = time.monotonic()
    while model_info(url)["version"] != version:
        assert time.monotonic() - started < timeout_s, f"/model never reported version {version}"
        time.sleep(0.2)
    return time.monotonic() - started


def test_what_the_gate_decides_reaches_live_traffic(
    rehearsal, rehearsal_env, rehearsal_mlflow, rehearsal_s3, rehearsal_prefect, rehearsal_ray,
    pipeline_ray_address, rehearsal_timeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow import MlflowClient

    from serving.serve_rest import ServeRestClient, declarative_configs

    timeline = rehearsal_timeline
    timeline.add("stack start-up (shared fixture)", rehearsal.startup_s, services=rehearsal.startup_times())
    # This process reads the registry and talks to the dashboard as the stack's clients do.
    for name, value in {**rehearsal_mlflow.client_env(), "RAY_AUTH_MODE": "token",
                        "RAY_AUTH_TOKEN_PATH": str(rehearsal_ray.token_path)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    registry = MlflowClient(tracking_uri=rehearsal_mlflow.tracking_uri)
    cli_env = {**{k: v for k, v in os.environ.items()
                  if not k.startswith(("RAY_", "MLFLOW_", "PREFECT_", "AWS_"))}, **rehearsal_env}
    work_dir = tmp_path / "work"
    serve_port = free_port()
    url = f"http://127.0.0.1:{serve_port}"
    assert RetrainSchedule().deployment_name in rehearsal.deployments.names

    with timeline.step("run 1: retrain via the Prefect deployment (train, register, gate, serve)") as step:
        run_1 = trigger_retrain(rehearsal_prefect.api_url,
                                pipeline_config(work_dir, pipeline_ray_address, serve_port))
        step["flow_run"] = run_1.name
    champion = registry.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1"
    assert champion.tags["prefect.flow_run_id"] == str(run_1.id)
    assert registry.get_run(champion.run_id).data.params["steps"] == str(TINY_TRAIN["steps"])
    # training ran on the cluster as a Ray Job (submitted to the dashboard, not a driver in the flow run)
    from ray.job_submission import JobStatus, JobSubmissionClient

    from diffusion_core.adapters.ray_dashboard import dashboard_headers

    jobs = JobSubmissionClient(rehearsal_ray.dashboard_url, headers=dashboard_headers()).list_jobs()
    assert [job.status for job in jobs if job.submission_id] == [JobStatus.SUCCEEDED]
    # the model's files went through the MLflow server into S3
    keys = [o["Key"] for o in rehearsal_s3.client().list_objects_v2(
        Bucket=rehearsal_s3.bucket, Prefix="mlflow-artifacts/").get("Contents", [])]
    assert any(champion.run_id in key for key in keys), "no artifact of the champion's run in S3"

    with timeline.step("the endpoint answers with version 1"):
        assert model_info(url)["version"] == "1"
        version, v1_images = probe_image(url)
    assert version == "1" and v1_images.shape == (2, 1, 8, 8)
    assert v1_images.min() >= 0.0 and v1_images.max() <= 1.0

    with timeline.step("run 2: another seed and length; the gate rejects it (margin 0.99)") as step:
        run_2 = trigger_retrain(rehearsal_prefect.api_url, pipeline_config(
            work_dir, pipeline_ray_address, serve_port, train={"seed": 1, "steps": 20},
            promotion_margin=0.99))
        step["flow_run"] = run_2.name
    second = registry.get_model_version(MODEL, "2")
    assert second.tags["prefect.flow_run_id"] == str(run_2.id)
    assert str(registry.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert model_info(url)["version"] == "1", "a version the gate rejected reached live traffic"

    with timeline.step("promote 2 (CLI): the live endpoint serves version 2") as step:
        out = cli(cli_env, "promote", "2", "--force", "--model-name", MODEL, "--work-dir", str(work_dir))
        step["switch_s"] = round(wait_for_version(url, "2"), 1)
    assert f"switched  application '{APP}'" in out, out
    version, v2_images = probe_image(url)
    assert version == "2" and v2_images.shape == v1_images.shape
    assert not np.allclose(v2_images, v1_images, atol=1e-3), "version 2 drew version 1's images"

    with timeline.step("rollback (CLI) under load: the live endpoint serves version 1") as step, \
            LoadClient(url, labelled_two_step_image) as load:
        time.sleep(1.0)
        out = cli(cli_env, "rollback", "--model-name", MODEL, "--work-dir", str(work_dir))
        step["switch_s"] = round(wait_for_version(url, "1"), 1)
        time.sleep(1.0)
    step["requests"] = len(load.results)
    assert f"switched  application '{APP}'" in out, out
    assert str(registry.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert load.results and load.failures() == 0, load.summary()
    versions = load.versions()
    assert "1" in versions, "no request reached version 1 during the rollback"
    first_v1 = versions.index("1")
    assert set(versions[:first_v1]) <= {"2"} and set(versions[first_v1:]) == {"1"}
    version, rolled_back_images = probe_image(url)
    assert version == "1"
    np.testing.assert_allclose(rolled_back_images, v1_images, atol=1e-5)  # the same model as before

    with timeline.step("a second model replica added under load serves the pinned version") as step:
        # The alias moves on behind the app's back: a replica resolving it would load version 2.
        registry.set_registered_model_alias(MODEL, "champion", "2")
        moved_at = time.time()
        rest = ServeRestClient(rehearsal_ray.dashboard_url)
        config = declarative_configs(rest.details())[APP]
        next(d for d in config["deployments"] if d["name"] == MODEL_DEPLOYMENT)["num_replicas"] = 2
        seen: dict[str, dict[str, Any]] = {}
        with LoadClient(url, labelled_two_step_image) as load:
            time.sleep(1.0)
            rest.deploy([config])
            rest.wait_for(lambda details: _replicas_running(details, 2), "a second model replica", 240)
            deadline = time.monotonic() + 60
            while len(seen) < 2 and time.monotonic() < deadline:
                info = model_info(url)
                seen[info["replica"]] = info
        step["requests"] = len(load.results)
    replicas = {replica: (info["version"], info["loaded_at"] - moved_at) for replica, info in seen.items()}
    assert len(seen) == 2, f"the new replica never answered: {replicas}"
    assert {version for version, _ in replicas.values()} == {"1"}, replicas
    assert max(after for _, after in replicas.values()) > 0, f"no replica loaded after the move: {replicas}"
    assert load.results and load.failures() == 0, load.summary()
    assert set(load.versions()) == {"1"}


def _replicas_running(details: dict[str, Any], count: int) -> bool | None:
    deployment = details["applications"][APP]["deployments"][MODEL_DEPLOYMENT]
    running = [r for r in deployment["replicas"] if r["state"] == "RUNNING"]
    return True if len(running) == count and deployment["status"] == "HEALTHY" else None
