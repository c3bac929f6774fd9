"""A local multi-node rehearsal of the cluster deployment.

Two real `ray start` nodes on this machine (own ports and temp dirs, one CPU each), the training CLI
submitted against them through RAY_ADDRESS exactly as a RayJob driver is, two workers placed
SPREAD, MLflow behind `mlflow server`. Drivers run in subprocesses so that they never touch the
Ray this pytest process may hold.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import local_cluster

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent

NODES_DRIVER = textwrap.dedent("""
    import json, ray
    ray.init()  # RAY_ADDRESS from the environment, as in a RayJob
    alive = [n for n in ray.nodes() if n["Alive"]]
    print(json.dumps({n["NodeID"]: n["Resources"].get("CPU", 0) for n in alive}))
    ray.shutdown()
""")

# Where the Ray Train workers of finished runs ran (the state API keeps dead actors).
WORKER_NODES_DRIVER = textwrap.dedent("""
    import json, sys
    from ray.util.state import list_actors
    actors = list_actors(address=sys.argv[1], limit=1000, raise_on_missing_output=False)
    print(json.dumps(sorted({a.node_id for a in actors if "TrainWorker" in a.class_name})))
""")


def run_driver(code: str, env: dict[str, str], *args: str, timeout: float = 120) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_every_port_a_node_is_given_is_its_own() -> None:
    """`ray start` refuses two components on one port; a node's ports are chosen together, apart
    from the head's GCS and dashboard ports."""
    cluster = local_cluster.LocalRayCluster(num_nodes=2, cpus_per_node=1,
                                            dashboard_port=local_cluster.free_port())
    cluster.address = f"127.0.0.1:{local_cluster.free_port()}"
    fixed = {int(cluster.address.split(":")[1]), cluster.dashboard_port}
    for head in (True, False) * 50:
        args = cluster._node_args(local_cluster.LocalNode(Path("/tmp/unused")), head=head)
        ports = [int(args[i + 1]) for i, flag in enumerate(args)
                 if flag.endswith("-port") and flag not in ("--port", "--dashboard-port")]
        assert len(ports) == len(set(ports)) and not set(ports) & fixed
    assert len(set(local_cluster.free_ports(200))) == 200


@pytest.fixture()
def two_node_cluster(request: pytest.FixtureRequest) -> Iterator:
    for_training = getattr(request, "param", False)
    # Training needs a CPU beside its two 1-CPU workers for Ray Data's reads: the head gets it.
    cluster = local_cluster.LocalRayCluster(
        num_nodes=2, cpus_per_node=1, head_cpus=2 if for_training else None,
        dashboard_port=local_cluster.free_port() if for_training else None,
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        # Nothing this cluster started survives it.
        assert cluster.processes() == []
        leftovers = [p for p in _all_cmdlines() if str(cluster.root) in p]
        assert leftovers == []


def _all_cmdlines() -> list[str]:
    import psutil

    lines = []
    for proc in psutil.process_iter(["cmdline"]):
        lines.append(" ".join(proc.info["cmdline"] or ()))
    return lines


def cluster_env(cluster, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    return {**env, **cluster.driver_env(), **extra}


@pytest.mark.slow
def test_two_nodes_join_and_leave_no_process(two_node_cluster) -> None:
    nodes = json.loads(run_driver(NODES_DRIVER, cluster_env(two_node_cluster)))
    assert len(nodes) == 2
    assert sorted(nodes.values()) == [1.0, 1.0]
    assert len(two_node_cluster.processes()) >= 4  # gcs, 2 raylets, agents
    # The token: in a file only its owner reads, named by the driver's environment, nowhere in argv.
    token_path = two_node_cluster.token_path
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert token_path.read_text() == two_node_cluster.auth_token
    env = two_node_cluster.driver_env()
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token_path)
    assert two_node_cluster.auth_token not in " ".join(env.values())
    assert not [line for line in _all_cmdlines() if two_node_cluster.auth_token in line]


TRAIN_CONFIG = """\
train:
  num_workers: 2
  cpus_per_worker: 1
  use_gpu: false
  placement_strategy: SPREAD
  storage_path: {storage}
  experiment_name: rehearsal
  steps: 4
  batch_size: 8
  warmup_steps: 1
  checkpoint_every: 4
  log_every: 2
  num_sample_images: 4
  sample_steps: 2
  unet:
    image_size: 8
    in_channels: 1
    base_channels: 8
    channel_mult: [1]
    num_res_blocks: 1
    attention_resolutions: []
    num_heads: 1
    num_classes: 10
"""


def cli(*args: str, env: dict[str, str], timeout: float = 420) -> str:
    """Run the `diffusion-pipeline` console script installed beside this interpreter."""
    script = Path(sys.executable).parent / "diffusion-pipeline"
    out = subprocess.run([str(script), *args], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=REPO)
    assert out.returncode == 0, f"{args}: {out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("two_node_cluster", [True], indirect=True)
def test_training_spreads_over_both_nodes_and_registers(
    two_node_cluster, mlflow_server, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from diffusion_core.adapters.mlflow_registry import log_and_register

    env = cluster_env(two_node_cluster, MLFLOW_TRACKING_URI=mlflow_server.tracking_uri)
    dataset = tmp_path / "digits"
    cli("prepare", "digits", str(dataset), env=env)
    config = tmp_path / "pipeline.yaml"
    config.write_text(TRAIN_CONFIG.format(storage=tmp_path / "ray_results"))

    started = time.monotonic()
    out = cli("--config", str(config), "train", str(dataset), env=env)
    logger.info("rehearsal training took %.1f s", time.monotonic() - started)

    checkpoint = Path(re.search(r"^checkpoint: (\S+)$", out, re.M).group(1))
    run_id = re.search(r"^mlflow run: (\w+)", out, re.M).group(1)
    assert (checkpoint / "spec.json").is_file()
    dashboard = f"http://127.0.0.1:{two_node_cluster.dashboard_port}"
    worker_nodes = json.loads(run_driver(WORKER_NODES_DRIVER, env, dashboard))
    nodes = json.loads(run_driver(NODES_DRIVER, env))
    assert sorted(worker_nodes) == sorted(nodes), "SPREAD must put one worker on each node"

    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "loss" in run.data.metrics or any(k.startswith("loss") for k in run.data.metrics)
    version = log_and_register(checkpoint, model_name="rehearsal-digits", run_id=run_id,
                               tracking_uri=mlflow_server.tracking_uri)
    registered = client.get_model_version("rehearsal-digits", version.version)
    assert registered.run_id is not None
    assert "candidate" in version.aliases
