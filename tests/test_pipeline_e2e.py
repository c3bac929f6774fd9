"""End to end: `retrain` on digits through the real stack (Prefect, Ray Train, MLflow, Ray Serve).

Run 1 goes through the scheduled deployment: the deployment is registered with its cron schedule
and parameters, a run of it is triggered, and a Prefect runner executes it in a subprocess (as a
worker would). Run 2 calls the flow again with unchanged inputs and serving on: it must reuse the
dataset, skip training, and put the champion behind HTTP.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from local_services import free_port

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.data.manifest import read_manifest
from flows.pipeline import TRAIN_KEY_TAG, PipelineResult, retrain
from flows.pipeline_config import PipelineConfig
from flows.schedule import RetrainSchedule, runner_deployment

pytestmark = pytest.mark.slow

TINY_TRAIN = {
    "steps": 40, "batch_size": 32, "lr": 2e-3, "warmup_steps": 5, "checkpoint_every": 20,
    "log_every": 10, "num_workers": 1, "cpus_per_worker": 1, "num_sample_images": 16,
    "sample_steps": 5, "unet": {"base_channels": 16, "num_res_blocks": 1},
}


def tiny_config(work_dir: Path, port: int, serve: bool) -> PipelineConfig:
    return PipelineConfig(
        source="digits", work_dir=str(work_dir), train=TINY_TRAIN, serve=serve,
        model_name="e2e-digits",
        # a 40-step model is far below the default quality floor; this test is about the plumbing
        registry={"min_precision": 0.0, "min_recall": 0.0},
        evaluate={"num_samples": 40, "steps": 5, "batch_size": 40, "cache_dir": str(work_dir / "fcache"),
                  "feature_net": {"steps": 50}},
        serving={"port": port, "max_images_per_batch": 8},
    )


async def _trigger_through_deployment(deployment):
    from prefect.client.orchestration import get_client
    from prefect.runner import Runner

    runner = Runner(name="e2e-runner", query_seconds=1, limit=1, pause_on_shutdown=False)
    deployment_id = await runner.aadd_deployment(deployment)
    async with get_client() as client:
        stored = await client.read_deployment(deployment_id)
        flow_run = await client.create_flow_run_from_deployment(deployment_id)
    await runner.start(run_once=True)
    async with get_client() as client:
        return stored, await client.read_flow_run(flow_run.id)


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def first_run(e2e_dir: Path, prefect_harness: None):
    config = tiny_config(e2e_dir, free_port(), serve=False)
    # Built outside the event loop: Prefect's to_deployment returns a coroutine inside one.
    deployment = runner_deployment(RetrainSchedule(deployment_name="e2e-nightly", cron="0 3 * * *"), config)
    stored, flow_run = asyncio.run(_trigger_through_deployment(deployment))
    return config, stored, flow_run


def test_deployment_carries_schedule_and_parameters(first_run) -> None:
    config, stored, _ = first_run
    (schedule,) = stored.schedules
    assert schedule.schedule.cron == "0 3 * * *"
    assert PipelineConfig.model_validate(stored.parameters["config"]) == config


def test_triggered_run_executes_every_stage(first_run) -> None:
    import mlflow

    config, _, flow_run = first_run
    assert flow_run.state.is_completed(), flow_run.state
    manifest = read_manifest(config.resolved_dataset_uri())
    assert manifest.counts["train"] + manifest.counts["val"] == 1797
    client = mlflow.MlflowClient(config.resolved_tracking_uri())
    champion = client.get_model_version_by_alias("e2e-digits", "champion")
    assert str(champion.version) == "1" and champion.tags[TRAIN_KEY_TAG]
    assert champion.tags["dataset_fingerprint"] == manifest.fingerprint
    assert float(champion.tags["eval_fd"]) > 0
    run = client.get_run(champion.tags["training_run_id"])
    assert run.data.tags["prefect.flow_run_id"] == str(flow_run.id)
    assert run.data.metrics["loss"] > 0 and int(run.data.params["steps"]) == TINY_TRAIN["steps"]


def test_second_run_skips_work_and_serves_champion(first_run, e2e_dir: Path, ray_local) -> None:
    import httpx
    from ray import serve

    config = tiny_config(e2e_dir, free_port(), serve=True)
    try:
        result: PipelineResult = retrain(config)
        assert result.dataset_reused and not result.trained and result.decision == "unchanged"
        assert result.version == "1" and result.served_url
        body = httpx.post(f"{result.served_url}/generate", timeout=120,
                          json={"num_images": 3, "labels": [1, 2, 3], "steps": 5, "seed": 11,
                                "format": "array"}).json()
        images = np.asarray(body["images"])
        assert images.shape == (3, 1, 8, 8) and images.min() >= 0.0 and images.max() <= 1.0
        assert body["model"]["version"] == "1" and body["seeds"] == [11, 12, 13]
    finally:
        serve.shutdown()


def test_checkpoint_of_the_champion_loads(first_run) -> None:
    import mlflow

    config, _, _ = first_run
    client = mlflow.MlflowClient(config.resolved_tracking_uri())
    champion = client.get_model_version_by_alias("e2e-digits", "champion")
    run = client.get_run(champion.tags["training_run_id"])
    checkpoint = run.data.tags.get("checkpoint_path") or run.data.params.get("checkpoint_path")
    assert checkpoint, run.data.tags
    loaded = load_checkpoint(checkpoint)
    assert loaded.spec.data.dataset_fingerprint == champion.tags["dataset_fingerprint"]
    out = loaded.generate(4, steps=5, seeds=[0, 1, 2, 3], labels=[0, 1, 2, 3])
    assert out.shape == (4, 1, 8, 8)
