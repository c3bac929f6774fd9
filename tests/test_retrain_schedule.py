"""Scheduled retraining: prefect.yaml and `flow.serve` carry one deployment definition."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffusion_core.errors import ConfigError
from flows.config import build_config
from flows.pipeline_config import PipelineConfig
from flows.schedule import (
    ENTRYPOINT,
    RetrainSchedule,
    deployment_parameters,
    render_prefect_yaml,
    runner_deployment,
)

ROOT = Path(__file__).resolve().parents[1]


def test_committed_prefect_yaml_is_the_rendered_definition() -> None:
    assert (ROOT / "prefect.yaml").read_text() == render_prefect_yaml(), (
        "prefect.yaml is stale: regenerate with `python -m flows.schedule > prefect.yaml`")


def test_prefect_yaml_points_at_the_flow_and_its_parameters_validate() -> None:
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (entry,) = doc["deployments"]
    path, func = entry["entrypoint"].split(":")
    assert entry["entrypoint"] == ENTRYPOINT and (ROOT / path).is_file()
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(str(ROOT / ENTRYPOINT))
    assert flow.name == "retrain" and func == "retrain"
    # No parameters: each run reads the worker's DIFFUSION_PIPELINE_CONFIG file.
    assert entry["parameters"] == {}
    assert entry["schedules"][0]["cron"] == RetrainSchedule().cron


def test_bad_cron_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"schedule\.cron"):
        build_config(RetrainSchedule, {"cron": "every night"}, "schedule")
    with pytest.raises(ConfigError, match="cron"):
        build_config(RetrainSchedule, {"cron": "0 3 * *"}, "schedule")
    with pytest.raises(ConfigError, match=r"schedule\.timezone"):
        build_config(RetrainSchedule, {"timezone": "Mars/Base"}, "schedule")


def test_runner_deployment_carries_schedule_and_parameters() -> None:
    config = PipelineConfig(source="digits", work_dir="/data/work", train={"steps": 700})
    deployment = runner_deployment(RetrainSchedule(cron="15 4 * * 1", timezone="Europe/Paris"), config)
    assert deployment.name == "retrain-nightly"
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "15 4 * * 1" and schedule.schedule.timezone == "Europe/Paris"
    assert deployment.parameters == deployment_parameters(config)
    assert PipelineConfig.model_validate(deployment.parameters["config"]) == config


def test_retrain_deployment_runs_one_at_a_time() -> None:
    (entry,) = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert entry["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    served = runner_deployment(RetrainSchedule(), None)
    assert served.concurrency_limit == 1
    assert served.concurrency_options.collision_strategy.value == "ENQUEUE"


@pytest.mark.slow
def test_a_second_retrain_run_waits_for_the_first(prefect_harness) -> None:
    """Prefect's server, not the flow, holds the second run back: two writers never share a dataset."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Pending

    deployment = runner_deployment(RetrainSchedule(deployment_name="one-at-a-time"), None)

    async def two_runs():
        deployment_id = await deployment.aapply()
        async with get_client() as client:
            runs = [await client.create_flow_run_from_deployment(deployment_id) for _ in range(2)]
            return [await client.set_flow_run_state(run.id, Pending()) for run in runs]

    first, second = asyncio.run(two_runs())
    assert first.status == SetStateStatus.ACCEPT
    assert second.status != SetStateStatus.ACCEPT and second.state.name == "AwaitingConcurrencySlot"
