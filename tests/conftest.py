"""Shared fixtures: one real local Ray, MLflow store/server and Prefect engine per test session.

Starting each of these costs seconds, so they are shared; each is shut down at the end of the
session so that no process outlives the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Keep every service on loopback and every library quiet and offline.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from local_services import free_port, init_session_ray, terminate, wait_http


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for tests of tiny models: on a CPU shared with other test processes,
    torch's spinning worker threads can slow them down 30-fold."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The built-in digits, prepared once per session (read-only for the tests that train on it)."""
    from diffusion_core.data.config import PrepareConfig
    from diffusion_core.data.prepare import prepare

    out = str(tmp_path_factory.mktemp("digits") / "prepared")
    prepare(PrepareConfig(source="digits", output=out))
    return out


@pytest.fixture(scope="session")
def _ray_session() -> Iterator[None]:
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture()
def ray_local(_ray_session: None):
    """A local single-node Ray, started on first use and shared by the session."""
    import ray

    init_session_ray()
    return ray


@pytest.fixture()
def fresh_ray_cluster(_ray_session: None):
    """A multi-node Ray cluster on this machine (ray.cluster_utils.Cluster); replaces the session Ray
    for the duration of one test."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        _shutdown_serve_quietly()
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _shutdown_serve_quietly() -> None:
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass


@dataclass(frozen=True)
class MlflowStore:
    tracking_uri: str
    artifact_root: str  # <store dir>/mlartifacts: where the project's new experiments keep artifacts


@pytest.fixture()
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowStore:
    """A fresh SQLite-backed MLflow store in a temp dir, the process's tracking URI for the test
    (through MLFLOW_TRACKING_URI, which monkeypatch restores; MLflow's process-wide setters are
    left alone, so nothing outlives the test).

    The test runs in that temp dir, so anything MLflow would write relative to the working
    directory (./mlruns, ./mlflow.db) lands there, never in the repository.
    """
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowStore(tracking_uri=uri, artifact_root=(tmp_path / "mlartifacts").as_uri())


@dataclass(frozen=True)
class MlflowServer:
    tracking_uri: str
    process: subprocess.Popen


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and served artifacts (the team setup)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", proc, timeout=120, log_path=root / "server.log")
        yield MlflowServer(tracking_uri=uri, process=proc)
    finally:
        terminate(proc)
        log.close()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's real local engine against a temporary server, shared by the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
