"""Every service of the rehearsal answers as the cluster's would, authentication included.

Ray drivers run in subprocesses: Ray's token loader is process-wide, and this pytest process may hold
a local Ray of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from infra.rehearsal import pool_workers

pytestmark = [pytest.mark.rehearsal, pytest.mark.slow]

# Joins the cluster with the token from the environment; reports the nodes and a task's view of the
# node environment (what the pods would hold: S3 endpoint, MLflow account).
DRIVER = textwrap.dedent("""
    import json, os, ray
    ray.init()
    @ray.remote
    def node_env():
        return {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI")}
    alive = [n for n in ray.nodes() if n["Alive"]]
    print(json.dumps({"nodes": len(alive), "env": ray.get(node_env.remote())}))
    ray.shutdown()
""")

JOBS = textwrap.dedent("""
    import sys
    from ray.job_submission import JobSubmissionClient
    print(len(JobSubmissionClient(sys.argv[1]).list_jobs()))
""")


def _env_without_ray_auth(home: Path, **extra: str) -> dict[str, str]:
    """This environment minus every Ray setting, HOME pointing at an empty dir (no ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _run(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=180)


def test_every_service_answers_and_demands_credentials(
    rehearsal, rehearsal_mlflow, rehearsal_s3, rehearsal_postgres, rehearsal_prefect,
    rehearsal_prefect_worker, rehearsal_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A driver without the token, started first: Ray retries the refused handshake for ~20 s.
    no_token_home = tmp_path / "home"
    no_token_home.mkdir()
    refused = subprocess.Popen([sys.executable, "-c", DRIVER], text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               env=_env_without_ray_auth(no_token_home, RAY_ADDRESS=rehearsal_ray.address))

    # MLflow: no account, no answer; with it, an experiment lands in PostgreSQL and an artifact in S3.
    api = f"{rehearsal_mlflow.tracking_uri}/api/2.0/mlflow/experiments/search"
    assert httpx.post(api, json={"max_results": 1}).status_code == 401
    for name, value in rehearsal_mlflow.client_env().items():
        monkeypatch.setenv(name, value)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=rehearsal_mlflow.tracking_uri)
    experiment_id = client.create_experiment("rehearsal-smoke")
    run = client.create_run(experiment_id)
    artifact = tmp_path / "note.txt"
    artifact.write_text("served through MLflow into S3")
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "clients must upload through the server"
    objects = rehearsal_s3.client().list_objects_v2(Bucket=rehearsal_s3.bucket).get("Contents", [])
    keys = [o["Key"] for o in objects if o["Key"].endswith(f"{run.info.run_id}/artifacts/note.txt")]
    assert len(keys) == 1 and keys[0].startswith("mlflow-artifacts/")
    body = rehearsal_s3.client().get_object(Bucket=rehearsal_s3.bucket, Key=keys[0])["Body"].read()
    assert body == artifact.read_bytes()
    with closing(rehearsal_postgres.connect("mlflow")) as conn, conn.cursor() as cur:
        cur.execute("SELECT experiment_id FROM experiments WHERE name = %s", ["rehearsal-smoke"])
        assert [str(row[0]) for row in cur.fetchall()] == [experiment_id]

    # Prefect: the API is healthy and the project's work pool has this stack's worker, online.
    assert httpx.get(f"{rehearsal_prefect.api_url}/health").status_code == 200
    workers = {w["name"]: w for w in pool_workers(rehearsal_prefect.api_url, rehearsal_prefect_worker.pool)}
    assert rehearsal_prefect_worker.pool == "diffusion-pool"
    assert workers[rehearsal_prefect_worker.name]["status"] == "ONLINE"

    # Ray: with the token a driver joins both nodes, whose processes hold the pods' environment.
    with_token = _env_without_ray_auth(tmp_path, **rehearsal_ray.client_env())
    out = _run(DRIVER, with_token)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["nodes"] == 2
    assert report["env"] == {"AWS_ENDPOINT_URL": rehearsal_s3.endpoint_url,
                             "MLFLOW_TRACKING_URI": rehearsal_mlflow.tracking_uri}
    # The dashboard (Jobs API, Serve REST API) answers the bearer token only.
    version = f"{rehearsal_ray.dashboard_url}/api/version"
    assert httpx.get(version).status_code == 401  # no token: unauthenticated
    assert httpx.get(version, headers={"Authorization": "Bearer " + "0" * 64}).status_code == 403  # wrong
    assert httpx.get(version, headers=rehearsal_ray.auth_headers()).status_code == 200
    jobs = _run(JOBS, with_token, rehearsal_ray.dashboard_url)
    assert jobs.returncode == 0, jobs.stderr[-3000:]
    assert rehearsal_ray.dashboard_url.startswith("http://127.0.0.1:")

    _, stderr = refused.communicate(timeout=180)
    assert refused.returncode != 0, "a driver without the token joined the cluster"
    assert "InvalidAuthToken" in stderr or "Authentication" in stderr, stderr[-2000:]
